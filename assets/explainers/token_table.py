"""Token table (OpenAI): every token of each window listed with its 0-10 activation."""

from assets.explainers.base import Explainer
from assets.prompts import token_table_messages
from assets.records import LatentRecord


class TokenTable(Explainer):
    name = "token_table"
    description = "OpenAI's explainer: every token of each window with its 0-10 activation."

    def prompt(self, record: LatentRecord, max_tokens: int):
        return self.fit_shown(record, max_tokens, token_table_messages)
