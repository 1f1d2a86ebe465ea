"""Where the time of one stage-2 training step of the testbed model goes (GPU).

    python benchmarks/testbed_train_profile.py [--images 2048] [--steps 100]

Prints, for the recipe's model and batch: the data loader's throughput alone; the training step alone (batches
made beforehand, so no loader); a `torch.profiler` table of one stretch of steps (the ops with the most self CPU
and the most CUDA time); then the step on batches padded as `--compile` pads them, eager and with the language
model under `torch.compile` (static shapes, as `--compile` trains). A step much slower than its CUDA time is
bound by the host (Python, launches, syncs). `dynamic=True` without padding measured 165.7 ms a step on an H200,
far slower than eager, which is why `--compile` pads.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from vtprune.testbed import train
from vtprune.testbed.model import build_model, build_processor

RECIPE = (
    "--position-weight 10 --position-loss mse --quadrant-weight 1 --region-fraction 0.15 --caption-fraction 0.2 "
    "--tower-layers 1 --tower-lr 1e-4 --per-example-loss --centre-projector --binding-fraction 0.3 "
    "--attribute-fraction 0.3"
).split()


def timed_steps(objective, opt, params, features, batches, device, autocast) -> float:
    """Mean ms of a training step over `batches` (after 10 warm-up steps)."""
    for i, batch in enumerate(batches):
        if i == 10:
            torch.cuda.synchronize()
            t0 = time.time()
        feats = features[batch["index"].to(device)]
        with autocast():
            loss, _ = objective(feats, batch["input_ids"].to(device), batch["labels"].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    torch.cuda.synchronize()
    return (time.time() - t0) * 1000 / (len(batches) - 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--workers", type=int, default=15)
    args = parser.parse_args()
    cfg = train.parse_args(RECIPE + ["--train-images", str(args.images), "--workers", str(args.workers)])
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    processor = build_processor()
    model = build_model(processor, seed=0).to(device).train()
    pool = train.build_pool(args.images, 0, args.workers)
    pool.pixels = pool.pixels.to(device)
    normalise = train.PixelNormaliser(processor, device)
    features = train.precompute_features(
        model, pool, normalise, device, autocast, tower_layers=cfg.tower_layers
    )
    dataset = train.QuestionBatches(pool.scenes, processor, cfg, model.config.image_seq_length)

    loader = DataLoader(dataset, batch_size=None, num_workers=args.workers, prefetch_factor=4)
    t0, batches = time.time(), []
    for batch in loader:
        batches.append(batch)
        if len(batches) == 10:
            t0 = time.time()
        if len(batches) == args.steps + 10:
            break
    print(
        f"data loader alone ({args.workers} workers): {(time.time() - t0) * 1000 / args.steps:.1f} ms/batch"
    )
    rng = np.random.default_rng(0)
    t0 = time.time()
    for _ in range(20):
        dataset.make_batch(rng)
    print(f"one batch made in the main process: {(time.time() - t0) * 1000 / 20:.1f} ms")
    tokens = np.mean([b["input_ids"].numel() for b in batches])
    print(f"batch: {cfg.batch_size} rows, {tokens:.0f} tokens on average")

    _, tower_layers = train.tower_top_layers(model, cfg.tower_layers)
    objective = train.AnswerObjective(model, tower_layers, cfg.per_example_loss)
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    eager = timed_steps(objective, opt, params, features, batches, device, autocast)
    print(f"training step, batches made beforehand (eager): {eager:.1f} ms")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed_steps(objective, opt, params, features, batches[:30], device, autocast)
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=15))
    print(table.table(sort_by="self_cuda_time_total", row_limit=15))
    print("(the profiled stretch is 20 steps: the 30 batches less 10 warm-up steps, which it also covers)")

    # `--compile` pads every batch to a multiple of train.PAD_MULTIPLE, so that the compiled graph sees one shape
    padder = train.QuestionBatches(
        pool.scenes, processor, replace(cfg, compile=True), model.config.image_seq_length
    )
    padded = [padder.make_batch(np.random.default_rng(i)) for i in range(len(batches))]
    width = padded[0]["input_ids"].shape[1]
    eager_padded = timed_steps(objective, opt, params, features, padded, device, autocast)
    print(f"training step, padded to {width} tokens (eager): {eager_padded:.1f} ms")
    model.model.language_model.compile(dynamic=False)  # as train.train_llm does with --compile
    t0 = time.time()
    timed_steps(objective, opt, params, features, padded[:12], device, autocast)
    print(f"torch.compile warm-up: {time.time() - t0:.0f} s")
    compiled = timed_steps(objective, opt, params, features, padded, device, autocast)
    print(f"training step, padded, language model compiled: {compiled:.1f} ms")


if __name__ == "__main__":
    main()
