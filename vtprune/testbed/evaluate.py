"""A small self-contained evaluator for the testbed model: batched greedy `generate` with left padding.

It reads rows in the parquet schemas of `shapes.py` (image as {"bytes", "path"}), builds the lmms-eval prompts,
and scores POPE (accuracy, F1, yes-ratio per category) and MCQ (accuracy per question type). The full evaluation
framework lives in `vtprune.eval`; this module exists so the testbed can certify itself without it.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from vtprune.testbed.questions import LETTERS, mcq_text, pope_text
from vtprune.testbed.render import blank_image

# Held-out data: the benchmark seed is different from every training seed (and uses other random streams).
EVAL_SEED = 1234
# The fixed small sample that the tests re-score on CPU (see weights/eval.json, "sample").
SAMPLE_POPE_IMAGES = 6
SAMPLE_MCQ_QUESTIONS = 24


def chat_prompt(processor: Any, text: str, system: str | None = None) -> str:
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def row_text(row: dict[str, Any]) -> str:
    """The user text of a POPE row (has `category` in random/popular/adversarial) or an MCQ row (has `choices`)."""
    if "choices" in row:
        return mcq_text(row["question"], list(row["choices"]), row.get("hint", ""))
    return pope_text(row["question"])


def row_image(row: dict[str, Any]) -> Image.Image:
    image = row["image"]
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.open(io.BytesIO(image["bytes"])).convert("RGB")


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    rows: Sequence[dict[str, Any]],
    batch_size: int = 32,
    system: str | None = None,
    blank: bool = False,
    max_new_tokens: int = 3,
) -> list[str]:
    """Greedy answers (decoded, special tokens dropped) for each row; `blank` swaps every image for grey."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    grey = Image.fromarray(blank_image())
    out: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [chat_prompt(processor, row_text(r), system) for r in chunk]
        images = [grey if blank else row_image(r) for r in chunk]
        inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        out.extend(t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True))
    return out


def parse_yes_no(text: str) -> str:
    words = text.lower().replace(".", " ").replace(",", " ").split()
    return "yes" if words and words[0] == "yes" and "no" not in words and "not" not in words else "no"


def parse_letter(text: str, num_choices: int) -> int:
    """Index of the chosen option, or -1 when the answer is no valid letter."""
    head = text.strip()[:1]
    return LETTERS.index(head) if head and head in LETTERS[:num_choices] else -1


def score_pope(rows: Sequence[dict[str, Any]], answers: Sequence[str]) -> dict[str, dict[str, float]]:
    """Accuracy, precision, recall, F1 and yes-ratio per category (and "all")."""
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row, text in zip(rows, answers, strict=True):
        pair = (parse_yes_no(text), row["answer"])
        groups[row["category"]].append(pair)
        groups["all"].append(pair)
    result = {}
    for name, pairs in groups.items():
        pred = np.array([p == "yes" for p, _ in pairs])
        gold = np.array([g == "yes" for _, g in pairs])
        tp = float((pred & gold).sum())
        precision = tp / max(pred.sum(), 1)
        recall = tp / max(gold.sum(), 1)
        result[name] = {
            "accuracy": float((pred == gold).mean()),
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / max(precision + recall, 1e-12),
            "yes_ratio": float(pred.mean()),
            "n": len(pairs),
        }
    return result


def score_mcq(rows: Sequence[dict[str, Any]], answers: Sequence[str]) -> dict[str, dict[str, float]]:
    """Accuracy per question type (and "all")."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for row, text in zip(rows, answers, strict=True):
        ok = parse_letter(text, len(row["choices"])) == int(row["answer"])
        groups[row["category"]].append(ok)
        groups["all"].append(ok)
    return {name: {"accuracy": float(np.mean(v)), "n": len(v)} for name, v in groups.items()}


def evaluate(
    model: Any,
    processor: Any,
    pope_rows: Sequence[dict[str, Any]],
    mcq_rows: Sequence[dict[str, Any]],
    batch_size: int = 32,
    blank: bool = False,
    system: str | None = None,
) -> dict[str, Any]:
    """{"pope": score_pope(...), "mcq": score_mcq(...)} with greedy answers from `model.generate`."""
    result: dict[str, Any] = {}
    if pope_rows:
        answers = generate_answers(model, processor, pope_rows, batch_size, system, blank)
        result["pope"] = score_pope(pope_rows, answers)
    if mcq_rows:
        answers = generate_answers(model, processor, mcq_rows, batch_size, system, blank)
        result["mcq"] = score_mcq(mcq_rows, answers)
    return result


def sample_rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The fixed small held-out sample: POPE questions of the first images, and the first MCQ questions."""
    from vtprune.testbed.shapes import mcq_records, pope_records

    return pope_records(SAMPLE_POPE_IMAGES, EVAL_SEED), mcq_records(SAMPLE_MCQ_QUESTIONS, EVAL_SEED)
