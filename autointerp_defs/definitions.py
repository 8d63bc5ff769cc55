"""Builds the one `Definitions` of a deployment (`autointerp_defs/deployments.py`): the assets (one per
scorer plugin; corpus, exemplars and explanations configured by the deployment's stage tables), the
registry sensor, the automation sensor (on by default, so a fresh instance runs the graph by itself),
and the deployment's resources."""

from __future__ import annotations

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    define_asset_job,
)

from assets.activations import activations_asset
from assets.calibration import calibrated_scorers, calibration_asset
from assets.corpus import corpus_asset
from assets.exemplars import exemplars_asset
from assets.explanations import explanations_asset
from assets.scores import scorer_asset, scorer_key, summary_asset
from assets.stage_config import Models
from autointerp_defs.deployments import Deployment, DeploymentError, load_deployment
from autointerp_defs.sensors import registry_sensor_every


def automation_sensor(interval_s: int) -> AutomationConditionSensorDefinition:
    """The sensor that evaluates every asset's automation condition, every `interval_s` seconds."""
    return AutomationConditionSensorDefinition(
        "autointerp_automation",
        target=AssetSelection.all(),
        default_status=DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=interval_s,
        description=(
            "Runs every asset's automation condition: activations of new coders, then exemplars, explanations, "
            "the automated scorers and the summary; and whatever a changed deployment setting made stale."
        ),
    )


def models_of(resources: dict) -> Models:
    """The identity of every model a deployment's resources name: part of the code versions of the stages they shape."""
    subject, llm = resources["subject_model"], resources["llm"]
    return Models(
        subject_model=subject.identity(),
        tokenizer=subject.tokenizer_identity(),
        explainer=llm.identity("explainer"),
        judge=llm.identity("judge"),
        embedder=resources["embedder"].identity(),
    )


def definitions_for(deployment: Deployment) -> Definitions:
    settings = deployment.scorer_settings()
    automated = deployment.automated_scorers
    per_run = deployment.partitions_per_run
    resources = deployment.resources()
    models = models_of(resources)
    try:
        stages = [
            corpus_asset(deployment.stage("corpus"), models),
            activations_asset(models),
            exemplars_asset(
                deployment.stage("exemplars"),
                per_run,
                models,
                reseed_latents=deployment.stage("explanations").get("stability_latents", 0),
            ),
            explanations_asset(
                deployment.stage("explanations"), deployment.explainers, per_run, models
            ),
        ]
    except ValueError as error:
        raise DeploymentError(f"{deployment.path}: {error}") from None
    scorer_assets = [
        scorer_asset(
            scorer,
            settings[name],
            automate=name in automated,
            partitions_per_run=per_run,
            models=models,
        )
        for name, scorer in deployment.scorers.items()
    ]
    explain_and_score = define_asset_job(
        "explain_and_score",
        selection=AssetSelection.assets(
            "exemplars", "explanations", *(scorer_key(name) for name in automated)
        ),
        description="Exemplars, explanations and the deployment's automated scorers of one coder × shard partition.",
    )
    calibration = calibration_asset(
        deployment.stage("exemplars"),
        deployment.stage("explanations"),
        deployment.explainers,
        calibrated_scorers(deployment.scorers, automated),
        settings,
        models,
    )
    return Definitions(
        assets=[*stages, *scorer_assets, summary_asset(deployment.scorers), calibration],
        sensors=[
            registry_sensor_every(deployment.sensor_interval_s),
            automation_sensor(deployment.sensor_interval_s),
        ],
        jobs=[explain_and_score],
        resources=resources,
        executor=cluster_executor(deployment),
    )


def cluster_executor(deployment: Deployment):
    """The celery executor for a deployment with a `[cluster]` table, else None (Dagster's default: steps in
    subprocesses of the run). Imported here because only a cluster needs the `cluster` extra (dagster-celery)."""
    if deployment.cluster is None:
        return None
    from autointerp_defs.cluster import executor_for

    return executor_for(deployment)


def build_definitions(deployment: str | None = None, overrides: dict | None = None) -> Definitions:
    """The Definitions of a deployment (a name in deployments/, a TOML path, or `$AUTOINTERP_DEPLOYMENT`),
    with `overrides` in the file's layout on top (e.g. `{"scorers": {"fuzzing": {"examples_per_prompt": 4}}}`)."""
    return definitions_for(load_deployment(deployment, overrides))


defs = build_definitions()
