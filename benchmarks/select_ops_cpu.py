"""Count what HiPrune's and VisPruner's selection would cost on a GPU, on CPU: aten ops, host syncs, bytes.

CPU time says little about GPU work, so this counts what does cost there, on LLaVA-1.5-7B's shapes
(B images x 576 patches, CLIP-L/14 q/k of 16 heads x 64, features of width 1024; synthetic, float32):

* `kernels`: aten ops that produce a new tensor or write one in place (views, reshapes and other aliasing
  ops excluded): roughly the kernels a GPU would launch;
* `syncs`: calls that would wait for the GPU (`tolist`, `item`, `bool()`, `int()`, `float()`,
  `__index__`, the data-dependent-shape ops `nonzero`, `masked_select`, `unique`, and `torch.tensor(<host
  data>)` on the device: a blocking host-to-device copy);
* `largest_mb`: the largest single tensor an op produced; `written_mb`: the bytes all ops wrote.

Rows: `received_attention` (one layer's "global attention" from q/k), `hiprune.select` (both layers +
selection), `vispruner_select` at keep 64 / 128 (with and without a valid mask), and `vispruner.select`
(the [CLS] attention row, sinks, selection).

    python benchmarks/select_ops_cpu.py [--batch 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's vtprune

SYNC_METHODS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")
SYNC_OPS = ("nonzero", "masked_select", "unique", "_local_scalar_dense", "_unique2", "repeat_interleave")


class OpCounter(TorchDispatchMode):
    """Counts aten ops (by name), the ones that launch work, the bytes they write and the largest output."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.kernels = 0
        self.written = 0
        self.largest = 0
        self.sync_ops = 0
        self.from_host = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name == "lift_fresh":  # torch.tensor(<host data>): on a GPU a blocking host-to-device copy
            self.from_host += 1
        if name in SYNC_OPS and not (
            name == "repeat_interleave" and len(args) > 1 and not isinstance(args[1], torch.Tensor)
        ):
            self.sync_ops += 1
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs if a.device.type != "meta"}
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        for o in outs:
            inplace = name.endswith("_") or "out" in (kwargs or {})
            if inplace or o.untyped_storage().data_ptr() not in storages:
                size = o.numel() * o.element_size()
                self.written += size
                self.largest = max(self.largest, size)
        if outs and any(name.endswith("_") or o.untyped_storage().data_ptr() not in storages for o in outs):
            self.kernels += 1
        return out


@contextlib.contextmanager
def counting_syncs():
    calls: Counter = Counter()
    saved = {}
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)
        saved[name] = original

        def wrapped(tensor, *a, _name=name, _original=original, **k):
            calls[_name] += 1
            return _original(tensor, *a, **k)

        setattr(torch.Tensor, name, wrapped)
    try:
        yield calls
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def measure(fn, warm: bool = False) -> dict:
    """Counts of one call of fn (after one uncounted call when `warm`: one-time setup excluded)."""
    if warm:
        fn()
    with counting_syncs() as syncs, OpCounter() as counter:
        out = fn()
    return {
        "kernels": counter.kernels,
        "ops": sum(counter.ops.values()),
        "syncs": sum(syncs.values()) + counter.sync_ops + counter.from_host,
        "from_host": counter.from_host,
        "sync_calls": dict(syncs),
        "largest_mb": round(counter.largest / 2**20, 2),
        "written_mb": round(counter.written / 2**20, 1),
        "top_ops": counter.ops.most_common(8),
        "_out": out,
    }


def fake_signals(
    batch: int, heads: int = 16, patches: int = 576, head_dim: int = 64, width: int = 1024, seed: int = 0
):
    from vtprune.methods.base import ModelInfo
    from vtprune.signals.context import Captured, VisionSignals

    g = torch.Generator().manual_seed(seed)
    t = patches + 1
    side = int(patches**0.5)

    def qk():
        return Captured(
            torch.randn(batch, heads, t, head_dim, generator=g),
            torch.randn(batch, heads, t, head_dim, generator=g),
            head_dim**-0.5,
        )

    info = SimpleNamespace(vision_layers=24)
    adapter = SimpleNamespace(
        feature_layer=22, grid=(side, side), select_strategy="default", has_cls=True, info=lambda: info
    )
    del ModelInfo
    hidden = torch.randn(batch, t, width, generator=g)
    return VisionSignals(
        adapter=adapter,
        hidden=hidden,
        projected=torch.zeros(batch, patches, 1),
        image_sample=torch.arange(batch),
        input_ids=torch.zeros(1, 1, dtype=torch.long),
        text_valid=torch.zeros(1, 1, dtype=torch.bool),
        captured=qk(),
        layer_captures={8: qk()},
    )


def rows(batch: int) -> dict:
    from vtprune.methods.base import Stage
    from vtprune.methods.hiprune import HiPrune
    from vtprune.methods.vispruner import VisPruner, VisPrunerNoSink, vispruner_select

    out = {}
    sig = fake_signals(batch)
    out["received_attention (1 layer)"] = measure(lambda: sig.received_attention(22))
    for keep in (64, 128):
        sig = fake_signals(batch)
        out[f"hiprune.select keep={keep}"] = measure(
            lambda keep=keep, sig=sig: HiPrune(keep=keep).select(0, Stage(kind="vision", keep=keep), sig)
        )
    g = torch.Generator().manual_seed(1)
    attn = torch.rand(batch, 576, generator=g)
    feats = torch.randn(batch, 576, 1024, generator=g)
    valid = torch.rand(batch, 576, generator=g) > 0.05
    for keep in (64, 128):
        out[f"vispruner_select keep={keep}"] = measure(
            lambda keep=keep: vispruner_select(attn, feats, keep), warm=True
        )
        out[f"vispruner_select keep={keep} valid"] = measure(
            lambda keep=keep: vispruner_select(attn, feats, keep, valid=valid), warm=True
        )
    for cls in (VisPruner, VisPrunerNoSink):
        sig = fake_signals(batch)
        out[f"{cls.name}.select keep=64"] = measure(
            lambda cls=cls, sig=sig: cls(keep=64).select(0, Stage(kind="vision", keep=64), sig)
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.no_grad():
        result = rows(args.batch)
    for name, r in result.items():
        r.pop("_out")
        print(
            f"{name:38s} kernels {r['kernels']:5d}  ops {r['ops']:5d}  syncs {r['syncs']:3d}  "
            f"largest {r['largest_mb']:8.2f} MB  written {r['written_mb']:8.1f} MB"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "rows": result}, f, indent=1)


if __name__ == "__main__":
    main()
