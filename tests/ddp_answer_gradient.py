"""Run by tests/test_testbed_train.py under `torchrun --nproc-per-node 2` (gloo, CPU): each process takes its half
of one batch through the DDP-wrapped stage-2 objective; process 0 checks that the averaged gradient equals the
gradient of the whole batch in one process, and writes "ok" to the file named by argv[1]."""

from __future__ import annotations

import faulthandler
import sys

import numpy as np
import torch

from vtprune.eval.distributed import DistContext, end_launched_process
from vtprune.testbed import train
from vtprune.testbed.model import build_model, build_processor


def main() -> None:
    # a hang shows as a failure with every thread's stack, well before the test's own timeout
    faulthandler.dump_traceback_later(200, exit=True)
    ctx = DistContext.from_env()
    processor = build_processor()
    pool = train.build_pool(4, seed=0, workers=1)
    cfg = train.parse_args(["--smoke", "--batch-size", "4", "--caption-fraction", "0.5"])
    batch = train.QuestionBatches(pool.scenes, processor, cfg, 576).make_batch(np.random.default_rng(0))
    model = build_model(processor, seed=0, **train.TINY_MODEL)
    _, layers = train.tower_top_layers(model, 1)
    normalise = train.PixelNormaliser(processor, torch.device("cpu"))
    with torch.no_grad():  # the cached input of the trained top layer
        hidden = model.model.vision_tower(normalise(pool.pixels[batch["index"]]), output_hidden_states=True)
        cached = hidden.hidden_states[len(model.model.vision_tower.encoder.layers) - 2]

    objective = train.AnswerObjective(model, layers, per_example=True)
    mine = slice(2 * ctx.rank, 2 * ctx.rank + 2)
    wrapped = train.data_parallel(objective, ctx, torch.device("cpu"))
    wrapped(cached[mine], batch["input_ids"][mine], batch["labels"][mine])[0].backward()
    grads = [p.grad.clone() for p in objective.parameters() if p.grad is not None]

    if ctx.is_main:
        reference = build_model(processor, seed=0, **train.TINY_MODEL)
        _, ref_layers = train.tower_top_layers(reference, 1)
        ref = train.AnswerObjective(reference, ref_layers, per_example=True)
        ref(cached, batch["input_ids"], batch["labels"])[0].backward()
        expected = [p.grad for p in ref.parameters() if p.grad is not None]
        assert len(grads) == len(expected) > 0
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        with open(sys.argv[1], "w") as f:
            f.write("ok")
    train._leave(ctx)


if __name__ == "__main__":
    main()
    end_launched_process()
