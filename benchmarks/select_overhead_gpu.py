"""Time HiPrune's and VisPruner's selection pieces on a GPU, against the formulas they replaced.

LLaVA-1.5-7B shapes: B images x 576 patches, CLIP-L q/k of 16 heads x 64 (bf16), features of width 1024 (bf16).
The previous formulas are the references of tests/test_select_overhead.py (the plain "global attention" and
the previous VisPruner loop, replayed as a CUDA graph like the current one). Rows:

* `received_attention`: one layer, the plain formula vs the chunked function at several chunk sizes (ms, peak
  extra memory, largest difference);
* `hiprune_select`: both layers + the selection + the role counts (the method's `select` minus bookkeeping);
* `vispruner_select`: keep 64 / 128 / 192, without and with a valid mask (`vispruner_nosink`), previous loop vs
  current rounds, CUDA-graphed (as the method runs) and, with `--eager`, without graphs.

    python3 benchmarks/select_overhead_gpu.py --output select_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_select_overhead import reference_received, reference_vispruner  # noqa: E402

from vtprune.cuda_graphs import cuda_graphed  # noqa: E402
from vtprune.methods.hiprune import anchor_count, hiprune_select  # noqa: E402
from vtprune.methods.vispruner import vispruner_select  # noqa: E402
from vtprune.signals import attention  # noqa: E402

previous_vispruner = cuda_graphed(reference_vispruner)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 20, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"median_ms": round(times[len(times) // 2], 4), "min_ms": round(times[0], 4)}


def peak_mb(fn) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eager", action="store_true", help="also time VisPruner without CUDA graphs")
    parser.add_argument("--output", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (times mean nothing)")
    args = parser.parse_args()
    dev = args.device
    b, h, t, d = args.batch, 16, 577, 64
    g = torch.Generator(device=dev).manual_seed(0)
    out: dict = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else dev,
        "torch": torch.__version__,
        "batch": b,
    }

    def qk():
        return [torch.randn(b, h, t, d, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(2)]

    (q, k), (q8, k8) = qk(), qk()
    s = d**-0.5
    expected = reference_received(q, k, s)
    rows = {
        "plain formula": {
            **timed(lambda: reference_received(q, k, s)),
            "peak_mb": peak_mb(lambda: reference_received(q, k, s)),
        }
    }
    for chunk in (1 << 22, 1 << 23, 1 << 24, 1 << 25, 1 << 26, 1 << 28):
        got = attention.received_attention(q, k, s, chunk)
        rows[f"chunk {chunk}"] = {
            **timed(lambda chunk=chunk: attention.received_attention(q, k, s, chunk)),
            "peak_mb": peak_mb(lambda chunk=chunk: attention.received_attention(q, k, s, chunk)),
            "max_abs_diff": (got - expected).abs().max().item(),
        }
    rows["bf16 matmul with float32 output not switched off"] = attention._BF16_GEMM[0]
    out["received_attention (one layer)"] = rows
    print(json.dumps(rows, indent=1), flush=True)

    def hiprune(received):
        shallow, deep = received(q8, k8, s)[:, 1:], received(q, k, s)[:, 1:]
        picked, role = hiprune_select(shallow, deep, 64, anchor_count(64, 0.1), (24, 24))
        (role[:, None, :] == torch.arange(1, 4, device=dev)[None, :, None]).sum(dim=2)
        return picked

    same = torch.equal(hiprune(reference_received).indices, hiprune(attention.received_attention).indices)
    out["hiprune_select keep 64"] = {
        "plain formula": timed(lambda: hiprune(reference_received)),
        "current": timed(lambda: hiprune(attention.received_attention)),
        "same_indices": same,
    }
    print(out["hiprune_select keep 64"], flush=True)

    attn = torch.rand(b, 576, device=dev, generator=g)
    feats = torch.randn(b, 576, 1024, device=dev, generator=g, dtype=torch.bfloat16)
    valid = torch.rand(b, 576, device=dev, generator=g) > 0.05
    modes = [("graphed", "1")] + ([("eager", "0")] if args.eager else [])
    for mode, flag in modes:
        os.environ["VTPRUNE_CUDA_GRAPHS"] = flag
        table = {}
        for keep in (64, 128, 192):
            for v in (None, valid):
                name = f"keep {keep}" + (" valid" if v is not None else "")
                a = previous_vispruner(attn, feats, keep, valid=v)
                c = vispruner_select(attn, feats, keep, valid=v)
                table[name] = {
                    "previous": timed(lambda keep=keep, v=v: previous_vispruner(attn, feats, keep, valid=v)),
                    "current": timed(lambda keep=keep, v=v: vispruner_select(attn, feats, keep, valid=v)),
                    "same_indices": bool(torch.equal(a.indices, c.indices) and torch.equal(a.valid, c.valid)),
                }
                print(mode, name, table[name], flush=True)
        out[f"vispruner_select ({mode})"] = table
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
