import pytest

from assets.prompts import (
    DOCUMENT_BOUNDARY,
    explainer_messages,
    highlight,
    parse_explanation,
    parse_int_list,
    plain_text,
    prompt_vocab,
    scaled,
    simulation_messages,
    visible_token,
)
from resources.llm import Refusal


def test_highlight_wraps_runs_of_marked_tokens():
    assert (
        highlight(["The", " cat", " sat", " down"], [False, True, True, False])
        == "The<< cat sat>> down"
    )
    assert highlight(["a", "b"], [True, True]) == "<<ab>>"


def test_scaled_activations_are_integers_0_to_10():
    assert scaled([0.0, 1.0, 2.0, 4.0], 4.0) == [0, 2, 5, 10]


def test_explainer_prompt_lists_marked_tokens_with_strength():
    user = explainer_messages([([" the", " cat"], [0.0, 2.0])], 2.0)[1]["content"]
    assert "Example 1:  the<< cat>>" in user and "cat (10)" in user


def test_whitespace_and_special_tokens_are_shown_visibly_and_the_same_everywhere():
    vocab = prompt_vocab(
        ["<|im_start|>", "Hello", "\n", "\t", "  ", " world", "<|im_end|>"], special_ids=[0, 6]
    )
    assert vocab[0] == vocab[6] == DOCUMENT_BOUNDARY and "<|" not in "".join(vocab)
    tokens = vocab[1:]
    # a latent that fires on the line break: the explainer sees the mark on a visible token, and lists it
    user = explainer_messages([(tokens, [0, 3.0, 0, 0, 0, 0])], 3.0)[1]["content"]
    assert "Hello<<↵>>⇥␣␣ world‖" in user and "Marked: ↵ (10)" in user
    assert '2\t"↵"' in simulation_messages("line breaks", tokens)[1]["content"]
    assert visible_token(visible_token("\n\t ")) == visible_token(
        "\n\t "
    )  # rendering twice changes nothing
    assert plain_text(highlight(tokens, [False] * 6)) == "Hello\n\t   world\n"


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
        (
            "Explanation: the word 'the'",
            "the word 'the'",
        ),  # the closing quote belongs to the content
        ('Explanation: "the" and "a"', '"the" and "a"'),
        ('Explanation: the token "."', 'the token "."'),
        ("**Explanation:** **line breaks**", "line breaks"),
        (
            "<think>They all mark numbers. Or years?</think>\nExplanation: four-digit years",
            "four-digit years",
        ),
        ("<think>Let me look at the examples", None),  # cut off while reasoning: no answer
        ("The feature fires on:\n- cats\n- dogs", None),  # several lines and no label: which one?
        ("Explanation: cats\nExplanation: dogs", None),
        ("Explanation:\nclosing brackets", "closing brackets"),
        ("Explanation:\na line break", "a line break"),
        (
            "Explanation: the token\n'and' between clauses",
            "the token 'and' between clauses",
        ),  # one phrase broken over lines
        ("Explanation: a line\nbreak", "a line break"),
        (
            "Explanation: Explanation: closing brackets",
            "closing brackets",
        ),  # the label echoed once too often
        (
            "Explanation: repeated words ('the the the')",
            "repeated words ('the the the')",
        ),  # a short repeat can be the content
        ("Explanation: cats\nExplanation: cats", "cats"),
    ],
)
def test_parse_explanation(answer, expected):
    parsed = parse_explanation(answer)
    assert isinstance(parsed, Refusal) if expected is None else parsed == expected


@pytest.mark.parametrize(
    "answer, reason",
    [
        (
            "The feature fire on is on is on is on is on",
            "degenerate: 'on is' repeated 3 or more times in a row",
        ),
        (
            "Explanation: the the the the the the the the",
            "degenerate: 'the' repeated 6 or more times in a row",
        ),
        (
            "Explanation: Explanation: Explanation:",
            "only the prompt's labels: 'Explanation: Explanation:'",
        ),
        ("Explanation: <phrase>", "only the prompt's labels"),
        ("Explanation: Example 1: Marked:", "only the prompt's labels"),
        ("Explanation:", "nothing after the label"),
        ("   \n", "empty answer"),
        ("<think>Let me look at the examples", "cut off while reasoning"),
        ("Explanation: cats\nExplanation: dogs", "2 different explanations: 'cats' and 'dogs'"),
        ("Explanation:\n- cats\n- dogs", "a list of items under the label"),  # which item? a guess
        ("Hmm.\nThese are hard to tell apart.", "several lines and no 'Explanation:' label"),
    ],
)
def test_a_refused_explanation_says_why(answer, reason):
    parsed = parse_explanation(answer)
    assert isinstance(parsed, Refusal) and reason in parsed.reason, parsed


# (answer, n, lo, hi, expected): real answer styles of judges without a grammar; None = refused
ANSWERS = [
    ("[1, 0, 1]", 3, 0, 1, [1, 0, 1]),
    ("Answer: [0,0,1,1,0]", 5, 0, 1, [0, 0, 1, 1, 0]),
    ("Example 1: 1\nExample 2: 0", 2, 0, 1, [1, 0]),
    ("Example 1: yes", 2, 0, 1, None),
    ("1 0 1", 3, 0, 1, [1, 0, 1]),
    ("1, 0, 1.", 3, 0, 1, [1, 0, 1]),
    ("[1, 2, 0]", 3, 0, 1, None),
    ("I cannot tell", 2, 0, 1, None),
    ("[1, 2, 0, 1]", 3, 0, 1, None),  # too long: never cut to the first three
    ("[1, 0]", 3, 0, 1, None),  # too short: never padded
    ('{"values": [1, 0, 1]}', 3, 0, 1, [1, 0, 1]),  # structured output
    ('{"values": [1, 0]}', 3, 0, 1, None),
    ("[1, 0, 1, 1]", 4, 0, 1, [1, 0, 1, 1]),
    ("```json\n[0, 1, 1]\n```", 3, 0, 1, [0, 1, 1]),
    ("**[1, 1, 0]**", 3, 0, 1, [1, 1, 0]),
    (
        "<think>Example 2 mentions a cat, so [0, 1, 0] maybe; but 3 also...</think>\n[0, 1, 1]",
        3,
        0,
        1,
        [0, 1, 1],
    ),
    ("<think>Example 1 has the word", 3, 0, 1, None),
    (
        "Following the format, e.g. [1, 0, 1], my answer is [0, 0, 1].",
        3,
        0,
        1,
        None,
    ),  # two different lists
    ("Reasoning: examples 1 and 3 fire.\nFinal answer: [1, 0, 1]", 3, 0, 1, [1, 0, 1]),
    ("1. Yes\n2. No\n3. Yes", 3, 0, 1, [1, 0, 1]),
    ("1: 1 (mentions a cat)\n2: 0 (no cat)", 2, 0, 1, [1, 0]),
    ("Here are my answers:\nExample 1: 0\nExample 2: 1\nExample 3: 0", 3, 0, 1, [0, 1, 0]),
    ("Example 1: 1\nExample 3: 0", 2, 0, 1, None),  # numbering skips an example
    ("Example 1: 1\nExample 2: maybe", 2, 0, 1, None),
    (
        "Examples 1, 2 and 4 fire; example 3 does not.",
        4,
        0,
        1,
        None,
    ),  # prose about examples, not labels
    ("[0, 10, 3]", 3, 0, 10, [0, 10, 3]),
    ("Token 1: 0\nToken 2: 7", 2, 0, 10, [0, 7]),
    ("[0, 11, 3]", 3, 0, 10, None),
    ("1. yes\n2. no", 2, 0, 10, None),  # yes/no is no activation value
    ("The intruder is [4].", 1, 1, 5, [4]),
    ("[6]", 1, 1, 5, None),
    ("3", 1, 1, 5, [3]),
    ("Example 3 is the intruder; examples 1, 2 and 4 share a theme.", 1, 1, 5, [3]),
    ("The intruder is example 2, because examples 1, 3, 4 and 5 mention water.", 1, 1, 5, [2]),
    ("Examples 1, 2 and 4 are about cats.", 1, 1, 5, None),  # names no intruder
    ("Either 2 or 5 could be the intruder.", 1, 1, 5, None),
    ('{"values": [5]}', 1, 1, 5, [5]),
    ("Answer: 4", 1, 1, 5, [4]),
    ("[2] or maybe [3]", 1, 1, 5, None),
    ('{"answer": "two"}', 1, 1, 5, None),
]


@pytest.mark.parametrize("answer, n, lo, hi, expected", ANSWERS)
def test_value_lists_are_read_only_when_unambiguous(answer, n, lo, hi, expected):
    assert parse_int_list(answer, n, lo, hi) == expected


def test_the_answer_table_covers_at_least_thirty_styles():
    assert len(ANSWERS) >= 30 and sum(expected is None for *_, expected in ANSWERS) >= 10
