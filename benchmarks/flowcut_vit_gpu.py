"""FlowCut's vision tower on a GPU: the current vit stage vs the per-layer path it replaced.

Two parts, both against the reference copy of the per-layer path kept in tests/test_flowcut_vit_layers.py
(its engine hooks and `merge_vit`, patched in for the "before" figures):

* equality: a tiny LLaVA with a 10-layer CLIP tower (the tests' `deep` model) on the device, float32 and
  bfloat16: the kept positions, counts, every tower layer's hidden states, the logits and the record must be
  bitwise the reference's (a mismatch makes the exit status 1);
* timing: a LLaVA-1.5-shaped tower (CLIP ViT-L/14 at 336 px: 24 layers, 1024 wide, 577 tokens, bf16, sdpa;
  random weights, a tiny LLM that is never run) at batch 16: wall time of one tower forward
  (`get_image_features`, synchronised; medians of `--repeats`) unpruned, with FlowCut (keep 192 / 128 / 64)
  and with the reference path, plus the aten operations each dispatches.

    python benchmarks/flowcut_vit_gpu.py --output flowcut_vit.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's vtprune, and the reference in its tests

import pytest  # noqa: E402  (the reference path lives in a test module)
import test_flowcut_vit_layers as ref  # noqa: E402
from conftest import QUESTIONS, build_inputs  # noqa: E402

import vtprune  # noqa: E402
from vtprune.models.llava import LlavaAdapter  # noqa: E402
from vtprune.testing import make_tiny_llava  # noqa: E402


def to_device(inputs, device, dtype):
    out = {k: v.to(device) for k, v in inputs.items()}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def equality(device: str) -> dict:
    report = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, processor = make_tiny_llava(seed=0, vision_layers=10)
        with torch.no_grad():
            for layer in LlavaAdapter(model).vision_layers:
                layer.self_attn.q_proj.weight.mul_(5)
                layer.self_attn.k_proj.weight.mul_(5)
        model = model.to(device=device, dtype=dtype).eval()
        for params in ref.PARAMS:
            for questions, seeds in ref.BATCHES:
                inputs = to_device(
                    build_inputs(processor, [QUESTIONS[q] for q in questions], seeds), device, dtype
                )
                name = f"{str(dtype)[6:]} {params} images {len(seeds)}"
                new = ref.results(model, inputs, params)
                with pytest.MonkeyPatch.context() as patch:
                    ref.use_reference(patch)
                    old = ref.results(model, inputs, params)
                try:
                    ref.assert_same(new, old)
                    report[name] = "equal"
                except AssertionError as error:
                    report[name] = f"DIFFERENT: {error}"
                print(name, report[name], flush=True)
    return report


def timing(device: str, batch: int, repeats: int) -> dict:
    model, _ = make_tiny_llava(
        seed=0, image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16
    )
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, 336, 336, generator=g).to(device=device, dtype=torch.bfloat16)
    inputs = {"pixel_values": pixels}

    def tower():
        ref.tower_features(model, inputs)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(label):
        with torch.no_grad():
            for _ in range(3):
                tower()
            sync()
            walls = []
            for _ in range(repeats):
                start = time.perf_counter()
                tower()
                sync()
                walls.append((time.perf_counter() - start) * 1e3)
            with ref.OpCounter() as counter:
                tower()
        result = {"wall_ms": statistics.median(walls), "aten_ops": counter.count}
        print(f"{label}: {result['wall_ms']:.2f} ms, {counter.count} aten ops", flush=True)
        return result

    out = {"unpruned": timed("unpruned")}
    for keep in (192, 128, 64):
        with vtprune.pruned(model, "flowcut", keep=keep):
            out[f"flowcut keep={keep}"] = timed(f"flowcut keep={keep}")
        with pytest.MonkeyPatch.context() as patch:
            ref.use_reference(patch)
            with vtprune.pruned(model, "flowcut", keep=keep):
                out[f"per-layer path keep={keep}"] = timed(f"per-layer path keep={keep}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-equality", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device}
    if not args.skip_equality:
        report["equality"] = equality(args.device)
    if not args.skip_timing:
        report["timing"] = timing(args.device, args.batch, args.repeats)
    args.output.write_text(json.dumps(report, indent=2))
    sys.exit(0 if all(v == "equal" for v in report.get("equality", {}).values()) else 1)


if __name__ == "__main__":
    main()
