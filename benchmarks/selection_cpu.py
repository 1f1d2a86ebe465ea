"""Time the selection primitives of vtprune.selection for LLaVA-1.5's 576 -> 64 visual tokens.

Measures, at batch 1 and 16, the wall time of
* ``dpp_greedy`` (CDPruner, docs/methods/cdpruner.md) on a kernel built by ``cdpruner_kernel`` from random 4096-d features
  (the projected width of LLaVA-1.5-7B) and random relevance; kernel construction is timed separately
  because it is a 576x576x4096 matrix product, while the greedy loop itself is O(N·k²);
* ``maxmin_diversity`` (DivPrune, docs/methods/divprune.md) on random 4096-d features (Gram matrix + greedy loop);
* ``vispruner_select`` (VisPruner, docs/methods/vispruner.md) on random 1024-d CLIP features and a softmax [CLS] attention row
  (important_ratio 0.5 -> 64 deduplication rounds);
* ``topk_indices`` as a floor.

Inputs are float32 (the primitives compute in float32 whatever the input dtype). Each figure is the median
of ``--repeats`` runs after ``--warmup`` runs (min and max are kept too: on a shared machine the minimum is
the better estimate of the uncontended time; the JSON records the load average before and after).
Writes a table to stdout and JSON to ``--out``.

    python benchmarks/selection_cpu.py                     # CPU, writes benchmarks/results/selection_cpu.json
    python benchmarks/selection_cpu.py --device cuda --out benchmarks/results/selection_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vtprune.methods.cdpruner import cdpruner_kernel
from vtprune.methods.vispruner import vispruner_select
from vtprune.selection import dpp_greedy, maxmin_diversity, topk_indices

N_TOKENS = 576
KEEP = 64
LLM_WIDTH = 4096  # projected feature width, LLaVA-1.5-7B
CLIP_WIDTH = 1024  # CLIP ViT-L/14 layer-22 width


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_cases(batch: int, gen: torch.Generator, device: torch.device) -> dict[str, Callable[[], object]]:
    """The timed calls for one batch size, on fresh random inputs."""
    llm_feats = torch.randn(batch, N_TOKENS, LLM_WIDTH, generator=gen).to(device)
    clip_feats = torch.randn(batch, N_TOKENS, CLIP_WIDTH, generator=gen).to(device)
    relevance = torch.randn(batch, N_TOKENS, generator=gen).to(device)
    cls_attn = torch.softmax(torch.randn(batch, N_TOKENS, generator=gen) * 2, dim=-1).to(device)
    kernel = cdpruner_kernel(llm_feats, relevance)
    return {
        "topk_indices": lambda: topk_indices(cls_attn, KEEP),
        "vispruner_select (D=1024)": lambda: vispruner_select(cls_attn, clip_feats, KEEP),
        "maxmin_diversity (D=4096)": lambda: maxmin_diversity(llm_feats, KEEP),
        "cdpruner_kernel (D=4096)": lambda: cdpruner_kernel(llm_feats, relevance),
        "dpp_greedy (kernel given)": lambda: dpp_greedy(kernel, KEEP),
        "cdpruner_kernel + dpp_greedy": lambda: dpp_greedy(cdpruner_kernel(llm_feats, relevance), KEEP),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "selection_cpu.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    gen = torch.Generator().manual_seed(args.seed)

    rows = []
    for batch in args.batches:
        for name, fn in make_cases(batch, gen, device).items():
            times = time_call(fn, device, args.warmup, args.repeats)
            med = statistics.median(times)
            rows.append(
                {
                    "op": name,
                    "batch": batch,
                    "median_ms": round(med, 3),
                    "per_sample_ms": round(med / batch, 3),
                    "min_ms": round(min(times), 3),
                    "max_ms": round(max(times), 3),
                    "repeats": args.repeats,
                }
            )

    header = f"{'op':<32} {'batch':>5} {'median ms':>10} {'ms/sample':>10} {'min ms':>9} {'max ms':>9}"
    print(f"576 -> {KEEP} visual tokens on {device} ({torch.get_num_threads()} threads)")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['op']:<32} {r['batch']:>5} {r['median_ms']:>10.2f} {r['per_sample_ms']:>10.2f}"
            f" {r['min_ms']:>9.2f} {r['max_ms']:>9.2f}"
        )

    meta = {
        "tokens": N_TOKENS,
        "keep": KEEP,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "warmup": args.warmup,
        "dtype": "float32",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
