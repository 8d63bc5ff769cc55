"""Latents with several senses (`[explanations] senses`): one explanation per distinct sense.

A latent's `train` activating windows are embedded by the deployment's embedder, each as the text
of its peak token and `SENSE_CONTEXT_TOKENS` tokens either side (a whole window's embedding is
dominated by the text around the firing, which says little about what fires). Average-linkage
agglomerative clustering on cosine similarity merges them until at most `senses` clusters remain
and no two clusters' mean similarity is `DISTINCT_BELOW` or more; clusters of fewer than
`MIN_SENSE_WINDOWS` windows, smallest first, join their nearest. With two or more clusters left, the
explainer is asked once per cluster, its normal prompt on that cluster's windows; clusters whose
explanations coincide are one sense (the embedding proposes senses, the explanations settle them).
The latent's `explanation` is then the distinct senses joined by " or " (a deterministic summary: it
costs no request and cannot drop or reword a sense, so every scorer scores exactly the union of what
the senses say); each sense is a row of `explanation_senses`, with the `test` activating windows
nearest its clusters (`test_windows`), on which the scorers score it alone. A latent with one
cluster is explained as without this option; one whose clusters are all explained alike is too,
after those requests (the price of a sense the embedding split but the explainer did not).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from assets.prompts import plain_text
from assets.records import LatentRecord
from resources.embedder import unit_vectors

SENSE_CONTEXT_TOKENS = 1
"""Tokens either side of a window's peak that its sense embedding sees."""
DISTINCT_BELOW = 0.5
"""Two clusters may be distinct senses when their windows' mean cosine similarity is below this. Lenient on
purpose: with MiniLM, the peaks of one sense ("(4)", "(7)") are 0.6-0.9 alike, but names of one sense
("Anna", "Paris") only 0.1-0.5, as alike as two senses' peaks; whether clusters are distinct senses is
settled by their explanations (clusters explained alike are one sense)."""
MIN_SENSE_WINDOWS = 3
"""Fewest `train` windows a sense is explained from."""
JOIN = " or "
"""What joins the senses' explanations into the latent's explanation."""


def peak_texts(windows: pd.DataFrame, vocab: list[str]) -> list[str]:
    """Each window's peak token with `SENSE_CONTEXT_TOKENS` tokens either side, as plain text."""
    texts = []
    for row in windows.itertuples():
        peak = int(np.argmax(row.activations))
        tokens = list(row.tokens)[
            max(0, peak - SENSE_CONTEXT_TOKENS) : peak + SENSE_CONTEXT_TOKENS + 1
        ]
        texts.append(plain_text("".join(vocab[t] for t in tokens)))
    return texts


def cluster(vectors: np.ndarray, most: int) -> list[list[int]]:
    """Row indices of each cluster (largest first) of unit `vectors`: average linkage, merged until at most `most`
    clusters and none closer than `DISTINCT_BELOW`; then each cluster under `MIN_SENSE_WINDOWS`, smallest first,
    joins its nearest."""
    similarity = vectors @ vectors.T
    clusters = [[i] for i in range(len(vectors))]

    def linkage(a: list[int], b: list[int]) -> float:
        return float(similarity[np.ix_(a, b)].mean())

    def merge_nearest(i: int) -> None:
        j = max(
            (k for k in range(len(clusters)) if k != i),
            key=lambda k: linkage(clusters[i], clusters[k]),
        )
        clusters[j] += clusters[i]
        del clusters[i]

    while len(clusters) > 1:
        closest, i, j = max(
            (linkage(a, b), i, j)
            for i, a in enumerate(clusters)
            for j, b in enumerate(clusters)
            if i < j
        )
        if len(clusters) <= most and closest < DISTINCT_BELOW:
            break
        clusters[i] += clusters.pop(j)
    while len(clusters) > 1 and min(map(len, clusters)) < MIN_SENSE_WINDOWS:
        merge_nearest(min(range(len(clusters)), key=lambda k: len(clusters[k])))
    return sorted((sorted(c) for c in clusters), key=lambda c: (-len(c), c[0]))


def sense_clusters(record: LatentRecord, most: int, embed) -> list[pd.DataFrame]:
    """The latent's `train` activating windows, one frame per sense (one frame when it has one sense)."""
    train = record.train()
    if most < 2 or len(train) < 2 * MIN_SENSE_WINDOWS:
        return [train]
    if embed is None:
        raise ValueError(
            "[explanations] senses > 1 clusters windows with the deployment's embedder, "
            "and none was given. Fix: give the embedder resource."
        )
    return [
        train.iloc[c] for c in cluster(unit_vectors(embed(peak_texts(train, record.vocab))), most)
    ]


def sense_record(record: LatentRecord, windows: pd.DataFrame) -> LatentRecord:
    """The record as the explainer sees one sense: only that sense's `train` activating windows."""
    others = record.windows[
        ~((record.windows["split"] == "train") & (record.windows["kind"] == "activating"))
    ]
    return replace(record, windows=pd.concat([windows, others]))


def assigned(record: LatentRecord, split: str, senses: list[pd.DataFrame], embed) -> dict[int, int]:
    """Window position within `split` → its cluster, for the `split`'s activating windows: the cluster (of
    `senses`, as `sense_clusters` found them) whose `train` windows are on average most similar."""
    windows = record.windows[record.windows["split"] == split].reset_index(drop=True)
    activating = windows[windows["kind"] == "activating"]
    if len(senses) == 1 or not len(activating):
        return {int(i): 0 for i in activating.index}
    vectors = unit_vectors(
        embed(peak_texts(pd.concat(senses), record.vocab) + peak_texts(activating, record.vocab))
    )
    train, held = vectors[: sum(map(len, senses))], vectors[sum(map(len, senses)) :]
    bounds = np.cumsum([0] + [len(s) for s in senses])
    means = np.stack(
        [(held @ train[bounds[k] : bounds[k + 1]].T).mean(axis=1) for k in range(len(senses))],
        axis=1,
    )
    return {int(i): int(k) for i, k in zip(activating.index, means.argmax(axis=1), strict=False)}


def sense_test_windows(
    record: LatentRecord, clusters: list[pd.DataFrame], senses: list[list[int]], embed
) -> list[list[int]]:
    """Per sense (the clusters it was explained from), the positions within the latent's `test` windows of the
    activating ones nearest it (`assigned`): its positives when each sense is scored on its own windows."""
    cluster_of = assigned(record, "test", clusters, embed)
    return [
        sorted(position for position, cluster in cluster_of.items() if cluster in sense)
        for sense in senses
    ]


def of_current(senses: pd.DataFrame, explanations: pd.DataFrame) -> pd.DataFrame:
    """The `explanation_senses` rows of latents whose current explanation (status ok) is those senses joined by
    `JOIN`: senses of an explanation since replaced (an import, a re-explain with one sense) are left out.
    Keyed by `latent`, and by `shard` where both frames have one (the read side's frames of several shards)."""
    if not len(senses) or not len(explanations):
        return senses.iloc[:0]
    keys = ["shard", "latent"] if "shard" in senses and "shard" in explanations else ["latent"]
    ok = (
        explanations[explanations["status"] == "ok"]
        .drop_duplicates(keys, keep="last")
        .set_index(keys)["explanation"]
    )
    joined = senses.sort_values("sense").assign(
        explanation=lambda f: f["explanation"] + JOIN
    )  # a sum of strings: a Python join per latent took 0.1 s at 5,000 latents
    union = joined.groupby(keys)["explanation"].sum().str.slice(0, -len(JOIN))
    current = union[union.eq(ok.reindex(union.index))].index
    return senses[
        pd.MultiIndex.from_frame(senses[keys]).isin(current)
        if len(keys) > 1
        else senses["latent"].isin(current)
    ]


def lowest_sense_scores(current: pd.DataFrame, scores: pd.DataFrame, metric: str) -> pd.Series:
    """Latent → the lowest `metric` among its senses (`current`: rows of `of_current`) in a scorer's `sense_scores`
    rows, each sense counted only by a score made with its own text; NaN unless every sense has one, since the
    sense left unscored (or scored NaN) could be the lowest. Keyed like `of_current` (`shard` where both have one)."""
    if not len(current) or not len(scores):
        return pd.Series(dtype=float)
    keys = (["shard"] if "shard" in current and "shard" in scores else []) + [
        "latent",
        "sense",
        "explanation",
    ]
    scored = current[keys].merge(
        scores[[*keys, metric]].drop_duplicates(keys, keep="last"), on=keys, how="left"
    )
    by_latent = scored.groupby("latent")[metric]
    return by_latent.min().mask(scored[metric].isna().groupby(scored["latent"]).any())
