"""Time SCOPE's greedy selection on a GPU: the torch loop vs the fused Triton kernel
(vtprune/kernels/greedy.py, ``scope_fused``).

For LLaVA-1.5's 576 visual tokens at batch 16 and CLIP-L's 1,024-d features (defaults), keep = 64 / 128 /
192, times :func:`vtprune.methods.scope.scope_select` as the method calls it (CUDA graphs on, as in
production) once with ``VTPRUNE_TRITON=0`` (the torch loop) and once with the fused kernel
(``VTPRUNE_TRITON=strict``: a kernel error raises instead of falling back). The prologue (normalize, the
(B, N, N) cosine matrix, saliency^alpha) is inside both calls and timed alone as ``prologue ms``. Each
figure is the median of ``--repeats`` CUDA-event timings after ``--warmup`` calls (the first call compiles
the kernel and captures the graph). Both paths should return identical indices (in pick order and raster
order). Where a row's picks differ, the two scores at the first differing slot are recomputed in float64
from the common prefix: a gap within float32 summation error (N * 2^-23 relative) is a near-tie, allowed by
the kernel's contract (vtprune/kernels/greedy.py) and reported as such; any other difference, or an error,
is a problem and makes the exit status 1.
``--sweep-tiles`` also times the bare kernel for several (BLOCK_J, ROWS, num_warps) tiles, with and
without the lazy chunk skipping (tuning aid; every variant must return the same picks).

Prints a table and writes JSON to ``--output``; refuses to run without CUDA (except ``--device cpu``, a
smoke run under ``TRITON_INTERPRET=1``):

    python benchmarks/scope_kernel_gpu.py --output benchmarks/results/scope_kernel_h200.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import greedy_kernels_gpu as kernels_bench  # the checks, timing and VTPRUNE_TRITON switching it shares
import torch
from greedy_kernels_gpu import cuda_ms, fail, with_triton

DEVICE = "cuda"


def divergences(x: dict, combine: str, torch_order, fused_order) -> list[dict]:
    """Per row whose pick orders differ: the first differing slot and the relative gap between the two
    picks' scores there, recomputed in float64 from the common prefix (near-tie: gap <= N * 2^-23)."""
    import torch.nn.functional as F

    out = []
    n = x["features"].shape[1]
    for row in range(torch_order.shape[0]):
        a, b = torch_order[row].tolist(), fused_order[row].tolist()
        if a == b:
            continue
        slot = next(i for i, (p, q) in enumerate(zip(a, b, strict=True)) if p != q)
        f = F.normalize(x["features"][row].double(), dim=-1)
        sim = f @ f.T
        w = x["saliency"][row].double().clamp(min=0) ** x["alpha"]
        cov = torch.zeros(n, dtype=torch.float64, device=sim.device)
        for p in a[:slot]:
            cov = torch.maximum(cov, sim[p])
        gain = torch.relu(sim - cov[:, None]).sum(0)
        score = gain * w if combine == "multi" else gain + w
        sa, sb = float(score[a[slot]]), float(score[b[slot]])
        gap = abs(sa - sb) / max(abs(sa), abs(sb), 1e-300)
        out.append(
            {
                "row": row,
                "slot": slot,
                "torch_pick": a[slot],
                "fused_pick": b[slot],
                "relative_gap": gap,
                "near_tie": gap <= n * 2.0**-23,
            }
        )
    return out


def compare(x: dict, combine: str, plain: dict, fused: dict) -> dict:
    out = {}
    for order in ("pick", "raster"):
        a, b = plain[order], fused[order]
        out[f"equal_{order}"] = bool(torch.equal(a.indices, b.indices) and torch.equal(a.valid, b.valid))
    out["equal"] = out["equal_pick"] and out["equal_raster"]
    if not out["equal_pick"]:
        out["divergences"] = divergences(x, combine, plain["pick"].indices, fused["pick"].indices)
        out["only_near_ties"] = all(d["near_tie"] for d in out["divergences"])
    return out


def make_inputs(batch: int, tokens: int, dim: int, seed: int, alpha: float) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    feats = torch.randn(batch, tokens, dim, device=DEVICE, generator=g).to(dtype)
    # LLaVA's patch features share a large common direction: cosine similarities mostly positive
    feats = feats + 2.0 * torch.randn(1, 1, dim, device=DEVICE, generator=g).to(dtype)
    saliency = torch.softmax(4 * torch.randn(batch, tokens, device=DEVICE, generator=g), dim=-1)
    return {"features": feats, "saliency": saliency, "alpha": alpha}


def prologue(x: dict) -> Callable[[], object]:
    import torch.nn.functional as F

    def run():
        f = F.normalize(x["features"].float(), dim=-1)
        return f @ f.transpose(1, 2), x["saliency"].float().clamp(min=0) ** x["alpha"]

    return run


def run_grid(
    x: dict, keeps: list[int], combines: list[str], warmup: int, repeats: int, rows: list, problems: list
) -> None:
    from vtprune.methods.scope import scope_select

    batch, tokens = x["saliency"].shape
    floor = cuda_ms(prologue(x), warmup, repeats)
    for combine in combines:
        for k in keeps:
            row = {
                "batch": batch,
                "tokens": tokens,
                "dim": x["features"].shape[-1],
                "keep": k,
                "combine": combine,
                "alpha": x["alpha"],
                "prologue": floor,
            }
            try:

                def call(sort, k=k, combine=combine):
                    return scope_select(x["features"], x["saliency"], k, x["alpha"], combine, sort=sort)

                plain = with_triton("0", lambda: call(True))
                fused = with_triton("strict", lambda: call(True))
                row["torch"] = cuda_ms(plain, warmup, repeats)
                row["fused"] = cuda_ms(fused, warmup, repeats)
                row["speedup"] = row["torch"]["median_ms"] / row["fused"]["median_ms"]
                results = {
                    name: {
                        "pick": with_triton(flag, lambda: call(False))(),
                        "raster": with_triton(flag, lambda: call(True))(),
                    }
                    for name, flag in (("torch", "0"), ("fused", "strict"))
                }
                row.update(compare(x, combine, results["torch"], results["fused"]))
                row["chunks_computed"] = chunk_fraction(x, k, combine)
                if not row["equal"] and not row.get("only_near_ties"):
                    problems.append(
                        f"keep={k} combine={combine}: picks differ beyond a float32 near-tie: "
                        f"{[d for d in row.get('divergences', []) if not d['near_tie']]}"
                    )
            except Exception as exc:  # keep going: one failure must not hide the other figures
                row["error"] = f"{type(exc).__name__}: {exc}"
                row["traceback"] = traceback.format_exc()
                problems.append(f"keep={k} combine={combine}: {row['error']}")
                print(row["traceback"], file=sys.stderr)
            rows.append(row)
            print_row(row)


def chunk_fraction(x: dict, k: int, combine: str) -> float:
    """Fraction of the column chunks the lazy kernel computes (bare kernel call, default tile)."""
    import torch.nn.functional as F

    from vtprune.kernels import greedy

    f = F.normalize(x["features"].float(), dim=-1)
    weight = x["saliency"].float().clamp(min=0) ** x["alpha"]
    avail = torch.ones(weight.shape, dtype=torch.bool, device=DEVICE)
    with_triton(
        "strict", lambda: greedy.scope_fused(f @ f.transpose(1, 2), weight, k, avail, combine == "multi")
    )()
    computed, total = greedy._scope_chunks
    return computed.float().mean().item() / total


def sweep_tiles(x: dict, keep: int, warmup: int, repeats: int) -> list[dict]:
    """The bare fused kernel (no graph, no prologue) for several (BLOCK_J, ROWS, num_warps) tiles."""
    import torch.nn.functional as F

    from vtprune.kernels import greedy

    f = F.normalize(x["features"].float(), dim=-1)
    sim = f @ f.transpose(1, 2)
    weight = x["saliency"].float() ** x["alpha"]
    avail = torch.ones(weight.shape, dtype=torch.bool, device=DEVICE)
    reference = None
    out = []
    mode = os.environ.get("VTPRUNE_TRITON")
    os.environ["VTPRUNE_TRITON"] = "strict"
    default = greedy._scope_shape(sim.shape[1])
    try:
        tiles = [None, (32, 128, 8), (32, 256, 4), (32, 256, 16), (16, 512, 8), (64, 128, 8), (64, 64, 4)]
        for tile, lazy in [(t, True) for t in tiles] + [(None, False), ((64, 128, 8), False)]:
            greedy._SCOPE_LAZY = lazy
            greedy._SCOPE_TILE = tile
            name = (f"default {default}" if tile is None else str(tile)) + ("" if lazy else " full")
            try:
                t = cuda_ms(lambda: greedy.scope_fused(sim, weight, keep, avail, True), warmup, repeats)
                picks = greedy.scope_fused(sim, weight, keep, avail, True)[0]
                computed, total = greedy._scope_chunks
                frac = computed.float().mean().item() / total
                reference = picks if reference is None else reference
                same = bool(torch.equal(picks, reference))
                out.append(
                    {"tile": name, "keep": keep, "same_as_default": same, "chunks_computed": frac, **t}
                )
                print(
                    f"  tile {name:28s} keep {keep:4d}  {t['median_ms']:8.3f} ms  chunks computed {frac:5.1%}  "
                    f"same picks: {same}"
                )
            except Exception as exc:
                out.append({"tile": name, "error": f"{type(exc).__name__}: {exc}"})
                print(f"  tile {name:22s} error: {exc}", file=sys.stderr)
    finally:
        greedy._SCOPE_TILE = None
        greedy._SCOPE_LAZY = True
        if mode is None:
            os.environ.pop("VTPRUNE_TRITON", None)
        else:
            os.environ["VTPRUNE_TRITON"] = mode
    return out


HEADER = (
    f"{'B x N x D':16s} {'combine':7s} {'keep':>5s} {'torch ms':>9s} {'fused ms':>9s} {'speedup':>8s} "
    f"{'prologue':>9s} {'chunks':>7s}  equal"
)


def print_row(row: dict) -> None:
    shape = f"{row['batch']}x{row['tokens']}x{row['dim']}"
    if "error" in row:
        print(f"{shape:16s} {row['combine']:7s} {row['keep']:5d}  ERROR {row['error']}")
        return
    print(
        f"{shape:16s} {row['combine']:7s} {row['keep']:5d} {row['torch']['median_ms']:9.3f} "
        f"{row['fused']['median_ms']:9.3f} {row['speedup']:7.1f}x {row['prologue']['median_ms']:9.3f} "
        f"{row['chunks_computed']:7.1%}  "
        f"{'yes' if row['equal'] else 'near-ties only' if row.get('only_near_ties') else 'NO'}"
    )
    for d in row.get("divergences", []):
        print(
            f"    row {d['row']} slot {d['slot']}: torch {d['torch_pick']} fused {d['fused_pick']}, "
            f"relative score gap {d['relative_gap']:.2e} ({'near-tie' if d['near_tie'] else 'NOT a near-tie'})"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, type=Path, help="JSON file to write")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=576)
    p.add_argument("--dim", type=int, default=1024, help="feature width (CLIP-L's feature layer: 1024)")
    p.add_argument("--keeps", default="64,128,192", help="comma-separated budgets")
    p.add_argument("--combines", default="multi,add", help="comma-separated: multi, add")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep-tiles", action="store_true", help="also time the bare kernel per tile shape")
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: a smoke run of this script under TRITON_INTERPRET=1 (tiny sizes; timings meaningless)",
    )
    args = p.parse_args()

    global DEVICE
    keeps = kernels_bench.prepare(args)
    DEVICE = kernels_bench.DEVICE
    combines = args.combines.split(",")
    if any(c not in ("multi", "add") for c in combines):
        fail(f"--combines takes multi and/or add; got {args.combines!r}")
    import vtprune
    from vtprune.kernels import greedy

    started = time.perf_counter()
    report = {
        **kernels_bench.environment(args),
        "vtprune": str(Path(vtprune.__file__).parent),
        "default_tile": list(greedy._scope_shape(args.tokens)),
        "rows": [],
    }
    problems: list[str] = []
    print(
        f"{report['device']}  torch {report['torch']}  triton {report['triton']}  vtprune {report['vtprune']}"
    )
    print(HEADER)
    x = make_inputs(args.batch, args.tokens, args.dim, args.seed, args.alpha)
    run_grid(x, keeps, combines, args.warmup, args.repeats, report["rows"], problems)
    if args.sweep_tiles:
        print("bare fused kernel by tile (BLOCK_J, ROWS, num_warps):")
        report["tile_sweep"] = sweep_tiles(x, max(keeps), args.warmup, args.repeats)
    kernels_bench.finish(args, report, problems, started)


if __name__ == "__main__":
    main()
