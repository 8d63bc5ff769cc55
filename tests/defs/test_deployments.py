"""One configuration rule: a deployment is one TOML file read in one place; a changed stage setting
re-runs exactly what it affects; plugins are one file each; nothing else reads the environment."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from dagster import DagsterInstance, evaluate_automation_conditions, materialize

from autointerp_defs.definitions import build_definitions
from autointerp_defs.deployments import DEPLOYMENTS_DIR, DeploymentError, load_deployment
from storage.layout import DataRoot
from tests.conftest import TINY_CODER, add_coders, make_resources, pipeline_until_exemplars
from tests.conftest import llm_resource as resource
from tests.scripted_llm_server import ScriptedLLMServer

PARTITION = f"{TINY_CODER}|00"
REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("assets", "resources", "storage", "autointerp_defs")


def judge(messages):
    user = messages[-1]["content"]
    if "Description" not in user:
        return "Explanation: a scripted explanation"
    return str([i % 2 for i in range(user.count("\nExample "))])


def requested(evaluation, defs) -> set[str]:
    """Assets whose partition PARTITION the automation tick asked to run."""
    keys = defs.resolve_asset_graph().get_all_asset_keys()
    return {
        key.to_user_string()
        for key in keys
        if PARTITION in {str(p) for p in evaluation.get_requested_partitions(key)}
    }


def test_changing_the_explainer_reruns_explanations_and_the_scores_below_and_resends_only_changed_prompts(
    registered,
):
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    pipeline_until_exemplars(registered, instance)
    scorers = [
        "scores/detection",
        "scores/embedding",
        "scores/fuzzing",
    ]  # the local deployment's automated scorers
    before = build_definitions("local")
    with ScriptedLLMServer(judge) as server:
        resources = make_resources(registered, max_latents=3, llm=resource(server))
        assert materialize(
            list(before.assets),
            selection=["explanations", *scorers],
            partition_key=PARTITION,
            resources=resources,
            instance=instance,
        ).success
        sent_before = len(server.requests)
        settled = evaluate_automation_conditions(defs=before, instance=instance)

        after = build_definitions("local", {"explanations": {"explainer": "token_table"}})
        graph_before, graph_after = before.resolve_asset_graph(), after.resolve_asset_graph()
        changed = {
            k.to_user_string()
            for k in graph_after.get_all_asset_keys()
            if graph_after.get(k).code_version != graph_before.get(k).code_version
        }
        assert changed == {"explanations"}

        first = evaluate_automation_conditions(defs=after, instance=instance, cursor=settled.cursor)
        assert requested(first, after) == {
            "explanations",
            *scorers,
        }  # explanations and the scores below, in one run; nothing else
        assert materialize(
            list(after.assets),
            selection=["explanations", *scorers],
            partition_key=PARTITION,
            resources=resources,
            instance=instance,
        ).success
        explainer_requests = [
            r
            for r in server.requests[sent_before:]
            if "Description" not in r["messages"][-1]["content"]
        ]
        assert len(explainer_requests) == 3 and all(
            "one token per line" in r["messages"][0]["content"] for r in explainer_requests
        )
        # the token-table explainer wrote the same explanations, so every judge prompt is unchanged: none re-sent
        assert len(server.requests) == sent_before + len(explainer_requests)
    table = pd.read_parquet(DataRoot.at(registered).explanations_path(TINY_CODER, "00"))
    assert set(table["explainer"]) == {"token_table"}


TOY_SCORER = '''
"""A toy scorer: does any word of the explanation appear in the window? No LLM."""
from assets.scorers.base import Job, JobResult, Scorer, ScorerSettings, example_row
from assets.prompts import plain_text


class WordMatchSettings(ScorerSettings):
    min_length: int = 3


class WordMatch(Scorer):
    name = "word_match"
    description = "Toy: 1 where a word of the explanation appears in the window."
    Settings = WordMatchSettings
    main_metric = "accuracy"

    async def score(self, job: Job) -> JobResult:
        words = {w for w in job.explanation.lower().split() if len(w) >= self.settings.min_length}
        return JobResult(
            [
                example_row(e, prediction=int(any(w in plain_text(e.text).lower() for w in words)))
                for e in job.examples
            ]
        )
'''

TOY_EXPLAINER = '''
"""A toy explainer: asks for the name of the strongest tokens only."""
from assets.explainers.base import Explainer
from assets.records import LatentRecord


class StrongestTokens(Explainer):
    name = "strongest_tokens"
    description = "Toy: the strongest token of each window, nothing else."

    def prompt(self, record: LatentRecord, max_tokens: int):
        examples, _ = record.shown_examples()
        strongest = [tokens[max(range(len(acts)), key=acts.__getitem__)] for tokens, acts in examples]
        return [{"role": "user", "content": "TOY: what do these tokens share? " + " | ".join(strongest)}], 0
'''


def test_a_toy_scorer_and_a_toy_explainer_are_one_file_each_and_materialize_with_no_other_edit(
    registered, tmp_path, monkeypatch
):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "toy_scorer.py").write_text(TOY_SCORER)
    (plugins / "toy_explainer.py").write_text(TOY_EXPLAINER)
    monkeypatch.syspath_prepend(str(plugins))
    deployment = tmp_path / "toy.toml"
    deployment.write_text(
        (DEPLOYMENTS_DIR / "local.toml")
        .read_text()
        .replace("plugins = []", 'plugins = ["toy_scorer", "toy_explainer"]')
        .replace('explainer = "highlighted"', 'explainer = "strongest_tokens"')
    )
    defs = build_definitions(str(deployment), {"settings": {"data_dir": str(registered)}})
    assert {"scores/word_match", "explanations"} <= {a.key.to_user_string() for a in defs.assets}
    instance = DagsterInstance.ephemeral()
    add_coders(instance, registered, TINY_CODER)
    pipeline_until_exemplars(registered, instance)
    with ScriptedLLMServer(lambda m: "Explanation: the word the") as server:
        resources = make_resources(registered, max_latents=3, llm=resource(server))
        result = materialize(
            list(defs.assets),
            selection=["explanations", "scores/word_match"],
            partition_key=PARTITION,
            resources=resources,
            instance=instance,
        )
    assert result.success
    assert server.requests and all(
        r["messages"][-1]["content"].startswith("TOY:") for r in server.requests
    )
    root = DataRoot.at(registered)
    assert set(pd.read_parquet(root.explanations_path(TINY_CODER, "00"))["explainer"]) == {
        "strongest_tokens"
    }
    scores = pd.read_parquet(root.scores_path(TINY_CODER, "00", "word_match"))
    assert len(scores) == 3 and scores["accuracy"].notna().all() and "control_accuracy" in scores
    metadata = result.asset_materializations_for_node("scores__word_match")[0].metadata
    assert metadata["main_metric"].value == "accuracy" and json.loads(
        json.dumps(metadata["settings"].value)
    ) == {"seed": 0, "min_length": 3}


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"subject_model": {"model": ""}},
            r"mine\.toml: subject_model\.model must be set \(it is empty\)\. Fix",
        ),
        ({"scorer": {}}, r"mine\.toml: unknown key\(s\) \['scorer'\]\. Fix"),
        (
            {"llm": {"max_concurrency": "many"}},
            r"mine\.toml: \[llm\] max_concurrency = 'many': Input should be a valid integer.*Fix",
        ),
        (
            {"exemplars": {"n_examples_tran": 3}},
            r"mine\.toml: \[exemplars\] has unknown key\(s\) \['n_examples_tran'\]",
        ),
        (
            {"explanations": {"explainer": "highlited"}},
            r"mine\.toml: \[explanations\] explainer = 'highlited' is not an explainer\. "
            r"Fix: use one of \['contrastive'",
        ),
        (
            {"corpus": {"sources": [{"source": "a.txt", "weight": 0}, {"source": "b.txt"}]}},
            r"mine\.toml: \[corpus\] sources = .*corpus\.sources\[0\]\.weight = 0\.0: "
            r"a weight must be above 0.*Fix: give it a positive weight",
        ),
        (
            {"automated_scorers": ["fuzing"]},
            r"mine\.toml: automated_scorers names unknown scorer\(s\) \['fuzing'\]",
        ),
        (
            {"plugins": ["no_such_module"]},
            r"mine\.toml: Cannot import the plugin module 'no_such_module'",
        ),
    ],
)
def test_a_missing_or_bad_value_stops_with_the_key_and_the_file(tmp_path, change, message):
    path = tmp_path / "mine.toml"
    path.write_text((DEPLOYMENTS_DIR / "local.toml").read_text())
    with pytest.raises(DeploymentError, match=message) as error:
        build_definitions(str(path), change)
    assert "\n" not in str(error.value)


def test_the_gpu_deployment_names_the_model_it_needs_instead_of_a_key_error():
    with pytest.raises(DeploymentError, match=r"gpu\.toml: subject_model\.model must be set"):
        load_deployment("gpu")


def test_an_unknown_deployment_lists_the_known_ones(monkeypatch):
    monkeypatch.setenv("AUTOINTERP_DEPLOYMENT", "laptop")
    with pytest.raises(
        DeploymentError,
        match=r"AUTOINTERP_DEPLOYMENT='laptop'.*\['cluster', 'gpu', 'local', 'remote'\]",
    ):
        load_deployment()


def test_every_shipped_deployment_but_gpu_loads_and_gpu_loads_once_its_model_is_named():
    for name in ("local", "remote"):
        assert build_definitions(name).resolve_asset_graph().get_all_asset_keys()
    assert build_definitions(
        "gpu", {"subject_model": {"model": "embedded"}, "embedder": {"device": "cpu"}}
    )


DAGSTER_INTERNALS_ALLOWED = {
    "assets/partitions.py": (
        "the key of an output that lets a ranged run's next stage start without a second, "
        "metadata-less materialization per shard (Dagster's own key for that case; "
        "test_backfill.py checks one record per shard), and the materialization a shard's logged "
        "check result is of (as Dagster links the results it logs itself; test_blocking_checks.py)"
    ),
    "tests/defs/test_backfill.py": "drives Dagster's backfill daemon in-process, which has no public API",
    "autointerp_defs/cluster.py": (
        "a worker loads the definitions before Celery forks exactly as a step reconstructs them "
        "(ReconstructableRepository), so its pool processes start with them; no public API builds "
        "that object"
    ),
    "tests/cluster/test_worker.py": (
        "checks that a forked step's own reconstruction finds the definitions the worker loaded"
    ),
    "bench/cluster.py": (
        "launches ranged runs the way the daemon does, which Dagster's CLI refuses for multi-run "
        "backfill policies"
    ),
}
"""Where a Dagster internal is imported on purpose: an upgrade that moves it fails at import, not silently."""


def test_only_the_deployment_module_reads_the_environment_and_nothing_uses_dagster_internals():
    readers, internals = [], []
    for path in [
        p for package in (*PACKAGES, "tests", "bench") for p in (REPO / package).rglob("*.py")
    ]:
        text = path.read_text()
        relative = str(path.relative_to(REPO))
        if (
            path.relative_to(REPO).parts[0] in PACKAGES
            and re.search(r"os\.environ|os\.getenv|getenv\(", text)
            and relative != "autointerp_defs/deployments.py"
        ):
            readers.append(relative)
        if (
            re.search(r"^\s*(from|import) dagster\._", text, re.MULTILINE)
            and relative not in DAGSTER_INTERNALS_ALLOWED
        ):
            internals.append(relative)
    assert not readers, f"read the environment outside autointerp_defs/deployments.py: {readers}"
    assert not internals, f"import Dagster internals: {internals}"


def test_both_sensors_tick_every_sensor_interval_s_dagsters_30_by_default():
    for overrides, seconds in ((None, 30), ({"settings": {"sensor_interval_s": 5}}, 5)):
        defs = build_definitions("local", overrides)
        assert {
            defs.resolve_sensor_def(name).minimum_interval_seconds
            for name in ("sparse_coder_registry", "autointerp_automation")
        } == {seconds}
    with pytest.raises(DeploymentError, match=r"sensor_interval_s"):
        build_definitions("local", {"settings": {"sensor_interval_s": 0}})
