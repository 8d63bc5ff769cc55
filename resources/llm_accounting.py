"""What a materialization asked of its LLM and what it cost (`Ledger`), and the budget that stops it."""

from __future__ import annotations

from dataclasses import dataclass


class BudgetExceeded(RuntimeError):
    """The request or cost budget of this materialization is spent; finished work is kept."""


@dataclass
class Ledger:
    """What a materialization asked of its LLM, what it cost, and whether its budget allows more."""

    prices_per_million: tuple[float, float] | None = None
    """(prompt, completion) price per million tokens; None = cost unknown."""
    max_requests: int | None = None
    max_cost: float | None = None
    requests: int = 0
    cache_hits: int = 0
    failures: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def cost(self) -> float | None:
        if self.prices_per_million is None:
            return None
        prompt_price, completion_price = self.prices_per_million
        return (self.prompt_tokens * prompt_price + self.completion_tokens * completion_price) / 1e6

    def check_budget(self) -> None:
        if self.max_requests is not None and self.requests >= self.max_requests:
            raise BudgetExceeded(f"request budget of {self.max_requests} reached")
        if self.max_cost is not None and (self.cost or 0.0) >= self.max_cost:
            raise BudgetExceeded(f"cost budget of {self.max_cost} reached")

    def as_metadata(self) -> dict:
        out = {
            f"llm_{name}": getattr(self, name)
            for name in (
                "requests",
                "cache_hits",
                "failures",
                "retries",
                "prompt_tokens",
                "completion_tokens",
            )
        }
        if self.cost is not None:
            out["llm_cost"] = round(self.cost, 6)
        return out
