"""GPU micro-benchmarks of fixes proposed in benchmarks/results/README.md (not used by vtprune itself).

1. TokenCarve's information score SV (row L1 norms of U·S): `torch.linalg.svd` of the (B, N, D) image
   hidden states vs. the same U·S from `eigh` of the (B, N, N) Gram matrix H·Hᵀ = U S² Uᵀ (column signs
   differ, |U·S| does not).
2. SparseVLM v1's rater × visual rank: one `matrix_rank` + host sync per sample vs. one batched call with
   the same per-sample tolerance (zero padding does not change a rank).
3. `vtprune.bench.runner.gpu_busy_us` against the profiler's own "Self CUDA time total".

    python benchmarks/selection_fix_candidates.py [--device cuda] [--batch 16] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # vtprune from this checkout, installed or not


def timed(fn, device: torch.device, repeats: int = 5) -> tuple[float, object]:
    """Median ms of `repeats` calls after one warm-up (events on a GPU)."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], out


def borda_points(scores: torch.Tensor) -> torch.Tensor:
    n = scores.shape[-1]
    order = torch.sort(-scores, dim=-1, stable=True).indices
    pts = torch.arange(n, 0, -1, device=scores.device, dtype=torch.float32).expand_as(scores)
    return torch.empty_like(scores, dtype=torch.float32).scatter_(-1, order, pts)


def tokencarve_sv(batch: int, n: int, d: int, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    # Hidden states with a few dominant directions, like an LLM's (random weights give near-isotropic ones).
    base = torch.randn(batch, n, d, device=device, generator=gen)
    low = torch.randn(batch, n, 8, device=device, generator=gen) @ torch.randn(
        batch, 8, d, device=device, generator=gen
    )
    h = (base + 3.0 * low).float()

    def via_svd():
        u, s, _ = torch.linalg.svd(h, full_matrices=False)
        return (u * s.unsqueeze(1)).abs().sum(dim=-1)

    def via_eigh(dtype):
        def run():
            g = (h @ h.transpose(1, 2)).to(dtype)
            lam, u = torch.linalg.eigh(g)
            return (u * lam.clamp(min=0).sqrt().unsqueeze(1)).abs().sum(dim=-1).float()

        return run

    t_svd, sv_ref = timed(via_svd, device)
    out = {"shape": [batch, n, d], "svd_ms": t_svd}
    for name, dtype in (("eigh_fp32", torch.float32), ("eigh_fp64", torch.float64)):
        t, sv = timed(via_eigh(dtype), device)
        rel = float((sv - sv_ref).norm() / sv_ref.norm())
        same_rank = float((borda_points(sv) == borda_points(sv_ref)).float().mean())
        top = n // 2
        overlap = float(
            sum(
                len(set(a[:top].tolist()) & set(b[:top].tolist())) / top
                for a, b in zip(
                    torch.sort(-sv, dim=-1).indices, torch.sort(-sv_ref, dim=-1).indices, strict=True
                )
            )
            / batch
        )
        out[name] = {"ms": t, "rel_err": rel, "same_borda_points": same_rank, "top_half_overlap": overlap}
    return out


def sparsevlm_rank(batch: int, q: int, v: int, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(1)
    logits = torch.randn(batch, q, v, device=device, generator=gen) * 3
    block = torch.softmax(logits, dim=-1)
    rows = torch.randint(q // 2, q + 1, (batch,), generator=torch.Generator().manual_seed(2)).tolist()
    cols = torch.randint(v // 2, v + 1, (batch,), generator=torch.Generator().manual_seed(3)).tolist()

    def per_sample():
        return [int(torch.linalg.matrix_rank(block[b, : rows[b], : cols[b]])) for b in range(batch)]

    row_mask = torch.arange(q, device=device)[None, :] < torch.tensor(rows, device=device)[:, None]
    col_mask = torch.arange(v, device=device)[None, :] < torch.tensor(cols, device=device)[:, None]
    eps = torch.finfo(torch.float32).eps
    rtol = torch.tensor([max(r, c) * eps for r, c in zip(rows, cols, strict=True)], device=device)

    def batched():
        masked = block * row_mask[:, :, None] * col_mask[:, None, :]
        return torch.linalg.matrix_rank(masked, rtol=rtol).tolist()

    t_loop, ref = timed(per_sample, device)
    t_batch, got = timed(batched, device)
    return {"shape": [batch, q, v], "per_sample_ms": t_loop, "batched_ms": t_batch, "equal": ref == got}


def busy_check(device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from vtprune.bench.runner import gpu_busy_us

    x = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            x = (x @ x).sin_()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    table = averages.table(sort_by="self_device_time_total", row_limit=3)
    footer = [line for line in table.splitlines() if "CUDA time total" in line]
    return {"gpu_busy_us": gpu_busy_us(averages), "profiler_footer": footer}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    parts = {
        "tokencarve_sv": lambda: [
            tokencarve_sv(b, args.tokens, args.hidden, device) for b in (1, args.batch)
        ],
        "sparsevlm_rank": lambda: [sparsevlm_rank(b, 24, args.tokens, device) for b in (1, args.batch)],
    }
    if device.type == "cuda":
        parts["gpu_busy_check"] = lambda: busy_check(device)
    for name, run in parts.items():
        try:  # one failing part must not lose the others
            results[name] = run()
        except Exception as err:  # noqa: BLE001
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
