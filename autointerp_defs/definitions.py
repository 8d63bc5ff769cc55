"""Builds the one `Definitions`: the five assets, the registry sensor, and the deployment's resources."""
from __future__ import annotations

from dagster import Definitions, define_asset_job

from assets.activations import activations
from assets.corpus import corpus
from assets.exemplars import exemplars
from assets.explanations import explanations
from assets.scores import scores
from autointerp_defs.deployments import resources_for
from autointerp_defs.sensors import registry_sensor

explain_and_score_job = define_asset_job(
    "explain_and_score",
    selection=["exemplars", "explanations", "scores"],
    description="Exemplars, explanations and scores of one coder × shard partition.",
)

defs = Definitions(
    assets=[corpus, activations, exemplars, explanations, scores],
    sensors=[registry_sensor],
    jobs=[explain_and_score_job],
    resources=resources_for(),
)
