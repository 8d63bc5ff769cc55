"""Builds the one `Definitions`: the assets (one per scorer), the registry sensor, the automation
sensor (on by default, so a fresh instance runs the graph by itself), and the deployment's resources."""
from __future__ import annotations

from dagster import AssetSelection, AutomationConditionSensorDefinition, DefaultSensorStatus, Definitions, define_asset_job

from assets.activations import activations
from assets.corpus import corpus
from assets.exemplars import exemplars
from assets.explanations import explanations
from assets.scorers import SCORERS
from assets.scores import score_summary, scorer_asset, scorer_key
from autointerp_defs.deployments import automated_scorers, resources_for, scorer_settings_for
from autointerp_defs.sensors import registry_sensor

automation_sensor = AutomationConditionSensorDefinition(
    "autointerp_automation",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    description="Runs every asset's automation condition: activations of new coders, then exemplars, explanations, the automated scorers and the summary.",
)


def build_definitions(deployment: str | None = None, scorer_overrides: dict[str, dict] | None = None) -> Definitions:
    """The Definitions of a deployment; `scorer_overrides` ({scorer: {setting: value}}) replace the
    settings file (`$AUTOINTERP_SCORERS`), e.g. in tests."""
    settings = scorer_settings_for(scorer_overrides)
    automated = automated_scorers(deployment)
    scorer_assets = [scorer_asset(SCORERS[name], settings[name], automate=name in automated) for name in SCORERS]
    explain_and_score = define_asset_job(
        "explain_and_score",
        selection=AssetSelection.assets("exemplars", "explanations", *(scorer_key(name) for name in automated)),
        description="Exemplars, explanations and the deployment's automated scorers of one coder × shard partition.",
    )
    return Definitions(
        assets=[corpus, activations, exemplars, explanations, *scorer_assets, score_summary],
        sensors=[registry_sensor, automation_sensor],
        jobs=[explain_and_score],
        resources=resources_for(deployment),
    )


defs = build_definitions()
