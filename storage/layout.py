"""Where every stage keeps its data under one root directory (see DESIGN.md, "Storage root")."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from storage.activations import LATENT_STATS_FILE, META_FILE


def response_cache_file(folder: Path) -> Path:
    """The LLM response cache (SQLite) in `folder`: the data root's `llm_cache`, or `llm.cache_dir`."""
    return folder / "responses.sqlite"


@dataclass(frozen=True)
class DataRoot:
    """Paths of every stage's outputs under one root; creating a `DataRoot` creates nothing."""

    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike) -> DataRoot:
        return cls(Path(path).expanduser().resolve())

    @property
    def corpus_dir(self) -> Path:
        return self.root / "corpus"

    @property
    def corpus_tokens_path(self) -> Path:
        return self.corpus_dir / "tokens.safetensors"

    @property
    def corpus_vocab_path(self) -> Path:
        return self.corpus_dir / "vocab.json"

    @property
    def corpus_meta_path(self) -> Path:
        """Written last: a corpus with it is complete."""
        return self.corpus_dir / "meta.json"

    @property
    def identity_path(self) -> Path:
        """Which root this is (`storage/root_adoption.py`)."""
        return self.root / "data_root.json"

    @property
    def registry_dir(self) -> Path:
        return self.root / "registry"

    def coder_registry_dir(self, coder: str) -> Path:
        """The registered coder's own folder, `<name>/<hookpoint>`."""
        return self.registry_dir / coder

    @property
    def lancedb_dir(self) -> Path:
        return self.root / "lancedb"

    @property
    def llm_cache_dir(self) -> Path:
        return self.root / "llm_cache"

    @property
    def response_cache_path(self) -> Path:
        return response_cache_file(self.llm_cache_dir)

    def endpoint_slots_dir(self, endpoint: str) -> Path:
        """The slot lock files every run on this root shares for one endpoint and model (`endpoint`: the
        LLM's `model_id`), in a folder named by its hash: an id holds URLs and slashes."""
        return self.llm_cache_dir / "slots" / hashlib.sha256(endpoint.encode()).hexdigest()[:16]

    @property
    def calibration_dir(self) -> Path:
        """The judges' calibration cards (`assets/calibration.py`)."""
        return self.root / "calibration"

    def calibration_card_path(self, judge: str) -> Path:
        """The calibration card of the judge whose identity is `judge`: one per judge, named by the
        identity's hash (an identity holds slashes and colons)."""
        return self.calibration_dir / f"{hashlib.sha256(judge.encode()).hexdigest()[:16]}.json"

    @property
    def all_activations_dir(self) -> Path:
        """The activation caches of every coder, `<name>/<hookpoint>/` each."""
        return self.root / "activations"

    def activations_dir(self, coder: str) -> Path:
        return self.all_activations_dir / coder

    def cache_meta_path(self, coder: str) -> Path:
        """The activation cache's `meta.json`, written last: a coder with it is cached whole."""
        return self.activations_dir(coder) / META_FILE

    def latent_stats_path(self, coder: str) -> Path:
        """Per latent over the whole cached corpus: tokens fired on, largest and summed activation."""
        return self.activations_dir(coder) / LATENT_STATS_FILE

    def activations_lock_path(self, coder: str) -> Path:
        """Held by the one process caching `coder`'s activations."""
        return self.all_activations_dir / ".locks" / f"{coder.replace('/', '__')}.lock"

    def exemplars_path(self, coder: str, shard: str) -> Path:
        return self.root / "exemplars" / coder / f"{shard}.parquet"

    def latent_profiles_path(self, coder: str, shard: str) -> Path:
        """Per latent of a shard: firing frequency, top tokens, quantile boundaries, decoder neighbours
        (not the activation cache's `latent_stats.safetensors`, which counts over the whole coder)."""
        return self.root / "exemplars" / coder / f"{shard}.profiles.parquet"

    def exemplars_threshold_path(self, coder: str, shard: str) -> Path:
        """The `min_activating_windows` the shard's exemplars were made with: a live latent without
        exemplars fired in fewer windows than it (`assets/accounting.py` names it)."""
        return self.root / "exemplars" / coder / f"{shard}.threshold.json"

    def explanations_path(self, coder: str, shard: str) -> Path:
        return self.root / "explanations" / coder / f"{shard}.parquet"

    def explanation_rounds_path(self, coder: str, shard: str) -> Path:
        """Per latent and refine round: the explanation tried, its score on the `valid` windows, whether it was kept."""
        return self.root / "explanations" / coder / f"{shard}.rounds.parquet"

    def explanation_senses_path(self, coder: str, shard: str) -> Path:
        """Per latent with several senses (`[explanations] senses`): each sense's explanation and
        how many `train` windows it was written from."""
        return self.root / "explanations" / coder / f"{shard}.senses.parquet"

    def explanation_reseeds_path(self, coder: str, shard: str) -> Path:
        """Per latent re-explained from a disjoint draw of windows (`[explanations] stability_latents`):
        its second explanation, beside the first, and their embedding similarity."""
        return self.root / "explanations" / coder / f"{shard}.reseeds.parquet"

    def scores_path(self, coder: str, shard: str, scorer: str) -> Path:
        """Per latent: the scorer's metrics with the explanation and beside the control."""
        return self.root / "scores" / coder / shard / f"{scorer}.parquet"

    def sense_scores_path(self, coder: str, shard: str, scorer: str) -> Path:
        """Per sense of a latent explained as several: the scorer's metrics of that sense on its own
        windows, beside the control."""
        return self.root / "scores" / coder / shard / f"{scorer}.senses.parquet"

    def reseed_scores_path(self, coder: str, shard: str, scorer: str) -> Path:
        """Per re-explained latent: the scorer's metrics of its second explanation, on the same windows."""
        return self.root / "scores" / coder / shard / f"{scorer}.reseeds.parquet"

    def scored_examples_path(self, coder: str, shard: str, scorer: str) -> Path:
        """Per judged example (or intruder task): label, prediction, score; what every metric is computed from."""
        return self.root / "scores" / coder / shard / f"{scorer}.examples.parquet"

    @property
    def scores_dir(self) -> Path:
        return self.root / "scores"

    def score_summary_path(self, coder: str) -> Path:
        return self.root / "scores" / coder / "summary.parquet"

    def score_summary_sources_path(self, coder: str) -> Path:
        """The scores tables (`<shard>/<scorer>` → fingerprint) the summary was built from."""
        return self.root / "scores" / coder / "summary.sources.json"

    @property
    def graphs_dir(self) -> Path:
        """Attribution graphs labelled from this root's explanations (`autointerp label-graph`): a folder
        circuit-tracer's local server serves (`<slug>.json`, `graph-metadata.json`)."""
        return self.root / "graphs"

    def labelled_graph_path(self, slug: str) -> Path:
        return self.graphs_dir / f"{slug}.json"

    @property
    def graph_labels_path(self) -> Path:
        """Which latents each labelled graph labels: slug → coder → latent → node ids (the latent page's
        links)."""
        return self.graphs_dir / "labels.json"

    def viewer_dir(self, coder: str | None = None) -> Path:
        """The latent browser's caches (of one coder): safe to delete, they are rebuilt."""
        return self.root / "viewer" / coder if coder else self.root / "viewer"

    @staticmethod
    def viewer_stamp_path(cache: Path) -> Path:
        """Beside a browser cache: what it was built from (it is built again when that changes)."""
        return cache.with_suffix(".stamp.json")

    def viewer_latents_path(self, coder: str) -> Path:
        """One row per latent, what the latent list sorts and filters."""
        return self.viewer_dir(coder) / "latents.arrow"

    def viewer_rows_path(self, coder: str, shard: str, table: str) -> Path:
        """A shard's table sorted by latent (`table`: `exemplars`, `scores.<scorer>`...), memory-mapped."""
        return self.viewer_dir(coder) / f"{shard}.{table}.arrow"

    def viewer_row_offsets_path(self, coder: str, shard: str, table: str) -> Path:
        """Per latent of `viewer_rows_path`: where its rows start and end."""
        return self.viewer_dir(coder) / f"{shard}.{table}.offsets.npy"

    def viewer_density_path(self, coder: str, shard: str) -> Path:
        """Per latent of the shard: a histogram of its cached activations."""
        return self.viewer_dir(coder) / f"{shard}.density.npz"

    def viewer_vectors_path(self, coder: str) -> Path:
        """The coder's vectors of the explanations table, memory-mapped for search."""
        return self.viewer_dir(coder) / "explanation_vectors.npy"

    def viewer_vector_latents_path(self, coder: str) -> Path:
        """The latent of each row of `viewer_vectors_path`."""
        return self.viewer_dir(coder) / "explanation_vectors.latents.npy"

    def viewer_vector_texts_path(self, coder: str) -> Path:
        """The text each row of `viewer_vectors_path` embeds."""
        return self.viewer_dir(coder) / "explanation_vectors.texts.json"

    def viewer_decoder_path(self, coder: str, identity: str) -> Path:
        """Unit-norm decoder rows converted from the registered coder of this identity (its files' content)."""
        return self.viewer_dir(coder) / f"decoder-{identity}.npy"

    def viewer_decoder_marker_path(self, coder: str, identity: str) -> Path:
        """Whether the coder of this identity has a decoder (`viewer_decoder_path` only where it has)."""
        return self.viewer_dir(coder) / f"decoder-{identity}.json"

    def viewer_decoder_paths(self, coder: str) -> list[Path]:
        """The decoder files of every identity of the coder held now."""
        return sorted(self.viewer_dir(coder).glob("decoder*"))

    def viewer_unembedding_path(self, model_identity: str) -> Path:
        """The browser's own copy of `unembedding_path`, where the activations stage wrote none (a cache
        made before it did)."""
        return self.viewer_dir() / self.unembedding_path(model_identity).name

    def unembedding_path(self, model_identity: str) -> Path:
        """The subject model's unembedding and final norm scale, all the logit lens reads of it: written by the
        activations stage, which has the model loaded, else by the browser the first time it needs them. Named
        by the model's identity (its content, `storage/content_identity.py`): other weights under the same name are
        never read through an earlier model's file."""
        return (
            self.all_activations_dir
            / f"unembedding-{model_identity.replace('/', '--')}.safetensors"
        )
