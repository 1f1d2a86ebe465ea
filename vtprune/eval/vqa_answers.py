"""The VQA answer normaliser and VQA accuracy, shared by TextVQA, VQAv2 and VizWiz.

Normalisation follows the official VQA evaluation (Antol et al.; the EvalAI answer processor that the VQAv2,
TextVQA and VizWiz servers and LLaVA's submission scripts apply): lower-case; drop "," and "?" inside words
and split "'s" off; strip or space out punctuation (strip when the mark touches a space or the answer holds a
number like "1,000", else replace by a space); drop a "." unless a digit follows; number words zero..ten and
"none" become digits; drop the articles a/an/the; restore the apostrophe of common contractions ("dont" ->
"don't").

VQA accuracy of a prediction against the human answers (10 in VQAv2/TextVQA/VizWiz): for each way of leaving
one human answer out, min(#remaining humans who gave the prediction / 3, 1); the mean over those subsets. With
k matching humans out of 10: k=0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >=4 -> 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from itertools import combinations

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Marks the official script removes or turns into spaces ("." and the apostrophe are handled separately).
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A full stop is dropped unless a digit follows it, so "2.5" keeps its decimal point.
_PERIOD = re.compile(r"\.(?!\d)")

# The contractions the VQA evaluation writes with their apostrophes: a form written without some or all of its
# apostrophes ("dont", "couldnt've", "couldn'tve") maps to the spelling here. (The official table's "I'm"-type
# keys are capitalised and so never match lower-cased text; they are left out to behave the same.)
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's "
    "should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's "
    "what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't "
    "would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for word in _CONTRACTED:
        marks = [i for i, ch in enumerate(word) if ch == "'"]
        for k in range(1, len(marks) + 1):
            for dropped in combinations(marks, k):
                variant = "".join(ch for i, ch in enumerate(word) if i not in dropped)
                table.setdefault(variant, word)
    return table


_CONTRACTIONS = _contraction_table()


def _punctuation(text: str) -> str:
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or strip_all else " ")
    return _PERIOD.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The answer as the VQA/EvalAI evaluation compares it (see the module docstring)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_punctuation(text))


def answer_strings(answers: Iterable) -> list[str]:
    """Human answers as strings, whether stored as strings or as VQAv2's {"answer": ...} dicts."""
    out = []
    for answer in answers or []:
        value = answer.get("answer") if isinstance(answer, dict) else answer
        if value is not None:
            out.append(str(value))
    return out


def vqa_accuracy(prediction: str | None, answers: Sequence, *, normalized: bool = False) -> float:
    """VQA accuracy of one prediction; `normalized=True` when the prediction is already normalised."""
    humans = [normalize_answer(a) for a in answer_strings(answers)]
    if prediction is None or not humans:
        return 0.0
    pred = prediction if normalized else normalize_answer(prediction)
    matches = sum(1 for h in humans if h == pred)
    total = 0.0
    for left_out in humans:  # leave each human answer out once
        others = matches - (1 if left_out == pred else 0)
        total += min(others / 3, 1.0)
    return total / len(humans)


def human_matches(prediction: str | None, answers: Sequence, *, normalized: bool = False) -> int:
    """How many human answers equal the prediction after normalisation."""
    if prediction is None:
        return 0
    pred = prediction if normalized else normalize_answer(prediction)
    return sum(1 for a in answer_strings(answers) if normalize_answer(a) == pred)


def majority_answer(answers: Sequence) -> str:
    """The most frequent normalised human answer (first seen wins a tie); "" when there are none."""
    counts: dict[str, int] = {}
    for answer in answer_strings(answers):
        key = normalize_answer(answer)
        counts[key] = counts.get(key, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else ""
