"""Exports to Neuronpedia and delphi, and delphi's explanations imported back and re-scored with controls,
on a materialized partition."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from dagster import DagsterInstance, materialize

from storage.layout import DataRoot
from tests.conftest import add_coders, make_resources
from tests.materialized_partition import build

# Row fields of Neuronpedia's db_models (utils/neuronpedia-utils/neuronpedia_utils/db_models/*.py)
# that an import needs: every field without a default, and those our export fills.
NEURONPEDIA_FIELDS = {
    "features": {"modelId", "layer", "index", "creatorId", "maxActApprox", "topkCosSimIndices", "topkCosSimValues", "pos_str", "pos_values",
                 "neg_str", "neg_values", "frac_nonzero", "freq_hist_data_bar_heights", "freq_hist_data_bar_values",
                 "logits_hist_data_bar_heights", "logits_hist_data_bar_values"},
    "activations": {"id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue", "values", "creatorId", "binMin", "binMax", "binContains"},
    "explanations": {"id", "modelId", "layer", "index", "description", "authorId", "typeName", "explanationModelName"},
}
DELPHI_SAMPLE = {"str_tokens", "activations", "distance", "activating", "prediction", "probability", "correct"}  # delphi's ClassifierOutput


@pytest.fixture(scope="session")
def partition(tmp_path_factory, tiny_sae):
    return build(tmp_path_factory.mktemp("materialized"), tiny_sae)


def test_neuronpedia_export_round_trips_features_activations_and_explanations(partition, tmp_path):
    from autointerp_defs.cli import main
    from autointerp_defs.readside.neuronpedia import read_neuronpedia

    main(["--data", str(partition.root), "export", "neuronpedia", partition.coder, str(tmp_path)])
    folder = tmp_path / "smollm2-135m-instruct" / "3-tiny-topk"
    data = read_neuronpedia(folder)
    for table, fields in NEURONPEDIA_FIELDS.items():
        assert data[table] and all(fields <= set(row) for row in data[table]), table
    assert data["source"][0]["id"] == "3-tiny-topk" and data["sourceset"][0]["name"] == "tiny-topk"

    root = DataRoot.at(partition.root)
    exemplars = pd.read_parquet(root.exemplars_path(partition.coder, "00"))
    stats = pd.read_parquet(root.latent_profiles_path(partition.coder, "00")).set_index("latent")
    explained = pd.read_parquet(root.explanations_path(partition.coder, "00"))
    assert sorted(int(f["index"]) for f in data["features"]) == sorted(stats.index)
    activating = exemplars[exemplars.kind == "activating"]
    assert len(data["activations"]) == len(activating)
    vocab = json.loads((root.corpus_dir / "vocab.json").read_text())
    for row in data["activations"][:50]:
        window = activating[(activating.latent == int(row["index"])) & (activating.sequence == int(row["dataIndex"]))]
        match = [w for w in window.itertuples() if list(w.activations) == pytest.approx(row["values"])]
        assert match and row["maxValue"] == pytest.approx(match[0].max_activation)
        w = match[0]
        assert len(row["tokens"]) == len(w.tokens) and all(t == vocab[i] or t == "‖" for t, i in zip(row["tokens"], w.tokens))
        if w.quantile > 0:  # a held-out window sits in its quantile's bin
            bounds = list(stats.loc[w.latent, "quantile_boundaries"])
            assert row["binMin"] <= bounds[len(bounds) - 1 - w.quantile] and row["binMax"] >= bounds[len(bounds) - w.quantile]
        else:  # the explainer's windows are Neuronpedia's "top activations"
            assert row["binMin"] == -1
    for row in data["activations"]:  # every bin holds its windows' max activations
        assert row["binMin"] == -1 or row["binMin"] <= row["maxValue"] <= row["binMax"], row["index"]
    ok = explained[explained.status == "ok"]
    got = {int(e["index"]): e for e in data["explanations"]}
    assert {k: v["description"] for k, v in got.items()} == dict(zip(ok.latent.astype(int), ok.explanation))
    assert {e["explanationModelName"] for e in got.values()} == {"scripted-judge"}
    assert {len(f["pos_str"]) for f in data["features"]} == {10}
    vocab_size = len(json.loads((root.corpus_dir / "vocab.json").read_text()))
    assert {sum(f["logits_hist_data_bar_heights"]) for f in data["features"]} == {vocab_size}  # the logit of every token, binned
    densities = {int(f["index"]): sum(f["freq_hist_data_bar_heights"]) for f in data["features"]}
    from storage.activations import LATENT_STATS_FILE, load_latent_stats

    counts = load_latent_stats(root.activations_dir(partition.coder) / LATENT_STATS_FILE)["count"]
    assert all(densities[i] == counts[i] for i in densities)


def test_delphi_export_then_import_rescored_with_controls(partition, tmp_path):
    from autointerp_defs.cli import main
    from autointerp_defs.definitions import build_definitions

    out = tmp_path / "delphi"
    main(["--data", str(partition.root), "export", "delphi", partition.coder, str(out)])
    root = DataRoot.at(partition.root)
    explained = pd.read_parquet(root.explanations_path(partition.coder, "00"))
    ok = explained[explained.status == "ok"]
    files = sorted(p.name for p in (out / "explanations").iterdir())
    assert files == sorted(f"model.layers.3_latent{l}.txt" for l in ok.latent)
    for latent, text in zip(ok.latent, ok.explanation):
        assert json.loads((out / "explanations" / f"model.layers.3_latent{latent}.txt").read_text()) == text
    detection = pd.read_parquet(root.scored_examples_path(partition.coder, "00", "detection"))
    for name, ours in (("detection", detection), ("fuzz", pd.read_parquet(root.scored_examples_path(partition.coder, "00", "fuzzing")))):
        latent = int(ok.latent.iloc[0])
        samples = json.loads((out / "scores" / name / f"model.layers.3_latent{latent}.txt").read_text())
        mine = ours[(ours.latent == latent) & (ours.source == "explanation")].sort_values("example")
        assert all(DELPHI_SAMPLE == set(s) for s in samples) and len(samples) == len(mine)
        assert [s["activating"] for s in samples] == [bool(x) for x in mine.label]
        assert [s["prediction"] for s in samples] == [bool(x) for x in mine.predicted]
        assert all(s["correct"] == (s["prediction"] == s["activating"]) for s in samples)

    # import into a copy whose explanations are gone: the same texts come back, re-scorable with controls
    copy = tmp_path / "copy"
    shutil.copytree(partition.root, copy, ignore=shutil.ignore_patterns("viewer"))
    croot = DataRoot.at(copy)
    croot.explanations_path(partition.coder, "00").unlink()
    main(["--data", str(copy), "import", "delphi", partition.coder, str(out), "--model", "delphi-run"])
    imported = pd.read_parquet(croot.explanations_path(partition.coder, "00"))
    assert dict(zip(imported.latent, imported.explanation)) == dict(zip(ok.latent, ok.explanation))
    assert set(imported.explainer) == {"delphi"} and set(imported.model) == {"delphi-run"} and set(imported.status) == {"ok"}

    instance = DagsterInstance.ephemeral()
    add_coders(instance, copy, partition.coder)
    result = materialize(list(build_definitions("local").assets), selection=["scores/embedding"], partition_key=f"{partition.coder}|00",
                         resources=make_resources(copy, max_latents=4), instance=instance)
    assert result.success
    scored = pd.read_parquet(croot.scores_path(partition.coder, "00", "embedding"))
    assert dict(zip(scored.latent, scored.explanation)) == dict(zip(ok.latent, ok.explanation))
    assert (scored.control_explanation != scored.explanation).all() and scored.control_roc_auc.notna().all()


def test_import_names_the_fix_for_a_folder_without_delphi_explanations(partition, tmp_path):
    from autointerp_defs.cli import main

    (tmp_path / "explanations").mkdir()
    (tmp_path / "explanations" / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit, match=r"No delphi explanation .*Fix"):
        main(["--data", str(partition.root), "import", "delphi", partition.coder, str(tmp_path)])
    (tmp_path / "explanations" / "model.layers.3_latent99999.txt").write_text(json.dumps("a word"))
    with pytest.raises(SystemExit, match=r"latents \[99999\] do not exist in tiny-topk/model.layers.3 .*Fix"):
        main(["--data", str(partition.root), "import", "delphi", partition.coder, str(tmp_path)])


def test_import_refuses_while_the_explanations_are_being_written(partition, tmp_path):
    from autointerp_defs.cli import main
    from storage.tables import table_lock

    out = tmp_path / "delphi"
    main(["--data", str(partition.root), "export", "delphi", partition.coder, str(out)])
    copy = tmp_path / "copy"
    shutil.copytree(partition.root, copy, ignore=shutil.ignore_patterns("viewer"))
    path = DataRoot.at(copy).explanations_path(partition.coder, "00")
    before = path.read_bytes()
    with table_lock(path, "the explanations asset"):  # what an explanations run holds for its shard
        with pytest.raises(SystemExit, match=rf"Writing the explanations of {partition.coder} shard 00 .* is already running in process \d+\. Fix: wait"):
            main(["--data", str(copy), "import", "delphi", partition.coder, str(out)])
    assert path.read_bytes() == before
    main(["--data", str(copy), "import", "delphi", partition.coder, str(out)])  # once it is free, the import goes through
    assert path.read_bytes() != before
