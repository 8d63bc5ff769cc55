"""Every latent accounted for: a coder built so that the buckets of its first shard are known (dead, too rare,
explained, failed for known reasons), run through the real stages with a scripted LLM, and every place that
shows the counts (explanations and score_summary metadata, `autointerp scores`, the browser) agrees."""

from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from dagster import DagsterInstance

from assets.accounting import (
    NO_REASON,
    NOT_ASKED_CAP,
    NOT_ASKED_NEWER,
    NOT_EXPLAINED_YET,
    accounting_lines,
    coder_accounting,
)
from assets.partitions import shard_partition_keys
from assets.scorers import SCORERS
from autointerp_defs.cli import print_scores
from autointerp_defs.readside.app import Viewer
from resources.embedder import EmbedderResource
from resources.llm import REQUEST_FAILED, UNREADABLE
from resources.settings import AutointerpSettings
from resources.sparse_coders import save_sparsify
from resources.subject_model import SubjectModelResource
from storage.activations import load_latent_stats, save_latent_stats, write_cache_meta
from storage.corpus import load_corpus
from storage.layout import DataRoot
from storage.store import TableStore
from tests.conftest import TINY_CORPUS_CONFIG, TINY_EXEMPLARS_CONFIG, TINY_HOOKPOINT, run
from tests.conftest import llm_resource as resource
from tests.scripted_llm_server import ScriptedLLMServer, answer_by_prompt

CODER = f"acct/{TINY_HOOKPOINT}"
PER_SHARD = 10
DEAD = [0, 1, 2]  # encoder bias -1e6: never fire
# fire on exactly this many tokens: fewer windows than min_activating_windows (6)
RARE = {3: 1, 4: 2}
# the tiny SAE's most frequent latents, moved here: each fires in 6 windows or more
FREQUENT = [5, 6, 7, 8, 9]
MAX_LATENTS = 4  # latents 5..8 are asked, 9 is past the cap
EXEMPLARS = {**TINY_EXEMPLARS_CONFIG, "non_activating_sources": ["random"]}


def hidden_states(subject, corpus, coder) -> torch.Tensor:
    """The hookpoint's activations of every cached token, batched as the activations stage batches them."""
    first = 1 if corpus.meta["add_bos"] else 0  # the stage skips BOS
    tokens = torch.from_numpy(corpus.tokens).long()
    site = (coder.hookpoint, coder.reads)
    parts = [
        subject.capture(tokens[i : i + 8], {site})[site][:, first:].reshape(-1, coder.d_in).float()
        for i in range(0, len(tokens), 8)
    ]
    return torch.cat(parts)


def known_coder(tiny_sae, hidden: torch.Tensor):
    """The tiny SAE with its first shard rebuilt: DEAD never fire; each RARE latent reads one direction and
    fires (far above any other latent) exactly on the tokens that project highest on it; FREQUENT are the
    SAE's own most frequent latents, swapped in (a permutation changes nothing else)."""
    counts = torch.bincount(tiny_sae.encode(hidden).latents, minlength=tiny_sae.width)
    frequent = [int(i) for i in counts.argsort(descending=True)[: len(FREQUENT)]]
    assert counts[frequent].min() >= 200  # >= 200 tokens are >= 13 windows of 16 tokens
    order = [i for i in range(tiny_sae.width) if i not in frequent]
    order[FREQUENT[0] : FREQUENT[0]] = frequent
    coder = dataclasses.replace(
        tiny_sae,
        name="acct",
        encoder_weight=tiny_sae.encoder_weight[order].clone(),
        encoder_bias=tiny_sae.encoder_bias[order].clone(),
        decoder_weight=tiny_sae.decoder_weight[order].clone(),
    )
    coder.encoder_bias[DEAD] = -1e6
    centred = hidden - coder.decoder_bias if coder.subtract_decoder_bias else hidden
    for latent, n in RARE.items():
        direction = centred[100 * latent] - centred.mean(0)
        direction /= direction.norm()
        projection = (centred @ direction).sort(descending=True).values
        gap = float(projection[n - 1] - projection[n])
        assert gap > 1e-2 * float(projection[0].abs())  # far above the recomputation's rounding
        scale = 2e3 / gap  # every firing token at >= 1e3, far above the SAE's own pre-activations
        coder.encoder_weight[latent] = scale * direction
        coder.encoder_bias[latent] = -scale * float(projection[n - 1] + projection[n]) / 2
        # its large activation must add next to nothing to the reconstruction (FVU)
        coder.decoder_weight[latent] *= 1e-6
    return coder


class FailingExplainer:
    """Scorers' questions answered well; of the explainer's, the first distinct prompt gets an empty answer
    every time (unreadable), the second HTTP 400 (a failed request), the others an explanation."""

    def __init__(self):
        self.fates: dict[str, object] = {}
        self.lock = threading.Lock()

    def __call__(self, messages):
        answer = answer_by_prompt(messages)
        if not answer.startswith("Explanation:"):
            return answer
        with self.lock:  # the re-asked turn starts with the same two messages: the same fate
            fate = self.fates.setdefault(
                json.dumps(messages[:2]), ["", 400, "ok"][min(len(self.fates), 2)]
            )
        return answer if fate == "ok" else fate


@pytest.mark.slow(90)
def test_every_latent_of_a_coder_is_in_one_bucket_with_its_reason(tmp_path, tiny_sae, capsys):
    root = DataRoot.at(tmp_path)
    instance = DagsterInstance.ephemeral()
    subject = SubjectModelResource(batch_size=8)  # as the stage batches (`hidden_states`)
    with ScriptedLLMServer(FailingExplainer()) as server:
        resources = {
            "settings": AutointerpSettings(
                data_dir=str(tmp_path),
                max_latents_per_shard=MAX_LATENTS,
                latents_per_shard=PER_SHARD,
            ),
            "subject_model": subject,
            "llm": resource(server),
            "embedder": EmbedderResource(),
        }
        corpus = {"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}}
        run(["corpus"], None, resources, instance, corpus)
        coder = known_coder(tiny_sae, hidden_states(subject, load_corpus(root), tiny_sae))
        save_sparsify(coder, root.registry_dir / CODER)
        keys = shard_partition_keys(CODER, coder.width, PER_SHARD)
        instance.add_dynamic_partitions("shard", keys)
        first, second = keys[0], keys[1]
        run(["activations"], first, resources, instance)
        count = load_latent_stats(root.latent_stats_path(CODER))["count"]
        assert count[DEAD].tolist() == [0, 0, 0]
        assert [int(count[latent]) for latent in RARE] == list(RARE.values())
        assert (count[FREQUENT] >= 190).all()
        for partition in (first, second):
            run(
                ["exemplars"],
                partition,
                resources,
                instance,
                {"ops": {"exemplars": {"config": EXEMPLARS}}},
            )
        explained = run(["explanations", "scores/detection"], first, resources, instance)
        summary = run(["score_summary"], None, resources, instance)

    shard = {
        "latents": 10,
        "dead": 3,
        "live": 7,
        "min_activating_windows": 6,
        "too_rare": 2,
        "awaiting_exemplars": 0,
        "explainable": 5,
        "explained": 2,
        "failed": 3,
        "failed_by_reason": {f"{NOT_ASKED_CAP} ({MAX_LATENTS})": 1},
    }
    said = explained.asset_materializations_for_node("explanations")[0].metadata
    found = said["latent_accounting"].value
    reasons = found.pop("failed_by_reason")
    assert found == {k: v for k, v in shard.items() if k != "failed_by_reason"}
    assert reasons.pop(f"{NOT_ASKED_CAP} ({MAX_LATENTS})") == 1
    assert reasons == {REQUEST_FAILED: 1, UNREADABLE: 1}  # by kind; the HTTP 400 is in the table

    store = TableStore(root)
    print_scores(store, CODER, {"detection": SCORERS["detection"]}, as_json=True)
    whole = json.loads(capsys.readouterr().out)["accounting"]
    assert whole["shards"]["000"] == {
        **shard,
        "failed_by_reason": {**shard["failed_by_reason"], **reasons},
    }
    second_shard = whole["shards"]["001"]
    assert second_shard["failed_by_reason"] == {NOT_EXPLAINED_YET: second_shard["explainable"]}
    assert second_shard["explained"] == 0 and second_shard["min_activating_windows"] == 6
    # the other shards have no exemplars: their live latents await them
    rest = [s for key, s in whole["shards"].items() if key not in ("000", "001")]
    assert all(s["awaiting_exemplars"] == s["live"] and s["explainable"] == 0 for s in rest)
    # they add up: per shard to its latents, per coder to the width
    assert len(whole["shards"]) == 116 and whole["latents"] == coder.width == 1152
    for part in [whole, *whole["shards"].values()]:
        assert part["dead"] + part["live"] == part["latents"]
        assert part["live"] == part["too_rare"] + part["awaiting_exemplars"] + part["explainable"]
        assert part["explainable"] == part["explained"] + part["failed"]
        assert part["failed"] == sum(part["failed_by_reason"].values())
    assert whole["dead"] == int((count == 0).sum()) and whole["live"] == int((count > 0).sum())
    assert whole["min_activating_windows"] == [6]

    totals = {k: v for k, v in whole.items() if k != "shards"}
    meta = summary.asset_materializations_for_node("score_summary")[0].metadata
    assert meta["latent_accounting"].value == {CODER: totals}
    assert Viewer(store).coders()["coders"][0]["accounting"] == totals

    print_scores(store, CODER, {"detection": SCORERS["detection"]})
    text = capsys.readouterr().out
    for line in accounting_lines(totals):
        assert line in text
    assert "min_activating_windows = 6): " in text
    assert f"failed, {NOT_ASKED_CAP} ({MAX_LATENTS}): 1" in text


def test_latents_not_asked_since_the_exemplars_changed_or_failed_without_a_reason_say_so(tmp_path):
    """Shard 00: latent 0 dead, 1 too rare, 2 failed with no error stored, 3 not asked because the
    explanations were made from older exemplars (they hold latent 5, which has none now); shard 01: three
    dead and one waiting for its exemplars, threshold not recorded."""
    root = DataRoot.at(tmp_path)
    store = TableStore(root)
    write_cache_meta(
        root.activations_dir("c/h"), {"width": 8, "latents_per_shard": 4, "n_shards": 2}
    )
    count = np.array([0, 3, 9, 9, 0, 0, 0, 5])
    save_latent_stats(root.latent_stats_path("c/h"), count, np.ones(8), np.ones(8), 100)
    root.exemplars_path("c/h", "00").parent.mkdir(parents=True)
    pd.DataFrame({"latent": [2, 2, 3]}).to_parquet(root.exemplars_path("c/h", "00"))
    store.record_exemplars_threshold("c/h", "00", 6)
    root.explanations_path("c/h", "00").parent.mkdir(parents=True)
    pd.DataFrame({"latent": [2, 5], "status": ["failed", "ok"], "error": ["", ""]}).to_parquet(
        root.explanations_path("c/h", "00")
    )
    found = coder_accounting(store, "c/h")
    first, second = found["shards"]["00"], found["shards"]["01"]
    assert first == {
        "latents": 4,
        "dead": 1,
        "live": 3,
        "min_activating_windows": 6,
        "too_rare": 1,
        "awaiting_exemplars": 0,
        "explainable": 2,
        "explained": 0,
        "failed": 2,
        "failed_by_reason": {NO_REASON: 1, NOT_ASKED_NEWER: 1},
    }
    assert second["dead"] == 3 and second["awaiting_exemplars"] == 1 and second["explainable"] == 0
    assert second["min_activating_windows"] is None
    assert (found["latents"], found["dead"], found["live"], found["failed"]) == (8, 4, 4, 2)
    assert found["min_activating_windows"] == [6]
    assert (
        "  too rare (fewer activating windows than [exemplars] min_activating_windows = "
        "not recorded): 0"
    ) in accounting_lines(second)
