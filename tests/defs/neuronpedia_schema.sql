-- The tables Neuronpedia's importer writes, as its Prisma migrations leave them at
-- hijohnnylin/neuronpedia ebb8426fc550ad5d1f76d52c271a624af3c08a57
-- (apps/webapp/prisma/migrations/*/migration.sql, all 66 applied in order; prisma/schema.prisma agrees).
-- Every column of these tables with its type, nullability and database default, their primary and
-- unique keys and their foreign keys among themselves, restated here for the test of our export
-- (tests/defs/neuronpedia_import.py). Left out: Explanation.embedding (a pgvector vector(256) the
-- import never writes, and its HNSW indexes), plain indexes, and the foreign key of
-- ExplanationType.explainerModelSettingsId to a table the import does not touch.
-- Prisma-side defaults (@default(cuid()), @updatedAt) are no database defaults: a raw insert gets none.

CREATE TYPE "Visibility" AS ENUM ('PUBLIC', 'UNLISTED', 'PRIVATE');

CREATE TABLE "User" (
    "id" TEXT NOT NULL PRIMARY KEY,
    "name" TEXT NOT NULL UNIQUE,
    "bio" TEXT DEFAULT '',
    "email" TEXT UNIQUE,
    "emailVerified" TIMESTAMP(3),
    "githubUsername" TEXT,
    "bot" BOOLEAN NOT NULL DEFAULT false,
    "image" TEXT,
    "admin" BOOLEAN NOT NULL DEFAULT false,
    "canTriggerExplanations" BOOLEAN NOT NULL DEFAULT false,
    "emailNewsletterNotification" BOOLEAN NOT NULL DEFAULT true,
    "emailUnsubscribeAll" BOOLEAN NOT NULL DEFAULT false,
    "emailUnsubscribeCode" TEXT NOT NULL UNIQUE,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "isProblemEditor" BOOLEAN NOT NULL DEFAULT false
);

CREATE TABLE "Model" (
    "id" TEXT NOT NULL PRIMARY KEY,
    "displayNameShort" TEXT NOT NULL DEFAULT '',
    "displayName" TEXT NOT NULL DEFAULT '',
    "creatorId" TEXT NOT NULL,
    "tlensId" TEXT,
    "dimension" INTEGER,
    "visibility" "Visibility" NOT NULL DEFAULT 'PRIVATE',
    "inferenceEnabled" BOOLEAN NOT NULL DEFAULT false,
    "instruct" BOOLEAN NOT NULL DEFAULT false,
    "layers" INTEGER NOT NULL,
    "neuronsPerLayer" INTEGER NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "owner" TEXT NOT NULL,
    "updatedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "website" TEXT,
    "defaultSourceId" TEXT,
    "defaultSourceSetName" TEXT,
    "thinking" BOOLEAN NOT NULL DEFAULT false,
    "defaultGraphSourceSetName" TEXT,
    "openRouterId" TEXT,
    UNIQUE ("defaultSourceSetName", "id"),
    UNIQUE ("defaultSourceId", "id"),
    UNIQUE ("defaultGraphSourceSetName", "id")
);

CREATE TABLE "SourceRelease" (
    "name" TEXT NOT NULL UNIQUE,
    "visibility" "Visibility" NOT NULL DEFAULT 'PRIVATE',
    "isNewUi" BOOLEAN NOT NULL DEFAULT false,
    "featured" BOOLEAN NOT NULL DEFAULT false,
    "description" TEXT NOT NULL,
    "descriptionShort" TEXT,
    "urls" TEXT[],
    "creatorEmail" TEXT,
    "creatorName" TEXT NOT NULL,
    "creatorNameShort" TEXT,
    "creatorId" TEXT NOT NULL,
    "defaultSourceId" TEXT,
    "defaultUmapSourceIds" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "defaultSourceSetName" TEXT
);

CREATE TABLE "SourceSet" (
    "modelId" TEXT NOT NULL,
    "name" TEXT NOT NULL,
    "hasDashboards" BOOLEAN NOT NULL DEFAULT true,
    "visibility" "Visibility" NOT NULL DEFAULT 'PRIVATE',
    "description" TEXT NOT NULL,
    "type" TEXT NOT NULL DEFAULT '',
    "creatorName" TEXT NOT NULL,
    "urls" TEXT[],
    "creatorEmail" TEXT,
    "creatorId" TEXT NOT NULL,
    "releaseName" TEXT,
    "defaultRange" INTEGER NOT NULL DEFAULT 1,
    "defaultShowBreaks" BOOLEAN NOT NULL DEFAULT true,
    "showDfa" BOOLEAN NOT NULL DEFAULT false,
    "showCorrelated" BOOLEAN NOT NULL DEFAULT false,
    "showHeadAttribution" BOOLEAN NOT NULL DEFAULT false,
    "showUmap" BOOLEAN NOT NULL DEFAULT false,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "defaultOfModelId" TEXT,
    "allowInferenceSearch" BOOLEAN NOT NULL DEFAULT true,
    "graphEnabled" BOOLEAN NOT NULL DEFAULT false,
    "defaultGraphModelId" TEXT,
    "hasGraphs" BOOLEAN NOT NULL DEFAULT false,
    "similarityMatrixEnabled" BOOLEAN NOT NULL DEFAULT false,
    UNIQUE ("modelId", "name")
);

CREATE TABLE "Source" (
    "id" TEXT NOT NULL,
    "modelId" TEXT NOT NULL,
    "hasDashboards" BOOLEAN NOT NULL DEFAULT true,
    "inferenceEnabled" BOOLEAN NOT NULL DEFAULT false,
    "saelensConfig" JSONB,
    "saelensRelease" TEXT,
    "saelensSaeId" TEXT,
    "hfRepoId" TEXT,
    "hfFolderId" TEXT,
    "visibility" "Visibility" NOT NULL DEFAULT 'PRIVATE',
    "setName" TEXT NOT NULL,
    "creatorId" TEXT NOT NULL,
    "hasUmap" BOOLEAN NOT NULL DEFAULT false,
    "hasUmapLogSparsity" BOOLEAN NOT NULL DEFAULT false,
    "hasUmapClusters" BOOLEAN NOT NULL DEFAULT false,
    "num_prompts" INTEGER,
    "num_tokens_in_prompt" INTEGER,
    "dataset" TEXT,
    "notes" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "defaultOfModelId" TEXT,
    "cosSimMatchModelId" TEXT,
    "cosSimMatchSourceId" TEXT,
    UNIQUE ("modelId", "id")
);

CREATE TABLE "Neuron" (
    "modelId" TEXT NOT NULL,
    "layer" TEXT NOT NULL,
    "index" TEXT NOT NULL,
    "sourceSetName" TEXT,
    "creatorId" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "maxActApprox" DOUBLE PRECISION DEFAULT 0,
    "hasVector" BOOLEAN NOT NULL DEFAULT false,
    "vector" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "vectorLabel" TEXT,
    "vectorDefaultSteerStrength" DOUBLE PRECISION DEFAULT 10,
    "hookName" TEXT,
    "topkCosSimIndices" INTEGER[] DEFAULT ARRAY[]::INTEGER[],
    "topkCosSimValues" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "neuron_alignment_indices" INTEGER[] DEFAULT ARRAY[]::INTEGER[],
    "neuron_alignment_values" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "neuron_alignment_l1" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "correlated_neurons_indices" INTEGER[] DEFAULT ARRAY[]::INTEGER[],
    "correlated_neurons_pearson" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "correlated_neurons_l1" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "correlated_features_indices" INTEGER[] DEFAULT ARRAY[]::INTEGER[],
    "correlated_features_pearson" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "correlated_features_l1" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "neg_str" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "neg_values" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "pos_str" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "pos_values" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "frac_nonzero" DOUBLE PRECISION NOT NULL DEFAULT 0,
    "freq_hist_data_bar_heights" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "freq_hist_data_bar_values" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "logits_hist_data_bar_heights" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "logits_hist_data_bar_values" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "decoder_weights_dist" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "umap_cluster" INTEGER,
    "umap_log_feature_sparsity" DOUBLE PRECISION,
    "umap_x" DOUBLE PRECISION,
    "umap_y" DOUBLE PRECISION,
    UNIQUE ("modelId", "layer", "index")
);

CREATE TABLE "Activation" (
    "id" TEXT NOT NULL PRIMARY KEY,
    "tokens" TEXT[],
    "dataIndex" TEXT,
    "index" TEXT NOT NULL,
    "layer" TEXT NOT NULL,
    "modelId" TEXT NOT NULL,
    "dataSource" TEXT,
    "maxValue" DOUBLE PRECISION NOT NULL,
    "maxValueTokenIndex" INTEGER NOT NULL,
    "minValue" DOUBLE PRECISION NOT NULL,
    "values" DOUBLE PRECISION[],
    "dfaValues" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "dfaTargetIndex" INTEGER,
    "dfaMaxValue" DOUBLE PRECISION,
    "creatorId" TEXT NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "lossValues" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "logitContributions" TEXT,
    "binMin" DOUBLE PRECISION,
    "binMax" DOUBLE PRECISION,
    "binContains" DOUBLE PRECISION,
    "qualifyingTokenIndex" INTEGER,
    "zKIndices" INTEGER[] DEFAULT ARRAY[]::INTEGER[],
    "zQIndices" INTEGER[] DEFAULT ARRAY[]::INTEGER[],
    "zValues" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[]
);

CREATE TABLE "ExplanationType" (
    "name" TEXT NOT NULL PRIMARY KEY,
    "displayName" TEXT NOT NULL,
    "description" TEXT NOT NULL,
    "featured" BOOLEAN NOT NULL DEFAULT true,
    "isAttention" BOOLEAN NOT NULL DEFAULT false,
    "explainerModelSettingsId" TEXT,
    "settings" TEXT,
    "url" TEXT,
    "creatorName" TEXT NOT NULL,
    "creatorId" TEXT NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE "ExplanationModelType" (
    "name" TEXT NOT NULL PRIMARY KEY,
    "displayName" TEXT NOT NULL,
    "description" TEXT NOT NULL,
    "featured" BOOLEAN NOT NULL DEFAULT true,
    "openRouterModelId" TEXT,
    "url" TEXT,
    "creatorName" TEXT NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE "Explanation" (
    "id" TEXT NOT NULL PRIMARY KEY,
    "modelId" TEXT NOT NULL,
    "layer" TEXT NOT NULL,
    "index" TEXT NOT NULL,
    "description" TEXT NOT NULL,
    "authorId" TEXT NOT NULL,
    "triggeredByUserId" TEXT,
    "notes" TEXT,
    "scoreV1" DOUBLE PRECISION NOT NULL DEFAULT 0,
    "scoreV2" DOUBLE PRECISION,
    "umap_x" DOUBLE PRECISION DEFAULT 0,
    "umap_y" DOUBLE PRECISION DEFAULT 0,
    "umap_cluster" INTEGER DEFAULT 0,
    "umap_log_feature_sparsity" DOUBLE PRECISION DEFAULT 0,
    "typeName" TEXT,
    "explanationModelName" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- Foreign keys, added once every table exists (Model and SourceSet point at each other).
-- All cascade on update; on delete as upstream says.
ALTER TABLE "Model" ADD FOREIGN KEY ("creatorId") REFERENCES "User"("id") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "Model" ADD FOREIGN KEY ("defaultSourceSetName", "id") REFERENCES "SourceSet"("name", "modelId") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "Model" ADD FOREIGN KEY ("defaultSourceId", "id") REFERENCES "Source"("id", "modelId") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "Model" ADD FOREIGN KEY ("defaultGraphSourceSetName", "id") REFERENCES "SourceSet"("name", "modelId") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "SourceRelease" ADD FOREIGN KEY ("creatorId") REFERENCES "User"("id") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "SourceSet" ADD FOREIGN KEY ("modelId") REFERENCES "Model"("id") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "SourceSet" ADD FOREIGN KEY ("creatorId") REFERENCES "User"("id") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "SourceSet" ADD FOREIGN KEY ("releaseName") REFERENCES "SourceRelease"("name") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "Source" ADD FOREIGN KEY ("modelId", "setName") REFERENCES "SourceSet"("modelId", "name") ON UPDATE CASCADE ON DELETE RESTRICT;
ALTER TABLE "Source" ADD FOREIGN KEY ("creatorId") REFERENCES "User"("id") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "Source" ADD FOREIGN KEY ("cosSimMatchSourceId", "cosSimMatchModelId") REFERENCES "Source"("id", "modelId") ON UPDATE CASCADE ON DELETE SET NULL;
ALTER TABLE "Neuron" ADD FOREIGN KEY ("modelId") REFERENCES "Model"("id") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "Neuron" ADD FOREIGN KEY ("modelId", "layer") REFERENCES "Source"("modelId", "id") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "Neuron" ADD FOREIGN KEY ("modelId", "sourceSetName") REFERENCES "SourceSet"("modelId", "name") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "Neuron" ADD FOREIGN KEY ("creatorId") REFERENCES "User"("id") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "Activation" ADD FOREIGN KEY ("modelId", "layer", "index") REFERENCES "Neuron"("modelId", "layer", "index") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "Activation" ADD FOREIGN KEY ("creatorId") REFERENCES "User"("id") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "ExplanationType" ADD FOREIGN KEY ("creatorId") REFERENCES "User"("id") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "Explanation" ADD FOREIGN KEY ("modelId") REFERENCES "Model"("id") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "Explanation" ADD FOREIGN KEY ("modelId", "layer", "index") REFERENCES "Neuron"("modelId", "layer", "index") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "Explanation" ADD FOREIGN KEY ("authorId") REFERENCES "User"("id") ON UPDATE CASCADE ON DELETE CASCADE;
ALTER TABLE "Explanation" ADD FOREIGN KEY ("triggeredByUserId") REFERENCES "User"("id") ON UPDATE CASCADE ON DELETE SET NULL;
ALTER TABLE "Explanation" ADD FOREIGN KEY ("typeName") REFERENCES "ExplanationType"("name") ON UPDATE CASCADE ON DELETE SET NULL;
ALTER TABLE "Explanation" ADD FOREIGN KEY ("explanationModelName") REFERENCES "ExplanationModelType"("name") ON UPDATE CASCADE ON DELETE SET NULL;
