"""Highlighted (delphi's default): activating tokens marked in their windows, strengths listed."""

from assets.explainers.base import Explainer
from assets.prompts import explainer_messages
from assets.records import LatentRecord


class Highlighted(Explainer):
    name = "highlighted"
    description = "delphi's default: the activating windows with their firing tokens marked and strengths listed."

    def prompt(self, record: LatentRecord, max_tokens: int):
        return self.fit_shown(record, max_tokens, explainer_messages)
