"""`vtprune bench-eval`: evaluation throughput (samples per second) of `vtprune eval` batched with pruning,
against the usual way a VLM benchmark is run, an lmms-eval-style batch-1 loop over the unpruned model.

The workload is POPE-shaped: one image per sample (random pixels, JPEG-encoded like COCO, default 480 x 640),
the question "Is there a {object} in the image?" with POPE's instruction, and a short answer. The same
parquet file, written in the `lmms-lab/POPE` layout into a temporary folder, feeds both sides:

(a) baseline: the unpruned model, one sample at a time, as lmms-eval's `llava_hf` model does it: decode the
    image, build the chat prompt, call the processor on one image + prompt, `model.generate(...)` at batch 1,
    decode the new tokens.
(b) `vtprune eval`: the real `run_eval` path (task loading, batched processor calls with left padding,
    `generate`, parsing, the per-sample JSON lines and the summary) at batch size B, once per method: the
    pruning methods at `keep` visual tokens, and `none` (every visual token, batched) to separate what
    batching gains from what pruning gains.

Equal work: every generation produces exactly `new_tokens` tokens (`min_new_tokens = max_new_tokens`, so EOS
cannot end an answer early; a random-weights model would otherwise stop at random). Both sides count the
samples and the generated tokens they produced (around `model.generate`), and the results say whether they
match. Each side is warmed up first (two batch-1 samples; one batch of each configuration), untimed.

The target of issue 19: (b) with a pruning method at 64 visual tokens >= 6 x (a) in samples per second.

The model is built by `bench/workload.py` (`--arch llava-1.5-7b --random-weights`: the real architecture with
random weights, made on the GPU; `--arch tiny`: the tiny test model, for CPU runs). Its processor is built
here from the config: a `CLIPImageProcessor` at the tower's resolution and a word-level tokenizer of exactly
the model's vocabulary size with its special ids (`vtprune.testing.build_word_tokenizer_for_ids`); nothing is
downloaded. Random weights give garbage answers; the timings are those of the real architecture. Nothing here
needs the `datasets` package (the parquet file is read with pyarrow).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vtprune.errors import UserInputError

__all__ = [
    "ARCHS",
    "EvalThroughputConfig",
    "GenerationCounter",
    "processor_for",
    "run_eval_throughput",
    "write_pope_workload",
]

ARCHS = ("llava-1.5-7b", "llava-1.5-13b", "tiny")
DTYPES = ("auto", "float32", "float16", "bfloat16")
TARGET_RATIO = 6.0
TARGET_KEEP = 64
POPE_SPLIT = "adversarial"
WORKLOAD_OBJECTS = ("dog", "cat", "chair", "person", "car", "bottle", "cup", "bicycle")
# question, instruction and chat-template words get real ids (the rest of the vocabulary is filler)
WORKLOAD_WORDS = ("Is", "Answer", "person", "car", "bottle", "cup", "bicycle")
FORCED_LENGTH_NOTE = (
    "every answer is exactly {n} new tokens on both sides (min_new_tokens = max_new_tokens = {n}; EOS cannot "
    "stop a generation early), so both sides do the same decoding work"
)
RANDOM_WEIGHTS_NOTE = "random weights: answers are garbage and accuracy is meaningless; timings are real"
BASELINE_LABEL = "unpruned, batch 1 (lmms-eval llava_hf loop)"


@dataclass
class EvalThroughputConfig:
    """The settings of one benchmark run (validated by `validate` before any model is built)."""

    output: Path
    arch: str = "llava-1.5-7b"
    random_weights: bool = False
    methods: list[str] = field(default_factory=lambda: ["none", "visionzip", "vispruner", "divprune"])
    keep: int = TARGET_KEEP
    batch: int = 32
    samples: int = 128
    new_tokens: int = 8
    image_size: tuple[int, int] = (480, 640)  # height, width of the workload's images (COCO-like)
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "sdpa"
    warmup: bool = True
    seed: int = 0
    target: float = TARGET_RATIO
    progress: bool = True

    def validate(self) -> None:
        """Reject bad input with a message naming the valid choices; nothing is built or written yet."""
        import vtprune
        from vtprune.bench.workload import ATTN_IMPLEMENTATIONS

        if self.arch not in ARCHS:
            raise UserInputError(f"unknown --arch {self.arch!r}; valid: {', '.join(ARCHS)}")
        if self.arch != "tiny" and not self.random_weights:
            raise UserInputError(f"--arch {self.arch} has no weights here: add --random-weights")
        for name, value in (("--batch", self.batch), ("--samples", self.samples),
                            ("--new-tokens", self.new_tokens), ("--keep", self.keep)):
            if value < 1:
                raise UserInputError(f"{name} must be >= 1, got {value}")
        if min(self.image_size) < 1:
            raise UserInputError(f"--image-size must be positive, got {self.image_size[0]}x{self.image_size[1]}")
        if self.dtype not in DTYPES:
            raise UserInputError(f"unknown --dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        if self.attn not in ATTN_IMPLEMENTATIONS:
            raise UserInputError(f"unknown --attn {self.attn!r}; valid: {', '.join(ATTN_IMPLEMENTATIONS)}")
        if not self.methods:
            raise UserInputError("--methods names no method")
        if len(set(self.methods)) != len(self.methods):
            raise UserInputError(f"--methods names a method twice: {','.join(self.methods)}")
        for method in self.methods:
            if method != "none":
                vtprune.get_method(method, keep=self.keep)  # an unknown method names the valid ones
        tokens = visual_tokens_of(self.arch)
        if self.keep > tokens and any(m != "none" for m in self.methods):
            raise UserInputError(f"--keep {self.keep} is more than the {tokens} visual tokens of an image")
        _resolve_device(self.device)

    def keep_of(self, method: str) -> int | None:
        return None if method == "none" else self.keep


def visual_tokens_of(arch: str) -> int:
    """Visual tokens of one image on `arch` (576 on LLaVA-1.5, 64 on the tiny model), known before building it."""
    from vtprune.bench.flops import PRESETS

    if arch in PRESETS:
        return PRESETS[arch].visual_tokens
    from vtprune.testing import tiny_llava_config

    vision = tiny_llava_config(vocab_size=8, image_token_id=4, pad_token_id=1).vision_config
    return (vision.image_size // vision.patch_size) ** 2


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise UserInputError(f"unknown --device {device!r}: cpu, cuda, cuda:N or auto") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"--device {device}: no CUDA device is available")
    return device


def _resolve_dtype(dtype: str, device: str) -> str:
    """`auto`: bfloat16 on a GPU (random weights are safe from fp16 overflow there), float32 on the CPU."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


# ------------------------------------------------------------------------------------------ processor


def processor_for(model: torch.nn.Module):
    """A LLaVA-1.5 processor for `model` built from its config (nothing downloaded): a `CLIPImageProcessor`
    resizing the short side to the tower's resolution and centre-cropping (the llava-hf default), a
    word-level tokenizer with the model's vocabulary size and special ids, and the llava-hf chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from vtprune.testing import BASIC_WORDS, CHAT_TEMPLATE, IMAGE_TOKEN, build_word_tokenizer_for_ids

    config = model.config
    text = config.text_config
    vision = config.vision_config
    image_id = getattr(config, "image_token_id", None)
    if image_id is None:
        image_id = config.image_token_index
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(text, "pad_token_id", None)
    special = {"<s>": text.bos_token_id, "</s>": text.eos_token_id, IMAGE_TOKEN: image_id}
    if pad is not None and pad not in special.values():
        special["<pad>"] = pad
    used = set(special.values())
    special["<unk>"] = next(i for i in range(text.vocab_size) if i not in used)
    if "<pad>" not in special:
        special["<pad>"] = next(i for i in range(text.vocab_size) if i not in set(special.values()))
    tokenizer = build_word_tokenizer_for_ids(text.vocab_size, special, [*BASIC_WORDS, *WORKLOAD_WORDS])
    size = vision.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


# ------------------------------------------------------------------------------------------ workload


def write_pope_workload(root: Path, samples: int, image_size: tuple[int, int], seed: int = 0) -> Path:
    """`samples` POPE rows of one category in the `lmms-lab/POPE` layout (`Full/adversarial-*.parquet`):
    random-pixel JPEG images of `image_size` (height, width), yes/no questions about COCO objects."""
    import numpy as np
    from PIL import Image

    from vtprune.eval.tiny_data import write_rows

    rng = np.random.default_rng(seed)
    height, width = image_size
    rows = []
    for i in range(samples):
        # coarse colour blocks plus noise: JPEG bytes of a realistic size, not a flat image
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        pixels = np.kron(coarse, np.ones((height // 6 + 1, width // 8 + 1, 1), dtype=np.uint8))[:height, :width]
        pixels = (pixels.astype(np.int16) + rng.integers(-20, 20, size=pixels.shape)).clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        obj = WORKLOAD_OBJECTS[i % len(WORKLOAD_OBJECTS)]
        rows.append({
            "id": str(i),
            "question_id": str(i + 1),
            "question": f"Is there a {obj} in the image?",
            "answer": "yes" if i % 2 == 0 else "no",
            "image_source": f"COCO_val2014_{i:012d}",
            "image": {"bytes": buffer.getvalue(), "path": None},
            "category": POPE_SPLIT,
        })
    write_rows(root / "Full" / f"{POPE_SPLIT}-00000-of-00001.parquet", rows)
    return root


# ------------------------------------------------------------------------------------------ counting


@dataclass
class GenerationCounter:
    """Samples and new tokens produced by `model.generate` while `counting` is active."""

    samples: int = 0
    tokens: int = 0
    calls: int = 0
    on_batch: Callable[[int], None] | None = None

    @contextlib.contextmanager
    def counting(self, model: torch.nn.Module) -> Iterator[GenerationCounter]:
        """Wrap `model.generate` (an instance attribute, put back as it was on exit) to count what it returns."""
        original = model.generate
        shadowed = "generate" in vars(model)  # an instance attribute someone else set is restored, not deleted

        def generate(*args: Any, **kwargs: Any):
            out = original(*args, **kwargs)
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            prompt = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
            rows = sequences.shape[0]
            self.samples += rows
            self.tokens += rows * (sequences.shape[1] - prompt)
            self.calls += 1
            if self.on_batch is not None:
                self.on_batch(rows)
            return out

        model.generate = generate
        try:
            yield self
        finally:
            if shadowed:
                model.generate = original
            else:
                del model.generate


# ------------------------------------------------------------------------------------------ the two sides


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _examples(dataset: Path):
    from vtprune.eval.tasks import get_task

    return get_task("pope", dataset=str(dataset), split=POPE_SPLIT).load()


@torch.inference_mode()
def baseline_loop(model, processor, examples, new_tokens: int) -> list[str]:
    """lmms-eval `llava_hf` at batch 1: per sample, decode the image, build the chat prompt, run the
    processor on one image + prompt, `generate` (greedy, exactly `new_tokens` tokens), decode."""
    from vtprune.eval.images import decode_image

    answers = []
    for ex in examples:
        image = decode_image(ex.raw_image(), ex.base_dir)
        content = [{"type": "image"}, {"type": "text", "text": ex.question}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=[image], text=prompt, return_tensors="pt").to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
            use_cache=True, pad_token_id=processor.tokenizer.pad_token_id,
        )
        answers.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def _eval_config(cfg: EvalThroughputConfig, method: str, dataset: Path, output: Path, device: str, dtype: str,
                 limit: int | None = None):
    from vtprune.eval.config import EvalConfig

    return EvalConfig(
        model=f"{cfg.arch}-random",  # a name, not a path: no checkpoint exists (run_eval gets the predictor)
        task="pope", split=POPE_SPLIT, dataset_id=str(dataset), method=method, keep=cfg.keep_of(method),
        max_new_tokens=cfg.new_tokens, dtype=dtype, attn_implementation=cfg.attn, batch_size=cfg.batch,
        limit=limit, output=str(output), device=device, progress=False,
    )


def _label(cfg: EvalThroughputConfig, method: str, visual_tokens: int) -> str:
    keep = visual_tokens if method == "none" else cfg.keep
    return f"vtprune eval {method}, keep {keep}, batch {cfg.batch}"


def _kept_tokens(run_dir: Path) -> float | None:
    """Mean visual tokens per sample after pruning, from the run's sample lines."""
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines() if line.strip()]
    values = [r["tokens_after_pruning"] for r in rows if r.get("tokens_after_pruning") is not None]
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------------ the run


def run_eval_throughput(cfg: EvalThroughputConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the baseline and every configuration of `cfg`; write `results.json` (after each measurement)
    and `results.md` under `cfg.output`; return the results."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vtprune.bench.workload import build_model
    from vtprune.eval.predictor import Predictor
    from vtprune.eval.runner import run_eval

    log = log or (lambda message: None)
    cfg.validate()
    device = _resolve_device(cfg.device)
    dtype = _resolve_dtype(cfg.dtype, device)
    output = Path(cfg.output)

    log(f"building {cfg.arch} ({'random weights' if cfg.random_weights else 'tiny test model'}) on {device}, {dtype}")
    bench = build_model(model=None, arch=cfg.arch, random_weights=cfg.random_weights, device=device,
                        dtype=getattr(torch, dtype), attn=cfg.attn, seed=cfg.seed)
    model = bench.model
    visual_tokens = bench.visual_tokens
    output.mkdir(parents=True, exist_ok=True)
    processor = processor_for(model)
    model.generation_config.min_new_tokens = cfg.new_tokens  # `vtprune eval` copies the model's settings
    model.generation_config.max_new_tokens = cfg.new_tokens
    predictor = Predictor(model, processor, max_new_tokens=cfg.new_tokens, model_id=f"{cfg.arch} (random weights)")

    results: dict[str, Any] = {
        "meta": _meta(cfg, bench, processor, device, dtype, visual_tokens),
        "baseline": None,
        "batched": [],
        "target": None,
    }

    def save() -> None:
        results["target"] = _verdict(cfg, results)
        (output / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (output / "results.md").write_text(report_markdown(results))

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
               TimeElapsedColumn())
    with tempfile.TemporaryDirectory(prefix="vtprune-bench-eval-") as scratch, \
            Progress(*columns, console=console, disable=not cfg.progress, transient=False) as progress:
        dataset = write_pope_workload(Path(scratch) / "pope", cfg.samples, cfg.image_size, cfg.seed)
        examples = _examples(dataset)
        log(f"workload: {len(examples)} POPE-shaped samples, {cfg.image_size[0]}x{cfg.image_size[1]} JPEG images")

        # (a) the batch-1 loop of the unpruned model
        if cfg.warmup:
            baseline_loop(model, processor, examples[: min(2, len(examples))], cfg.new_tokens)
        bar = progress.add_task(BASELINE_LABEL, total=len(examples))
        counter = GenerationCounter(on_batch=lambda n: progress.advance(bar, n))
        with counter.counting(model):
            _sync(device)
            start = time.perf_counter()
            baseline_loop(model, processor, examples, cfg.new_tokens)
            _sync(device)
            seconds = time.perf_counter() - start
        results["baseline"] = _measurement(BASELINE_LABEL, "none", None, 1, counter, seconds, visual_tokens)
        save()

        # (b) `vtprune eval`, batched, one configuration per method
        for method in cfg.methods:
            label = _label(cfg, method, visual_tokens)
            bar = progress.add_task(label, total=len(examples))
            entry: dict[str, Any]
            try:
                if cfg.warmup:
                    warm = Path(scratch) / "warmup" / method
                    run_eval(_eval_config(cfg, method, dataset, warm, device, dtype, limit=cfg.batch),
                             predictor=predictor)
                runs = output / "runs" / method
                shutil.rmtree(runs, ignore_errors=True)  # a run folder left by an earlier benchmark would resume
                counter = GenerationCounter(on_batch=lambda n, bar=bar: progress.advance(bar, n))
                with counter.counting(model):
                    _sync(device)
                    start = time.perf_counter()
                    result = run_eval(_eval_config(cfg, method, dataset, runs, device, dtype), predictor=predictor)
                    _sync(device)
                    seconds = time.perf_counter() - start
                entry = _measurement(label, method, cfg.keep_of(method), cfg.batch, counter, seconds, visual_tokens)
                entry["kept_visual_tokens"] = _kept_tokens(result.run_dir)
                entry["run_dir"] = str(result.run_dir)
                counts = (result.summary or {}).get("counts", {})
                entry["evaluated"], entry["errors"] = result.evaluated_now, counts.get("errors")
                if result.evaluated_now != len(examples) or counts.get("errors"):
                    entry["status"] = "error"
                    entry["error"] = f"{result.evaluated_now} samples evaluated, {counts.get('errors')} error rows"
            except Exception as exc:  # one failing method (out of memory, a bug) costs only its own row
                if isinstance(exc, UserInputError):
                    raise
                entry = {"label": label, "method": method, "keep": cfg.keep_of(method), "batch": cfg.batch,
                         "status": "error", "error": f"{type(exc).__name__}: {exc}"}
                log(f"{label}: failed: {entry['error']}")
            base = results["baseline"]
            if entry.get("samples_per_s") and base["samples_per_s"]:
                entry["ratio"] = entry["samples_per_s"] / base["samples_per_s"]
                entry["equal_work"] = (entry["samples"], entry["generated_tokens"]) == (
                    base["samples"], base["generated_tokens"])
            results["batched"].append(entry)
            save()
    return results


def _measurement(label: str, method: str, keep: int | None, batch: int, counter: GenerationCounter,
                 seconds: float, visual_tokens: int) -> dict[str, Any]:
    return {
        "label": label,
        "method": method,
        "keep": keep,
        "visual_tokens": visual_tokens if keep is None else keep,
        "batch": batch,
        "samples": counter.samples,
        "generated_tokens": counter.tokens,
        "generate_calls": counter.calls,
        "seconds": seconds,
        "samples_per_s": counter.samples / seconds if seconds > 0 else math.inf,
        "status": "ok",
    }


def _meta(cfg: EvalThroughputConfig, bench, processor, device: str, dtype: str, visual_tokens: int) -> dict:
    import transformers

    device_name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("output", "progress")}
    return {
        **settings,
        "image_size": f"{cfg.image_size[0]}x{cfg.image_size[1]}",
        "device": device,
        "device_name": device_name,
        "dtype": dtype,
        "visual_tokens": visual_tokens,
        "random_weights": bench.random_weights,
        "weights_note": RANDOM_WEIGHTS_NOTE if bench.random_weights else "",
        "forced_length": FORCED_LENGTH_NOTE.format(n=cfg.new_tokens),
        "image_processor": type(processor.image_processor).__name__,
        "workload": f"POPE-shaped ({POPE_SPLIT} layout): one image per sample, a yes/no question",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _verdict(cfg: EvalThroughputConfig, results: dict[str, Any]) -> dict[str, Any]:
    """Every pruned configuration must reach `cfg.target` x the baseline (issue 19 sets it at 64 tokens)."""
    checked = [e for e in results["batched"] if e["method"] != "none"]
    for entry in checked:
        entry["target_met"] = entry.get("ratio", 0.0) >= cfg.target
    met = bool(checked) and all(e["target_met"] for e in checked)
    return {
        "ratio": cfg.target,
        "keep": cfg.keep,
        "checked": [e["label"] for e in checked],
        "met": met if checked else None,
        "verdict": "target met" if met else ("MISSED" if checked else "not checked (no pruning method)"),
    }


def report_markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    target = results["target"] or {}
    lines = [
        f"# Eval throughput: {meta['arch']} on {meta['device_name']} ({meta['dtype']}, {meta['attn']})",
        "",
        f"{meta['samples']} samples, {meta['workload']}; images {meta['image_size']}; {meta['new_tokens']} new "
        f"tokens per answer.",
        f"Forced answer length: {meta['forced_length']}.",
    ]
    if meta["weights_note"]:
        lines.append(f"Note: {meta['weights_note']}.")
    lines += [
        "",
        "| configuration | visual tokens | batch | samples | generated tokens | seconds | samples/s | x baseline "
        "| target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in [results["baseline"], *results["batched"]]:
        if entry is None:
            continue
        if entry.get("status") != "ok":
            lines.append(f"| {entry['label']} | | {entry.get('batch', '')} | | | | failed: {entry.get('error')} | | |")
            continue
        ratio = entry.get("ratio")
        mark = {True: "met", False: "MISSED"}.get(entry.get("target_met"), "")
        kept = entry.get("kept_visual_tokens")
        tokens = f"{kept:g}" if kept is not None else str(entry["visual_tokens"])
        lines.append(
            f"| {entry['label']} | {tokens} | {entry['batch']} | {entry['samples']} | {entry['generated_tokens']} "
            f"| {entry['seconds']:.2f} | {entry['samples_per_s']:.2f} | {'' if ratio is None else f'{ratio:.2f}x'} "
            f"| {mark} |"
        )
    if target:
        lines += ["", f"Target: vtprune eval at {target['keep']} visual tokens >= {target['ratio']:g}x the batch-1 "
                      f"loop: **{target['verdict']}**"]
    return "\n".join(lines) + "\n"


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One line per configuration and the verdict, for the terminal."""
    base = results["baseline"]
    lines = [f"{base['label']}: {base['samples_per_s']:.2f} samples/s ({base['samples']} samples, "
             f"{base['generated_tokens']} generated tokens)"]
    for entry in results["batched"]:
        if entry.get("status") != "ok":
            lines.append(f"{entry['label']}: failed: {entry.get('error')}")
            continue
        mark = {True: " -> target met", False: " -> MISSED"}.get(entry.get("target_met"), "")
        equal = "" if entry.get("equal_work") else " (UNEQUAL WORK: samples or tokens differ from the baseline)"
        lines.append(f"{entry['label']}: {entry['samples_per_s']:.2f} samples/s = {entry['ratio']:.2f}x the "
                     f"baseline{mark}{equal}")
    target = results["target"]
    lines.append(f"target (>= {target['ratio']:g}x at {target['keep']} visual tokens): {target['verdict']}")
    lines.append(f"answer length forced: {results['meta']['forced_length']}")
    return lines
