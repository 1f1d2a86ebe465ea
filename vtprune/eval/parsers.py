"""Answer parsers: raw generated text -> the answer a metric compares with the target.

Parsers are named and selectable because they change the reported numbers: a pruned model often answers
"Yes, there is a dog in the image." where an exact-match parser (lmms-eval) would score it wrong, while
LLaVA's own script (what the pruning papers report) reads it as "yes". The parser name is recorded with
every run.
"""

from __future__ import annotations

import re
from collections.abc import Callable

YesNoParser = Callable[[str], "str | None"]
LetterParser = Callable[[str, int], "str | None"]

OPTION_LETTERS = ("A", "B", "C", "D", "E")


# ---------------------------------------------------------------------------------------------- yes / no


def parse_yes_no_llava(text: str) -> str:
    """LLaVA-1.5 `eval_pope.py`: keep the text before the first '.', drop commas, split on spaces;
    any word equal to "No", "no" or "not" means "no", anything else means "yes" (never unparsed)."""
    text = text.strip()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    if "No" in words or "no" in words or "not" in words:
        return "no"
    return "yes"


def parse_yes_no_exact(text: str) -> str | None:
    """lmms-eval POPE: the lower-cased, stripped answer must be exactly "yes" or "no"; else unparsed."""
    answer = text.strip().lower()
    return answer if answer in ("yes", "no") else None


def parse_yes_no_word(text: str) -> str | None:
    """VLMEvalKit-style word match: "yes" present and "no" absent -> yes, the reverse -> no, else unparsed."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes and not has_no:
        return "yes"
    if has_no and not has_yes:
        return "no"
    return None


YES_NO_PARSERS: dict[str, YesNoParser] = {
    "llava": parse_yes_no_llava,
    "exact": parse_yes_no_exact,
    "word": parse_yes_no_word,
}


# ---------------------------------------------------------------------------------------------- letters


_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_letter_llava(text: str, num_choices: int) -> str | None:
    """LLaVA `eval_science_qa.py`: the text is exactly a letter; or starts with "X. "; or contains exactly
    one "The answer is X." -- and the letter must name one of the sample's choices, else FAILED (None)."""
    text = text.strip()
    valid = OPTION_LETTERS[: max(0, num_choices)]
    if text in OPTION_LETTERS:
        letter: str | None = text
    elif len(text) >= 3 and text[0] in OPTION_LETTERS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter is not None and letter in valid else None


# A leading letter needs punctuation after it: "A dog ..." is an article, not option A.
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:[.):,]|$)")
_ANSWER_IS_LOOSE = re.compile(r"answer is:?\s*\(?([A-Z])\b", re.IGNORECASE)


def parse_letter_lenient(text: str, num_choices: int) -> str | None:
    """LLaVA's rules plus the forms short-answer models also produce: "B.", "(B)", "B)", "answer is (B)"."""
    strict = parse_letter_llava(text, num_choices)
    if strict is not None:
        return strict
    valid = OPTION_LETTERS[: max(0, num_choices)]
    text = text.strip()
    match = _LEADING_LETTER.search(text)
    if match and match.group(1) in valid:
        return match.group(1)
    found = {m.upper() for m in _ANSWER_IS_LOOSE.findall(text)}
    if len(found) == 1 and (letter := found.pop()) in valid:
        return letter
    return None


LETTER_PARSERS: dict[str, LetterParser] = {
    "llava": parse_letter_llava,
    "lenient": parse_letter_lenient,
}
