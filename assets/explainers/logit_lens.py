"""Logit lens (VocabProj, Gur-Arieh et al. 2025): the tokens the latent's decoder direction promotes and
suppresses through the final norm and the unembedding (`resources/logit_lens.py`). Describes what the
latent writes, not what it reads; no exemplar is shown."""
from pydantic import Field

from assets.explainers.base import Explainer, ExplainerSettings, LatentRecord
from resources.output_evidence import logit_lens_messages, vocab_proj_evidence


class LogitLensSettings(ExplainerSettings):
    k: int = Field(default=10, ge=1, le=100, description="Tokens shown on each side (promoted, suppressed).")


class LogitLens(Explainer):
    name = "logit_lens"
    description = "VocabProj: the tokens the latent's decoder direction promotes and suppresses through the unembedding."
    Settings = LogitLensSettings
    uses = frozenset({"subject_model", "coder"})

    def prompt(self, record: LatentRecord, max_tokens: int):
        evidence = vocab_proj_evidence(self.deps.coder, self.deps.subject_model.causal_lm(), [record.latent], self.settings.k)[record.latent]
        messages = logit_lens_messages(evidence, record.vocab)
        return (messages if self.deps.llm.fits(messages, max_tokens) else None), 0
