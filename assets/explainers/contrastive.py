"""Contrastive (delphi): highlighted windows plus hard-negative counter-examples where the latent is silent."""

from assets.explainers.base import Explainer
from assets.prompts import contrastive_messages
from assets.records import LatentRecord


class Contrastive(Explainer):
    name = "contrastive"
    description = (
        "delphi's contrastive explainer: highlighted windows and similar windows where "
        "the latent does not fire."
    )

    def prompt(self, record: LatentRecord, max_tokens: int):
        counters = [
            [record.vocab[t] for t in row.tokens]
            for row in record.train("non_activating").itertuples()
        ]
        return self.fit_shown(
            record, max_tokens, lambda kept, top: contrastive_messages(kept, counters, top)
        )
