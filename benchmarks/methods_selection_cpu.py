"""Time the vision-stage methods' `select()` for LLaVA-1.5's 576 -> 64 visual tokens on CPU.

What is timed is the method's own selection step as the engine calls it (`method.select(0, stage,
signals)`), on random tensors of LLaVA-1.5-7B's shapes: projected tokens (N, 576, 4096), CLIP layer-22
features (N, 577, 1024) incl. [CLS], [CLS] attention of 16 heads and keys of 16 x 64. Rows:

* `cdpruner[none]`: the conditional-DPP kernel (576 x 576 cosine of 4096-d tokens) + greedy DPP, ρ̃ = 1;
* `cdpruner[rho]`: the same with a given relevance row (what the DPP costs once ρ is known);
* `cdpruner[clip]`: the whole relevance path too — prompt decoding, a CLIP ViT-L/14-336-sized text tower
  (12 layers, width 768, random weights: no download) on a 17-token question (a different one per sample
  of a batch), post-layernorm + visual
  projection of the 576 patches — then the DPP. Loading the tower is done once, before timing;
* `divprune`: 576 x 576 cosine distances of 4096-d tokens + greedy max–min;
* `visionzip` (54 dominant + 10 contextual): [CLS]-attention top-k, key-similarity merge, and the LLaVA
  projector (1024 -> 4096 -> 4096, random weights) applied to the 11 created tokens.

Every (method, batch) row is timed `--repeats` times after `--warmup` calls, in `--rounds` interleaved passes;
figures are the median and the minimum over all of them (on a shared machine the minimum is the better
estimate of uncontended time; the JSON records the load average before and after).

    python benchmarks/methods_selection_cpu.py      # writes benchmarks/results/methods_selection_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

import vtprune
from vtprune.methods.base import Stage

N_TOKENS = 576
KEEP = 64
LLM_WIDTH = 4096
CLIP_WIDTH = 1024
CLIP_HEADS = 16
QUESTION = "is there a red circle in the image ? answer the question using a single word or phrase ."


def fake_signals(batch: int, generator: torch.Generator, projector: nn.Module, adapter) -> SimpleNamespace:
    hidden = torch.randn(batch, N_TOKENS + 1, CLIP_WIDTH, generator=generator)
    logits = torch.randn(batch, CLIP_HEADS, N_TOKENS + 1, generator=generator) * 3
    cls_heads = logits.softmax(dim=-1)[:, :, 1:]
    input_ids = torch.cat([adapter.prompt_ids(i) for i in range(batch)])  # a different question per sample
    is_image = input_ids == adapter.image_token_id
    return SimpleNamespace(
        adapter=adapter,
        hidden=hidden,
        features=hidden[:, 1:],
        projected=torch.randn(batch, N_TOKENS, LLM_WIDTH, generator=generator),
        cls_attention_heads=cls_heads,
        cls_attention=cls_heads.mean(dim=1),
        keys=torch.randn(batch, N_TOKENS + 1, CLIP_WIDTH, generator=generator),
        image_sample=torch.arange(batch),
        input_ids=input_ids,
        text_valid=~is_image,
        project=lambda x: projector(x),
    )


def clip_l_sized(directory: Path):
    """A random CLIP with ViT-L/14-336's text tower and projections (vision encoder cut to 1 layer), saved."""
    from transformers import CLIPConfig, CLIPModel

    from vtprune.testing import BASIC_WORDS, build_clip_word_tokenizer

    tokenizer = build_clip_word_tokenizer(BASIC_WORDS)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, bos_token_id=0, eos_token_id=1),
        vision_config=dict(hidden_size=CLIP_WIDTH, intermediate_size=4096, num_hidden_layers=1,
                           num_attention_heads=CLIP_HEADS, image_size=336, patch_size=14),
        projection_dim=768,
    )
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def time_call(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row and round")
    parser.add_argument("--rounds", type=int, default=3, help="passes over every row, interleaved")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "methods_selection_cpu.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    projector = nn.Sequential(nn.Linear(CLIP_WIDTH, LLM_WIDTH), nn.GELU(), nn.Linear(LLM_WIDTH, LLM_WIDTH)).eval()

    from vtprune.testing import BASIC_WORDS, build_word_tokenizer

    llava_tok = build_word_tokenizer(list(BASIC_WORDS))
    image_id = llava_tok.convert_tokens_to_ids("<image>")
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle", "cat"]

    def prompt_ids(i: int) -> torch.Tensor:
        question = QUESTION.replace("red circle", f"{colours[i % 4]} {shapes[i // 4 % 4]}")
        return llava_tok("USER: " + "<image>" * N_TOKENS + " " + question + " ASSISTANT:", return_tensors="pt").input_ids

    adapter = SimpleNamespace(image_token_id=image_id, prompt_ids=prompt_ids, config=SimpleNamespace(_name_or_path=""),
                              vision_tower=None)

    tmp = tempfile.TemporaryDirectory()
    clip_dir = Path(tmp.name) / "clip"
    clip_l_sized(clip_dir)
    methods = {
        "cdpruner[none]": vtprune.get_method("cdpruner", keep=KEEP, relevance="none"),
        "cdpruner[rho]": vtprune.get_method("cdpruner", keep=KEEP, relevance="none"),
        "cdpruner[clip]": vtprune.get_method("cdpruner", keep=KEEP, clip_model=str(clip_dir), prompt_tokenizer=llava_tok),
        "divprune": vtprune.get_method("divprune", keep=KEEP),
        "visionzip": vtprune.get_method("visionzip", keep=KEEP),
    }
    stage = Stage(kind="vision", keep=KEEP)
    load_before = os.getloadavg()[0]
    inputs = {}
    for batch in args.batches:
        inputs[batch] = (fake_signals(batch, generator, projector, adapter), torch.randn(batch, N_TOKENS, generator=generator))
    times: dict[tuple[str, int], list[float]] = {}
    with torch.no_grad():
        # Rounds interleave every (method, batch) so that load from other processes spreads over all rows.
        for _ in range(args.rounds):
            for batch, (signals, rho) in inputs.items():
                for name, method in methods.items():
                    if name == "cdpruner[rho]":
                        method.relevance_scores = lambda s, rho=rho: rho
                    sel = method.select(0, stage, signals)  # the first call also loads the CLIP tower
                    count = sel.indices.shape[1] + (0 if sel.extra is None else sel.extra.shape[1])
                    assert count == KEEP, (name, count)
                    run = time_call(lambda m=method, s=signals: m.select(0, stage, s), args.warmup, args.repeats)
                    times.setdefault((name, batch), []).extend(run)
    results = []
    for (name, batch), run in times.items():
        median = statistics.median(run)
        results.append({
            "method": name, "batch": batch, "median_ms": round(median, 2), "per_sample_ms": round(median / batch, 2),
            "min_ms": round(min(run), 2), "min_per_sample_ms": round(min(run) / batch, 2), "max_ms": round(max(run), 2),
            "runs": len(run),
        })
        print(f"{name:16s} batch {batch:3d}: median {median:9.2f} ms  ({median / batch:8.2f} ms/sample)  "
              f"min {min(run):9.2f} ms  ({min(run) / batch:8.2f} ms/sample)", flush=True)
    meta = {
        "tokens": N_TOKENS, "keep": KEEP, "projected_width": LLM_WIDTH, "clip_width": CLIP_WIDTH,
        "device": "cpu", "device_name": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]], "warmup": args.warmup,
        "rounds": args.rounds, "repeats_per_round": args.repeats,
        "dtype": "float32", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
