"""Top tokens (OpenAI's token-space explainer): the vocabulary tokens with the highest mean activation."""

from assets.explainers.base import Explainer
from assets.prompts import top_tokens_messages
from assets.records import LatentRecord


class TopTokens(Explainer):
    name = "top_tokens"
    description = (
        "OpenAI's token-space explainer: the tokens on which the latent fires most on average."
    )

    def prompt(self, record: LatentRecord, max_tokens: int):
        stats = record.stats
        if not stats or not len(stats["top_tokens"]):
            raise ValueError("no token fires this latent twice: top_tokens has nothing to show")
        tokens = list(
            zip(
                [record.vocab[t] for t in stats["top_tokens"]],
                stats["top_token_mean_activation"],
                strict=False,
            )
        )
        return self.deps.llm.fitting(
            lambda kept: top_tokens_messages([t for t, _ in kept], [float(a) for _, a in kept]),
            tokens,
            max_tokens,
        )
