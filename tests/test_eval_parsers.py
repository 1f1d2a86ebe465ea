"""Answer parsers against real-looking model outputs (LLaVA eval_pope.py / eval_science_qa.py rules)."""

from __future__ import annotations

import pytest

from vtprune.eval.parsers import (
    parse_letter_lenient,
    parse_letter_llava,
    parse_yes_no_exact,
    parse_yes_no_llava,
    parse_yes_no_word,
)

YES_NO_CASES = [
    # text, llava, exact, word
    ("Yes", "yes", "yes", "yes"),
    ("yes", "yes", "yes", "yes"),
    ("No", "no", "no", "no"),
    ("no.", "no", None, "no"),
    ("Yes, there is a dog.", "yes", None, "yes"),
    ("There is no dog.", "no", None, "no"),
    ("No, there is not a cat in the image.", "no", None, "no"),
    ("The image does not show a chair.", "no", None, None),
    ("Yes. No dogs were harmed.", "yes", None, None),  # LLaVA reads the first sentence only
    ("No, the man is not holding a knife, yes", "no", None, None),
    ("A dog is sitting on the grass.", "yes", None, None),  # LLaVA: anything without no/not is yes
    ("  YES  ", "yes", "yes", "yes"),
    ("", "yes", None, None),
]


@pytest.mark.parametrize(("text", "llava", "exact", "word"), YES_NO_CASES)
def test_yes_no_parsers(text: str, llava: str, exact: str | None, word: str | None) -> None:
    assert parse_yes_no_llava(text) == llava
    assert parse_yes_no_exact(text) == exact
    assert parse_yes_no_word(text) == word


LETTER_CASES = [
    # text, choices, llava, lenient
    ("A", 4, "A", "A"),
    ("B. 12", 4, "B", "B"),
    ("The answer is C.", 4, "C", "C"),
    ("C. blue", 4, "C", "C"),
    ("D", 3, None, None),  # a letter beyond the sample's choices is FAILED
    ("B.", 4, None, "B"),  # too short for LLaVA's "X. " rule
    ("(B)", 4, None, "B"),
    ("The answer is (A)", 4, None, "A"),
    ("The answer is A. The answer is B.", 4, None, None),  # two matches: ambiguous
    ("blue", 4, None, None),
    ("", 4, None, None),
    ("AB", 4, None, None),
    ("A dog is in the picture.", 4, None, None),  # an article, not option A
    ("B) 12", 4, None, "B"),
]


@pytest.mark.parametrize(("text", "n", "llava", "lenient"), LETTER_CASES)
def test_letter_parsers(text: str, n: int, llava: str | None, lenient: str | None) -> None:
    assert parse_letter_llava(text, n) == llava
    assert parse_letter_lenient(text, n) == lenient
