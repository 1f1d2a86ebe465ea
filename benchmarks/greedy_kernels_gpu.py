"""Time the greedy selectors on a GPU: the torch loops vs the fused Triton kernels (vtprune/kernels/greedy.py).

For LLaVA-1.5's 576 visual tokens at batch 16 (defaults) and keep = 64 / 128 / 192, times
* ``dpp_greedy`` (CDPruner) on a ``cdpruner_kernel`` of random 4096-d features and random relevance (the
  kernel is built once, outside the timing: it is the same for both paths);
* ``maxmin_diversity`` (DivPrune) on random 4096-d features (its Gram matrix is inside the call and the
  same for both paths; ``cosine_matrix`` alone is timed as that floor);
* ``vispruner_select`` (VisPruner) on random 1024-d CLIP features and a softmax [CLS] attention row
  (its Gram matrix, timed alone as the floor, is inside the call);
once with ``VTPRUNE_TRITON=0`` (torch loop) and once with the fused kernels, both through the public
functions as the methods call them (CUDA graphs on, as in production). Each figure is the median of
``--repeats`` CUDA-event timings after ``--warmup`` calls (the first call compiles the kernel and captures
the graph). Both paths must return identical indices; a mismatch is reported and makes the exit status 1.
Also (``--next``, on by default) one LLaVA-NeXT-sized check: batch 4, 2,928 tokens, keep 320 / 640.
``--sweep-tiles`` also times the bare fused kernels for several register-tile sizes (tuning aid).

Prints a table and writes JSON to ``--output``. Meant to finish well within a minute on an H200:

    python benchmarks/greedy_kernels_gpu.py --output benchmarks/results/greedy_kernels_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


DEVICE = "cuda"


def cuda_ms(fn: Callable[[], object], warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    if DEVICE != "cuda":  # --device cpu smoke run: wall clock
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}
    torch.cuda.synchronize()
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def with_triton(flag: str, fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` run with VTPRUNE_TRITON=flag (read at each call; the resulting path is part of the CUDA-graph
    cache key). "strict": the fused kernels, raising on a kernel error instead of falling back to torch."""

    def call():
        old = os.environ.get("VTPRUNE_TRITON")
        os.environ["VTPRUNE_TRITON"] = flag
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("VTPRUNE_TRITON", None)
            else:
                os.environ["VTPRUNE_TRITON"] = old

    return call


def compare(a, b) -> dict:
    """Equality of two Picked results, with the first differing row and slot when they differ."""
    same = torch.equal(a.indices, b.indices) and torch.equal(a.valid, b.valid)
    out = {"equal": bool(same)}
    if not same:
        rows = (a.indices != b.indices).any(dim=1) | (a.valid != b.valid).any(dim=1)
        r = int(rows.nonzero()[0])
        slot = (
            int((a.indices[r] != b.indices[r]).nonzero()[0]) if (a.indices[r] != b.indices[r]).any() else -1
        )
        out.update(
            rows_differing=int(rows.sum()),
            first_row=r,
            first_slot=slot,
            torch_row=a.indices[r].tolist(),
            fused_row=b.indices[r].tolist(),
        )
    return out


def make_inputs(batch: int, tokens: int, dim: int, clip_dim: int, seed: int) -> dict:
    from vtprune.methods.cdpruner import cdpruner_kernel

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    llm = torch.randn(batch, tokens, dim, device=DEVICE, generator=g, dtype=torch.float16)
    relevance = torch.randn(batch, tokens, device=DEVICE, generator=g)
    clip = torch.randn(batch, tokens, clip_dim, device=DEVICE, generator=g, dtype=torch.float16)
    attn = torch.softmax(4 * torch.randn(batch, tokens, device=DEVICE, generator=g), dim=-1)
    return {"llm": llm, "kernel": cdpruner_kernel(llm, relevance), "clip": clip, "attn": attn}


def selectors(x: dict) -> dict[str, Callable[[int], object]]:
    from vtprune.methods.vispruner import vispruner_select
    from vtprune.selection import dpp_greedy, maxmin_diversity

    return {
        "dpp_greedy (CDPruner)": lambda k: dpp_greedy(x["kernel"], k),
        "maxmin_diversity (DivPrune)": lambda k: maxmin_diversity(x["llm"], k),
        "vispruner_select (VisPruner)": lambda k: vispruner_select(x["attn"], x["clip"], k),
    }


def floors(x: dict, warmup: int, repeats: int) -> dict:
    """The part of each call that is not the greedy loop (same in both paths)."""
    from vtprune.selection import cosine_matrix

    return {
        "maxmin_diversity (DivPrune)": cuda_ms(lambda: cosine_matrix(x["llm"], 1e-6), warmup, repeats),
        "vispruner_select (VisPruner)": cuda_ms(lambda: cosine_matrix(x["clip"], 1e-6), warmup, repeats),
    }


def run_grid(
    label: str, x: dict, keeps: list[int], warmup: int, repeats: int, rows: list, problems: list
) -> None:
    batch, tokens = x["attn"].shape
    floor = floors(x, warmup, repeats)
    for name, fn in selectors(x).items():
        for k in keeps:
            row = {"shape": label, "method": name, "batch": batch, "tokens": tokens, "keep": k}
            try:
                plain = with_triton("0", lambda fn=fn, k=k: fn(k))
                fused = with_triton("strict", lambda fn=fn, k=k: fn(k))
                t_torch = cuda_ms(plain, warmup, repeats)
                t_fused = cuda_ms(fused, warmup, repeats)
                row.update(torch=t_torch, fused=t_fused, speedup=t_torch["median_ms"] / t_fused["median_ms"])
                if name in floor:
                    row["gram_floor"] = floor[name]
                row.update(compare(plain(), fused()))
                if not row["equal"]:
                    problems.append(f"{label} {name} keep={k}: indices differ ({row['rows_differing']} rows)")
            except Exception as exc:  # keep going: one failure must not hide the other figures
                row["error"] = f"{type(exc).__name__}: {exc}"
                row["traceback"] = traceback.format_exc()
                problems.append(f"{label} {name} keep={k}: {row['error']}")
                print(row["traceback"], file=sys.stderr)
            rows.append(row)
            print_row(row)


def sweep_tiles(x: dict, keep: int, warmup: int, repeats: int) -> list[dict]:
    """Bare fused kernels (no graph, no prologue) for several ROWS x BLOCK_N register tiles."""
    from vtprune.kernels import greedy
    from vtprune.selection import cosine_matrix

    kernel = x["kernel"]
    avail = torch.ones(kernel.shape[:2], dtype=torch.bool, device=DEVICE)
    dist = (1.0 - cosine_matrix(x["llm"], 1e-6)).clamp_min(0.0)
    out = []
    default = greedy._TILE_ELEMENTS
    mode = os.environ.get("VTPRUNE_TRITON")
    os.environ["VTPRUNE_TRITON"] = "strict"  # a kernel error raises instead of returning None
    os.environ["VTPRUNE_TRITON_VISPRUNER"] = "1"  # VisPruner's kernel is opt-in; time it too
    try:
        for tile in (4096, 8192, 16384, 32768):
            greedy._TILE_ELEMENTS = tile
            for name, fn in (
                ("dpp kernel", lambda: greedy.dpp_greedy_fused(kernel, keep, avail, 1e-5)),
                ("maxmin kernel", lambda: greedy.maxmin_fused(dist, keep, avail)),
            ):
                try:
                    t = cuda_ms(fn, warmup, repeats)
                    out.append({"tile_elements": tile, "kernel": name, "keep": keep, **t})
                    print(f"  tile {tile:6d}  {name:14s} keep {keep:4d}  {t['median_ms']:8.3f} ms")
                except Exception as exc:
                    out.append(
                        {"tile_elements": tile, "kernel": name, "error": f"{type(exc).__name__}: {exc}"}
                    )
                    print(f"  tile {tile:6d}  {name:14s} error: {exc}", file=sys.stderr)
    finally:
        greedy._TILE_ELEMENTS = default
        if mode is None:
            os.environ.pop("VTPRUNE_TRITON", None)
        else:
            os.environ["VTPRUNE_TRITON"] = mode
    return out


HEADER = f"{'shape':10s} {'method':30s} {'keep':>5s} {'torch ms':>9s} {'fused ms':>9s} {'speedup':>8s} {'gram ms':>8s}  equal"


def print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['shape']:10s} {row['method']:30s} {row['keep']:5d}  ERROR {row['error']}")
        return
    gram = f"{row['gram_floor']['median_ms']:8.3f}" if "gram_floor" in row else f"{'-':>8s}"
    print(
        f"{row['shape']:10s} {row['method']:30s} {row['keep']:5d} {row['torch']['median_ms']:9.3f} "
        f"{row['fused']['median_ms']:9.3f} {row['speedup']:7.1f}x {gram}  {'yes' if row['equal'] else 'NO'}"
    )


def prepare(args: argparse.Namespace) -> list[int]:
    """The checks both kernel benchmarks (this one and scope_kernel_gpu.py) make before anything runs: the
    device (`--device cpu` only under TRITON_INTERPRET=1), `--keeps` within `--tokens`, vtprune and triton
    importable. Sets DEVICE; returns the budgets."""
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            fail(
                "--device cpu needs TRITON_INTERPRET=1 (the fused kernels run on CPU only in the interpreter)"
            )
    elif not torch.cuda.is_available():
        fail(
            f"no CUDA device visible to torch {torch.__version__}: this benchmark needs a GPU "
            "(--device cpu with TRITON_INTERPRET=1 is only a smoke run of the script)"
        )
    try:
        keeps = [int(k) for k in args.keeps.split(",")]
    except ValueError:
        fail(f"--keeps must be comma-separated integers; got {args.keeps!r}")
    if any(not 1 <= k <= args.tokens for k in keeps):
        fail(f"every keep must be in [1, {args.tokens}]; got {keeps}")
    try:
        from vtprune.kernels import greedy
    except ImportError as exc:
        fail(f"cannot import vtprune ({exc}); run from the repository root or install it")
    if not greedy.triton_available():
        try:
            import triton  # noqa: F401  (re-raise the real import error for the message)
        except Exception as exc:
            fail(f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton")
    if os.environ.get("VTPRUNE_CUDA_GRAPHS") == "0":
        print("note: VTPRUNE_CUDA_GRAPHS=0, both paths run without CUDA graphs")
    return keeps


def finish(args: argparse.Namespace, report: dict, problems: list[str], started: float) -> None:
    """Write the report (with its run time and problems) to --output; exit 1 when a check failed."""
    report["seconds"] = time.perf_counter() - started
    report["problems"] = problems
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output} ({report['seconds']:.1f} s)")
    if problems:
        print("PROBLEMS:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)


def environment(args: argparse.Namespace) -> dict:
    """What a report records about the run: device, versions, CUDA graphs on or off, the settings."""
    import triton

    return {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda_graphs": os.environ.get("VTPRUNE_CUDA_GRAPHS", "1") != "0",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, type=Path, help="JSON file to write")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=576)
    p.add_argument("--keeps", default="64,128,192", help="comma-separated budgets")
    p.add_argument("--dim", type=int, default=4096, help="projected feature width (DPP kernel, max–min)")
    p.add_argument("--clip-dim", type=int, default=1024, help="CLIP feature width (VisPruner)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--next", action=argparse.BooleanOptionalAction, default=True, help="LLaVA-NeXT-sized check"
    )
    p.add_argument("--sweep-tiles", action="store_true", help="also time the bare kernels per register tile")
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: a smoke run of this script under TRITON_INTERPRET=1 (tiny sizes; timings meaningless)",
    )
    args = p.parse_args()

    keeps = prepare(args)
    if DEVICE == "cpu":
        args.next = False
    started = time.perf_counter()
    report = {**environment(args), "rows": []}
    problems: list[str] = []
    print(f"{report['device']}  torch {report['torch']}  triton {report['triton']}")
    print(HEADER)
    x = make_inputs(args.batch, args.tokens, args.dim, args.clip_dim, args.seed)
    run_grid(f"{args.batch}x{args.tokens}", x, keeps, args.warmup, args.repeats, report["rows"], problems)
    if args.sweep_tiles:
        print("bare fused kernels by register tile (ROWS x BLOCK_N elements):")
        report["tile_sweep"] = sweep_tiles(x, max(keeps), args.warmup, args.repeats)
    del x
    if args.next:
        nx = make_inputs(4, 2928, args.dim, args.clip_dim, args.seed + 1)
        run_grid("4x2928", nx, [320, 640], 1, 5, report["rows"], problems)
        del nx
    finish(args, report, problems, started)


if __name__ == "__main__":
    main()
