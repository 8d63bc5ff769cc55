"""bench/cost.py's prefix-cache accounting: OpenAI's rule (>= 1,024 tokens, steps of 128) and vLLM's
(whole 16-token blocks, never the whole prompt)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cost_bench():
    spec = importlib.util.spec_from_file_location("cost_bench", ROOT / "bench" / "cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_prompt_is_cached_only_as_far_as_an_earlier_one_began_the_same_in_each_rules_steps():
    cost = cost_bench()
    head = list(range(2000))
    prompts = [head[:1100] + [1] * 50, head[:1100] + [2] * 50, head[:500] + [3] * 10, [9] * 40]
    shared = cost.shared_prefixes(prompts)
    assert shared == [0, 1088, 496, 0]  # 1,100 tokens in common: 68 whole blocks of 16
    assert [cost.cached_openai(s) for s in shared] == [0, 1024, 0, 0]  # 496 is under 1,024
    assert cost.cached_vllm(32, 32) == 16  # the same 32 tokens again: the last block is computed
    counted = cost.account(prompts[:2], [5, 5], discount=0.5)
    assert counted["cached_openai"] == 1024 and counted["cached_vllm"] == 1088
    assert counted["billed"] == 2 * 1150 - 1024 * 0.5 + 10
