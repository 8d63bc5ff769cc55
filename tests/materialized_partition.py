"""A materialized partition for the viewer and export tests: the tiny SAE of `tests/conftest.py` run
through every stage on shard 00 with `dagster.materialize`, built once per test session.

The explainer and judge are a scripted endpoint that reads its prompts literally: it explains a
latent by the token most often marked in its windows ("the token 'X'", and a second best-of-N
candidate "text around 'X'"), and as a simulator predicts 10 on exactly the tokens that explanation
names. So explanations mean something that search can find, and the simulator's per-token
predictions can be checked against the windows they came from.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from dagster import DagsterInstance, materialize

from tests.conftest import (
    TINY_CODER,
    TINY_CORPUS_CONFIG,
    TINY_EXEMPLARS_CONFIG,
    add_coders,
    made_once,
    make_resources,
)
from tests.scripted_llm_server import ScriptedLLMServer, answer_by_prompt

SCORERS = ("detection", "fuzzing", "embedding", "simulation")
MAX_LATENTS = 4
_BUILT: dict[str, Materialized] = {}
_LOCK = threading.RLock()  # built_once holds it around build


@dataclass
class Materialized:
    root: Path
    coder: str
    shard: str
    metadata: dict[str, dict]
    """Asset node → the metadata of its materialization (explanations, score_summary)."""


class LiteralJudge:
    """Explains by the most often marked token; simulates by predicting 10 where that token stands."""

    def __init__(self):
        self.asked = collections.Counter()

    def __call__(self, messages):
        prompt = messages[-1]["content"]
        simulated = re.search(
            r"Description: (.*?)\n\nTokens:\n(.*?)\n\nAnswer with (\d+) integers", prompt, re.S
        )
        if simulated:
            named = re.search(r"'(.+)'", simulated.group(1))
            tokens = [
                re.sub(r'^\d+\t"(.*)"$', r"\1", line) for line in simulated.group(2).split("\n")
            ]
            word = named.group(1).strip() if named else None
            return str([10 if word and t.strip() == word else 0 for t in tokens])
        if "Answer with" in prompt:
            return answer_by_prompt(messages)
        marked = collections.Counter(
            m.strip() for m in re.findall(r"<<(.*?)>>", prompt) if m.strip()
        )
        if not marked:
            return answer_by_prompt(messages)
        word = marked.most_common(1)[0][0]
        self.asked[prompt] += 1
        return (
            f"Explanation: the token '{word}'"
            if self.asked[prompt] == 1
            else f"Explanation: text around '{word}'"
        )


def built_once(config, tmp_path_factory, tiny_sae) -> Materialized:
    """`build` in the session's temporary folder; under pytest-xdist one worker builds it where the workers share a
    folder (`made_once`) and every worker, that one too, gets a copy of its own, since tests write under the root
    (the latent browser's caches) and some check that nothing else did."""
    if not hasattr(config, "workerinput"):
        return build(tmp_path_factory.mktemp("materialized"), tiny_sae)
    with _LOCK:
        if "copy" not in _BUILT:
            shared = tmp_path_factory.getbasetemp().parent / "materialized"
            built = made_once(
                config, tmp_path_factory, "materialized", lambda: build(shared, tiny_sae)
            )
            copy = tmp_path_factory.mktemp("materialized") / "root"
            shutil.copytree(built.root, copy)
            _BUILT["copy"] = dataclasses.replace(built, root=copy)
        return _BUILT["copy"]


def build(root: Path, tiny_sae) -> Materialized:
    """Register the tiny SAE under `root` and materialize corpus → score_summary for partition
    `<tiny coder>|00` (once per session)."""
    from autointerp_defs.definitions import build_definitions
    from resources.llm import LLMResource
    from resources.sparse_coders import save_sparsify

    with _LOCK:
        if "built" in _BUILT:
            return _BUILT["built"]
        save_sparsify(tiny_sae, root / "registry" / "tiny-topk" / "model.layers.3")
        assets = list(build_definitions("local").assets)
        instance = DagsterInstance.ephemeral()
        add_coders(instance, root, TINY_CODER)
        with ScriptedLLMServer(LiteralJudge()) as server:
            llm = LLMResource(
                backend="openai",
                base_url=server.base_url,
                model="scripted-judge",
                max_concurrency=4,
            )
            resources = make_resources(root, max_latents=MAX_LATENTS, llm=llm)

            def run(selection, partition, config=None):
                result = materialize(
                    assets,
                    selection=selection,
                    partition_key=partition,
                    resources=resources,
                    instance=instance,
                    run_config=config or {},
                )
                assert result.success, selection
                return result

            def metadata(result, node):
                return {
                    k: v.value
                    for k, v in result.asset_materializations_for_node(node)[0].metadata.items()
                }

            run(["corpus"], None, {"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}})
            run(["activations"], f"{TINY_CODER}|00")  # caches the whole coder
            shard = run(
                ["exemplars", "explanations", *(f"scores/{s}" for s in SCORERS)],
                f"{TINY_CODER}|00",
                {
                    "ops": {
                        "exemplars": {"config": TINY_EXEMPLARS_CONFIG},
                        "explanations": {"config": {"best_of_n": 2}},
                    }
                },
            )
            summary = run(["score_summary"], None)  # one asset over every coder
        _BUILT["built"] = Materialized(
            root,
            TINY_CODER,
            "00",
            {
                "explanations": metadata(shard, "explanations"),
                "score_summary": metadata(summary, "score_summary"),
            },
        )
        return _BUILT["built"]
