"""summary.json and summary.md of a run, computed only from its sample rows (so resume and merge agree)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from statistics import mean
from typing import Any

from vtprune.eval.store import SUMMARY_JSON, SUMMARY_MD, write_json_atomic, write_text_atomic
from vtprune.eval.tasks.base import Task


def build_summary(
    task: Task,
    rows: list[dict[str, Any]],
    *,
    expected: int,
    config: dict[str, Any],
    identity: dict[str, Any],
    config_hash: str,
    environment: dict[str, Any],
    run_dir: Path,
) -> dict[str, Any]:
    ok = [r for r in rows if not r.get("error")]
    errors = [r for r in rows if r.get("error")]
    metrics = task.summarize(ok)
    return {
        "task": task.name,
        "run_dir": str(run_dir),
        "config_hash": config_hash,
        "metrics": metrics,
        "primary_metric": task.primary_metric,
        "counts": {
            "expected": expected,
            "written": len(rows),
            "evaluated": len(ok),
            "errors": len(errors),
            "missing": expected - len(rows),
            "complete": len(rows) == expected,
        },
        "error_reasons": dict(Counter(r["error"] for r in errors).most_common(20)),
        "tokens": token_stats(ok),
        "timing": timing_stats(ok),
        "config": config,
        "identity": identity,
        "environment": environment,
        "dataset": task.sources,
    }


def token_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean visual tokens before pruning, after it, and averaged over LLM layers; per stage too."""
    if not rows:
        return {}
    stages: dict[str, list[int]] = {}
    for r in rows:
        for name, count in (r.get("kept_tokens") or {}).items():
            stages.setdefault(name, []).append(count)

    def avg(key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return mean(values) if values else None

    return {
        "visual_tokens": avg("visual_tokens"),
        "tokens_after_pruning": avg("tokens_after_pruning"),
        "layer_avg_tokens": avg("layer_avg_tokens"),
        "prompt_tokens": avg("prompt_tokens"),
        "prefill_tflops": avg("prefill_tflops"),
        "kept_tokens_per_stage": {name: mean(v) for name, v in stages.items()},
    }


def timing_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput of the sessions that produced the rows (per-sample shares of batch wall time)."""
    times = [r["timing"]["sample_s"] for r in rows if r.get("timing") and r["timing"].get("sample_s") is not None]
    if not times:
        return {}
    total = sum(times)
    return {"sample_s_mean": total / len(times), "samples_per_s": len(times) / total if total else None}


def write_summary(run_dir: Path, summary: dict[str, Any], task: Task) -> None:
    write_json_atomic(run_dir / SUMMARY_JSON, summary)
    write_text_atomic(run_dir / SUMMARY_MD, summary_markdown(summary, task))


def summary_markdown(summary: dict[str, Any], task: Task) -> str:
    cfg, env, counts = summary["config"], summary["environment"], summary["counts"]
    tokens = summary.get("tokens") or {}
    keep = "all" if cfg.get("method") == "none" else cfg.get("keep")
    lines = [
        f"# {summary['task']} / {cfg.get('split')} -- {cfg.get('method')} (keep {keep})",
        "",
        f"- model: `{cfg.get('model')}`  dtype {env.get('dtype', cfg.get('dtype'))}, "
        f"attention {env.get('attn_implementation', cfg.get('attn_implementation'))}, device {env.get('device_name', '?')}",
        f"- data: `{cfg.get('dataset_id')}` config {cfg.get('dataset_config')}, revision {cfg.get('revision')}",
        f"- prompt template {cfg.get('template')}, preprocessing {cfg.get('preprocessing')}, parser {cfg.get('parser')}, "
        f"max_new_tokens {cfg.get('max_new_tokens')}, greedy",
        f"- method params: {cfg.get('params') or '{}'}",
        f"- samples: {counts['evaluated']} evaluated, {counts['errors']} errors, {counts['missing']} missing "
        f"(of {counts['expected']}){'' if counts['complete'] else ' -- INCOMPLETE'}",
    ]
    if tokens:
        lines.append(
            f"- visual tokens: {_num(tokens.get('visual_tokens'))} -> {_num(tokens.get('tokens_after_pruning'))} "
            f"(layer average {_num(tokens.get('layer_avg_tokens'))})"
        )
    lines += [
        f"- versions: vtprune {env.get('vtprune')}, torch {env.get('torch')}, transformers {env.get('transformers')}",
        f"- config hash `{summary['config_hash']}`",
        "",
        task.summary_table(summary["metrics"]),
        "",
    ]
    if summary.get("error_reasons"):
        lines += ["| error | count |", "|---|---|"]
        lines += [f"| {_cell(reason)} | {n} |" for reason, n in summary["error_reasons"].items()]
        lines.append("")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")
