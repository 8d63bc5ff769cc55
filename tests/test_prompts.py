import pytest

from assets.prompts import explainer_messages, highlight, parse_explanation, parse_int_list, scaled


def test_highlight_wraps_runs_of_marked_tokens():
    assert highlight(["The", " cat", " sat", " down"], [False, True, True, False]) == "The<< cat sat>> down"
    assert highlight(["a", "b"], [True, True]) == "<<ab>>"


def test_scaled_activations_are_integers_0_to_10():
    assert scaled([0.0, 1.0, 2.0, 4.0], 4.0) == [0, 2, 5, 10]


def test_explainer_prompt_lists_marked_tokens_with_strength():
    user = explainer_messages([([" the", " cat"], [0.0, 2.0])], 2.0)[1]["content"]
    assert "Example 1:  the<< cat>>" in user and "cat (10)" in user


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Explanation: references to cats.", "references to cats"),
        ('[EXPLANATION]: "the word cat"', "the word cat"),
        ("1. Mentions of felines", "Mentions of felines"),
        ("Sure! Here it is.\nExplanation: - animal names\nMore text", "animal names"),
        ("  plural nouns  ", "plural nouns"),
        ("", None),
        ("Explanation: ...", None),
    ],
)
def test_parse_explanation(answer, expected):
    assert parse_explanation(answer) == expected


@pytest.mark.parametrize(
    "answer, n, expected",
    [
        ("[1, 0, 1]", 3, [1, 0, 1]),
        ("Answer: [0,0,1,1,0]", 5, [0, 0, 1, 1, 0]),
        ("Example 1: 1\nExample 2: 0", 2, [1, 0]),
        ("Example 1: yes", 2, None),
        ("1 0 1", 3, [1, 0, 1]),
        ("[1, 2, 0]", 3, None),
        ("I cannot tell", 2, None),
    ],
)
def test_parse_binary_list(answer, n, expected):
    assert parse_int_list(answer, n, 0, 1) == expected


@pytest.mark.parametrize(
    "answer, n, lo, hi, expected",
    [
        ("[0, 10, 3]", 3, 0, 10, [0, 10, 3]),
        ("Token 1: 0\nToken 2: 7", 2, 0, 10, [0, 7]),
        ("[0, 11, 3]", 3, 0, 10, None),
        ("The intruder is [4].", 1, 1, 5, [4]),
        ("[6]", 1, 1, 5, None),
    ],
)
def test_parse_int_list(answer, n, lo, hi, expected):
    assert parse_int_list(answer, n, lo, hi) == expected
