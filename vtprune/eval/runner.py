"""Run one evaluation: load the task, skip what is already written, generate the rest, summarise.

Order of work (each step fails fast before any model is loaded if the input is bad): validate settings ->
load the examples -> resolve the result folder from the run identity -> collect ids already written (the
resume point) -> evaluate this rank's strided shard of the rest in batches, writing each sample line as it
finishes -> barrier -> rank 0 merges parts and writes summary.json / summary.md.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vtprune.eval.config import EvalConfig, config_hash, run_folder_name
from vtprune.eval.distributed import DistContext
from vtprune.eval.errors import EvalInputError, RunDirError
from vtprune.eval.images import ImageDecodeError, decode_image
from vtprune.eval.predictor import Generation, Predictor, resolve_device, resolve_dtype
from vtprune.eval.store import (
    ENVIRONMENT,
    SUMMARY_JSON,
    RunLock,
    RunStore,
    resolve_run_dir,
    write_json_atomic,
)
from vtprune.eval.summary import build_summary, write_summary
from vtprune.eval.tasks import Example, Task, get_task

PredictorFactory = Callable[[], Predictor]
GENERATION_FAILED = "generation failed"
MAX_CONSECUTIVE_FAILURES = 16


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any] | None  # None on ranks other than 0
    evaluated_now: int


def prepare_task(cfg: EvalConfig) -> Task:
    """Validate the configuration and build its task (no data loaded yet)."""
    cfg.validate()
    task = get_task(
        cfg.task, dataset=cfg.dataset_id, split=cfg.split, config=cfg.dataset_config,
        revision=cfg.revision, parser=cfg.parser,
    )
    validate_method(cfg)
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = task.default_max_new_tokens
    cfg.split = task.split
    return task


def validate_method(cfg: EvalConfig) -> None:
    """Reject an unknown method or bad parameters before loading anything (the API names valid choices)."""
    if cfg.method == "none":
        return
    import vtprune

    vtprune.get_method(cfg.method, keep=cfg.keep, **cfg.params)


def run_eval(
    cfg: EvalConfig,
    *,
    predictor: Predictor | None = None,
    predictor_factory: PredictorFactory | None = None,
    dist: DistContext | None = None,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Evaluate `cfg`, resuming whatever an earlier run with the same identity already wrote."""
    dist = dist or DistContext.from_env()
    task = prepare_task(cfg)
    examples = task.load(limit=cfg.limit)
    device = resolve_device(cfg.device, dist.local_rank)
    identity = cfg.identity(task.describe(), resolve_dtype(cfg.dtype, device))
    digest = config_hash(identity)
    resolved: tuple[str | None, str | None] = (None, None)
    lock: RunLock | None = None
    if dist.is_main:
        try:
            path = resolve_run_dir(Path(cfg.output) / run_folder_name(identity), identity)
            lock = RunLock(path)
            lock.acquire()
            resolved = (str(path), None)
        except EvalInputError as exc:
            resolved = (None, str(exc))
    resolved = dist.broadcast(resolved)  # every rank learns the folder, or the reason there is none
    if resolved[1] is not None:
        raise RunDirError(resolved[1])
    run_dir = Path(resolved[0])
    try:
        return _run_in(cfg, task, examples, identity, digest, run_dir, device, predictor, predictor_factory,
                       dist, log)
    finally:
        if lock is not None:
            lock.release()


def _run_in(cfg: EvalConfig, task: Task, examples: list[Example], identity: dict[str, Any], digest: str,
            run_dir: Path, device: str, predictor: Predictor | None, predictor_factory: PredictorFactory | None,
            dist: DistContext, log: Callable[[str], None] | None) -> RunResult:
    store = RunStore(run_dir)
    done = store.done_ids(include_errors=not cfg.retry_errors)
    dist.barrier()  # every rank has read the done set before any rank appends to its part
    todo = [ex for ex in examples if ex.uid not in done]
    mine = todo[dist.rank :: dist.world]
    if log and dist.is_main:
        log(f"{task.name}/{task.split}: {len(examples)} samples, {len(examples) - len(todo)} already done -> {run_dir}")

    evaluated = 0
    if mine:
        if predictor is None:
            predictor = predictor_factory() if predictor_factory else _load_predictor(cfg, device)
        predictor.template, predictor.preprocessing = cfg.template, cfg.preprocessing
        predictor.max_new_tokens = int(cfg.max_new_tokens)
        predictor.set_method(cfg.method, cfg.keep, cfg.params)
        try:
            if dist.is_main:
                write_json_atomic(run_dir / ENVIRONMENT, {**predictor.environment(), "world_size": dist.world})
            with store.writer(dist.rank, dist.world) as writer:
                evaluated = _evaluate(task, predictor, mine, writer, cfg, dist)
        finally:  # the model leaves the run unmodified (pruning hooks are always removed)
            predictor.set_method("none")

    dist.barrier()
    summary = None
    if dist.is_main:
        rows = store.merge()
        wanted = {ex.uid for ex in examples}
        rows = [r for r in rows if r["id"] in wanted]
        rows = task.finalize(run_dir, rows)
        environment = _read_environment(run_dir)
        summary = build_summary(
            task, rows, expected=len(examples), config={**identity, **_execution(cfg)}, identity=identity,
            config_hash=digest, environment={**environment, "world_size": dist.world}, run_dir=run_dir,
        )
        write_summary(run_dir, summary, task)
    dist.barrier()
    return RunResult(run_dir=run_dir, summary=summary, evaluated_now=evaluated)


def _execution(cfg: EvalConfig) -> dict[str, Any]:
    data = asdict(cfg)
    return {k: data[k] for k in EvalConfig.IDENTITY_EXCLUDED}


def _read_environment(run_dir: Path) -> dict[str, Any]:
    import json

    path = run_dir / ENVIRONMENT
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    previous = run_dir / SUMMARY_JSON
    if previous.exists():
        return json.loads(previous.read_text(encoding="utf-8")).get("environment", {})
    return {}


def _load_predictor(cfg: EvalConfig, device: str) -> Predictor:
    return Predictor.from_pretrained(
        cfg.model, dtype=cfg.dtype, device=device, attn_implementation=cfg.attn_implementation,
        revision=cfg.model_revision, template=cfg.template, preprocessing=cfg.preprocessing,
        max_new_tokens=int(cfg.max_new_tokens or 128), compile=cfg.compile,
    )


# ------------------------------------------------------------------------------------------ the loop


def _evaluate(task: Task, predictor: Predictor, examples: list[Example], writer, cfg: EvalConfig,
              dist: DistContext) -> int:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(examples), desc=f"{task.name}/{task.split} {cfg.method}",
               disable=not (cfg.progress and dist.is_main), dynamic_ncols=True, unit="sample")
    correct = scored = failing = 0
    for start in range(0, len(examples), cfg.batch_size):
        batch = examples[start : start + cfg.batch_size]
        for row in _run_batch(task, predictor, batch, dist.rank):
            writer.write(row)
            if not row.get("error"):
                scored += 1
                correct += bool(row["correct"])
            # A broken sample costs only itself, but a model that fails on everything (out of memory, a
            # bug) must stop the run rather than fill the results with error lines.
            failing = failing + 1 if str(row.get("error", "")).startswith(GENERATION_FAILED) else 0
            if failing >= MAX_CONSECUTIVE_FAILURES:
                bar.close()
                raise RuntimeError(f"{failing} generations failed in a row; last: {row['error']}")
        bar.update(len(batch))
        if scored:
            bar.set_postfix(acc=f"{correct / scored:.3f}", refresh=False)
    bar.close()
    return len(examples)


def _run_batch(task: Task, predictor: Predictor, batch: list[Example], rank: int) -> list[dict[str, Any]]:
    """Rows for a batch, in batch order; broken samples become error rows, the rest are generated together."""
    t0 = time.perf_counter()
    rows: dict[int, dict[str, Any]] = {}
    ready: list[tuple[int, Example, Any, str | None]] = []
    for i, ex in enumerate(batch):
        if ex.error:
            rows[i] = _error_row(ex, ex.error)
            continue
        try:
            raw = ex.raw_image()
            image = decode_image(raw, ex.base_dir)
        except ImageDecodeError as exc:
            rows[i] = _error_row(ex, str(exc))
            continue
        except Exception as exc:  # a missing column cell, an unreadable file reference...
            rows[i] = _error_row(ex, f"unreadable sample: {type(exc).__name__}: {exc}")
            continue
        ready.append((i, ex, image, _image_hash(raw)))
    t_prep = time.perf_counter() - t0
    if ready:
        t1 = time.perf_counter()
        generations = _generate_robust(predictor, [(ex, img) for _, ex, img, _ in ready])
        t_gen = time.perf_counter() - t1
        share = (time.perf_counter() - t0) / len(ready)
        for (i, ex, _, image_hash), gen in zip(ready, generations, strict=True):
            if isinstance(gen, str):
                rows[i] = _error_row(ex, gen)
                continue
            timing = {"batch_size": len(ready), "prep_s": round(t_prep, 6), "generate_s": round(t_gen, 6),
                      "sample_s": round(share, 6), "rank": rank}
            rows[i] = _result_row(task, ex, gen, image_hash, timing)
    return [rows[i] for i in range(len(batch))]


def _generate_robust(predictor: Predictor, items: list[tuple[Example, Any]]) -> list[Generation | str]:
    """Generate a batch; if it fails, retry sample by sample so one bad sample only costs itself."""
    try:
        return list(predictor.generate([ex.question for ex, _ in items], [img for _, img in items]))
    except Exception as exc:
        if len(items) == 1:
            return [f"{GENERATION_FAILED}: {type(exc).__name__}: {exc}"]
        return [_generate_robust(predictor, [item])[0] for item in items]


def _image_hash(raw: Any) -> str | None:
    data = raw.get("bytes") if isinstance(raw, dict) else raw if isinstance(raw, (bytes, bytearray)) else None
    return hashlib.sha256(bytes(data)).hexdigest()[:16] if data else None


def _base_row(ex: Example) -> dict[str, Any]:
    return {"id": ex.uid, "index": ex.index, **ex.fields}


def _result_row(task: Task, ex: Example, gen: Generation, image_hash: str | None,
                timing: dict[str, Any]) -> dict[str, Any]:
    parsed = task.parse(gen.text, ex)
    score = task.score(parsed, ex)
    return {
        **_base_row(ex),
        "prompt_hash": hashlib.sha256(gen.prompt.encode()).hexdigest()[:16],
        "doc_hash": ex.doc_hash,
        "image_hash": image_hash,
        "prediction": gen.text,
        "parsed": parsed,
        "target": ex.target,
        "correct": task.is_correct(parsed, ex),
        **({"score": score} if score is not None else {}),
        "visual_tokens": gen.visual_tokens,
        "kept_tokens": gen.kept_tokens,
        "tokens_after_pruning": gen.tokens_after_pruning,
        "layer_avg_tokens": gen.layer_avg_tokens,
        "prompt_tokens": gen.prompt_tokens,
        "prefill_tflops": gen.prefill_tflops,
        "error": None,
        "timing": timing,
    }


def _error_row(ex: Example, reason: str) -> dict[str, Any]:
    return {**_base_row(ex), "doc_hash": ex.doc_hash, "target": ex.target, "correct": False, "error": reason}
