"""Train the testbed LLaVA on shapes scenes, then evaluate it on held-out data and save it.

    python -m vtprune.testbed.train --out DIR --seed 0                       # GPU, a model from scratch
    python -m vtprune.testbed.train --out DIR2 --init-from DIR/model ...     # GPU, train a saved model on
    python -m vtprune.testbed.train --out DIR --smoke                        # CPU, minutes: the code path only
    torchrun --standalone --nproc-per-node 4 -m vtprune.testbed.train --out DIR ...   # data parallel, 4 GPUs

Under `torchrun` (or `accelerate launch`) every process trains a replica on its own batches of `--batch-size`
(the global batch is that times the number of processes) and gradients are averaged by DistributedDataParallel;
process 0 logs, saves and evaluates.

Stage 1 pre-trains the vision tower alone: its [CLS] token (after `post_layernorm`) predicts which of the 64
colour-shape classes are present (multi-label), and every patch of the penultimate layer (the features LLaVA
feeds the LLM) predicts the class of the object covering it. Stage 2 freezes the tower, as LLaVA-1.5 does, and
trains the projector and the LLM on captions ("Describe this image." -> objects in reading order), MCQ and
POPE questions, with the loss on the answer tokens and EOS only. Captions matter: a yes/no or letter answer
depends only on the interaction of question and image, and a randomly initialised LLM trained on QA alone
stays at its language prior; a caption is predictable from the image alone, which teaches the LLM to read it.
Prompts are built by the processor's chat template, exactly as at evaluation. The model is saved with
`save_pretrained` (fp16 weights, loaded as fp32 by default), reloaded with `from_pretrained`, and evaluated
with plain batched `generate`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vtprune.eval.distributed import DistContext, end_launched_process, shutdown
from vtprune.testbed import evaluate as ev
from vtprune.testbed import load_testbed
from vtprune.testbed.model import build_model, build_processor
from vtprune.testbed.questions import (
    MCQ_TYPES,
    POSITION_MCQ_TYPES,
    SYSTEM_PROMPT,
    TrainingExample,
    hinted_mcq,
    sample_training_example,
)
from vtprune.testbed.render import BACKGROUND_LABEL, GRID, patch_quadrants, render, sample_scene
from vtprune.testbed.shapes import STREAM_TRAIN, map_indices, mcq_records, pope_records, scene_rng
from vtprune.testbed.world import NUM_CLASSES
from vtprune.testing import IMAGE_TOKEN

TINY_MODEL = {
    "vision_hidden": 32,
    "vision_layers": 2,
    "text_hidden": 64,
    "text_layers": 2,
    "intermediate_size": 128,
}
# Training example kinds, in the order of the "kind" codes; "mcq_position" is an MCQ of type colour_at or shape_at
# (logged apart from the counting MCQs); "position_open" and "mcq_hinted" are the position questions without
# options and with the answer as context (`questions.open_position_question`, `questions.hinted_mcq`).
KINDS = (
    "pope",
    "mcq",
    "caption",
    "attribute",
    "mcq_position",
    "region",
    "region_check",
    "position_open",
    "mcq_hinted",
)
# With --compile, batch widths are rounded up to this multiple so that the compiled LLM sees one or two shapes
# (the recipe's widths are 641-648 tokens) instead of recompiling for each.
PAD_MULTIPLE = 32


@dataclass
class TrainConfig:
    out: str = "testbed-out"
    seed: int = 0  # model init, question sampling; the data seed defaults to it
    data_seed: int | None = None
    train_images: int = 32000
    vision_steps: int = 3000
    steps: int = 12000
    batch_size: int = 64
    vision_lr: float = 1e-3
    position_weight: float = 0.0  # stage 1: weight of the patch row/column loss (0: no position head)
    position_loss: str = "ce"  # "ce": 24-way row and column classes; "mse": the row and column as 2 numbers
    quadrant_weight: float = 0.0  # stage 1: weight of the object patches' quadrant loss (4-way; 0: no head)
    lr: float = 6e-4
    text_layers: int | None = None  # LLM depth (None: MODEL_CONFIG's); the weights must stay <= 25 MB
    text_heads: int | None = None  # LLM attention heads (None: MODEL_CONFIG's); head dim = hidden / heads
    tower_layers: int = 0  # stage 2 also trains the top N vision layers below the features (0: frozen tower)
    tower_lr: float = 1e-4  # their learning rate
    per_example_loss: bool = False  # mean of each example's answer tokens first: a caption weighs one answer
    centre_projector: bool = False  # fold the features' mean and scale into the projector (stage 2 init)
    binding_fraction: float = 0.0  # POPE negatives that need colour bound to shape (`binding_negatives`)
    attribute_fraction: float = 0.0  # yes/no probes about one colour or one shape (`attribute_probe`)
    position_fraction: float | None = None  # MCQs about position (colour_at, shape_at); None: 1 in 2 as types
    region_fraction: float = 0.0  # "What is in the top-left?" -> "red circle" (`region_probe`)
    region_check_fraction: float = 0.0  # "Is there a red object in the top-left?" (`region_check`)
    open_position_fraction: float = 0.0  # position MCQs without options: "...in the top-left?" -> "red"
    hinted_fraction: float = 0.0  # position MCQs whose context gives the answer (`hinted_mcq`)
    text_steps: int = 0  # before stage 2: LLM steps on hinted MCQs of every type, without the image
    init_from: str = ""  # a saved testbed model folder: skip stage 1 and go on training its stage 2
    weight_decay: float = 0.05
    warmup: int = 300
    caption_fraction: float = 0.25
    mcq_fraction: float = 0.4
    system_fraction: float = 0.3
    eval_pope_images: int = 500
    eval_mcq_questions: int = 1000
    eval_blank: int = 600  # questions per task scored again with a blank (grey) image
    eval_batch_size: int = 64
    eval_sample: bool = True  # also score the small fixed sample that the tests re-score on CPU
    workers: int = 8
    time_budget_s: float = 0.0  # > 0: cap the step counts (both stages) to fit, measured after warm-up
    compile: bool = False  # stage 2: the LLM under torch.compile, batches padded to PAD_MULTIPLE
    device: str = "auto"
    log_every: int = 100
    tiny: bool = False  # a much smaller model of the same architecture (tests of the training code)
    smoke: bool = False


SMOKE = dict(
    train_images=48, vision_steps=3, steps=4, batch_size=4, warmup=2, eval_pope_images=2, eval_mcq_questions=4,
    eval_blank=4, eval_batch_size=8, eval_sample=False, workers=0, log_every=1, tiny=True,
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(TrainConfig):
        name = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float}[f.type]
            parser.add_argument(name, type=kind, default=f.default)
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    if cfg.smoke:
        defaults = TrainConfig()
        for key, value in SMOKE.items():
            if getattr(cfg, key) == getattr(defaults, key):
                setattr(cfg, key, value)
    return cfg


def model_overrides(cfg: TrainConfig) -> dict[str, int]:
    """The `MODEL_CONFIG` entries this run changes: the tiny model's, then `--text-layers` / `--text-heads`."""
    out = dict(TINY_MODEL) if cfg.tiny else {}
    if cfg.text_layers is not None:
        out["text_layers"] = cfg.text_layers
    if cfg.text_heads is not None:
        out["text_heads"] = cfg.text_heads
    return out


def model_shape(config: Any) -> dict[str, int]:
    """The `MODEL_CONFIG` entries of a built or loaded model, read from its config."""
    vision, text = config.vision_config, config.text_config
    return {
        "vision_hidden": vision.hidden_size,
        "vision_layers": vision.num_hidden_layers,
        "vision_heads": vision.num_attention_heads,
        "text_hidden": text.hidden_size,
        "text_layers": text.num_hidden_layers,
        "text_heads": text.num_attention_heads,
        "intermediate_size": text.intermediate_size,
    }


# ----------------------------------------------------------------------------------------------- data


@dataclass
class ImagePool:
    pixels: torch.Tensor  # (N, 336, 336, 3) uint8
    patch_labels: torch.Tensor  # (N, 576) int64, class id or BACKGROUND_LABEL
    presence: torch.Tensor  # (N, 64) float, multi-hot classes
    scenes: list[Any]


def _render_training_image(seed: int, index: int) -> tuple[np.ndarray, np.ndarray, Any]:
    scene = sample_scene(scene_rng(seed, STREAM_TRAIN, index))
    pixels, labels = render(scene, with_labels=True)
    return pixels, labels, scene


def build_pool(num_images: int, seed: int, workers: int) -> ImagePool:
    items = map_indices(_render_training_image, seed, num_images, workers)
    presence = torch.zeros(num_images, NUM_CLASSES)
    for i, (_, _, scene) in enumerate(items):
        presence[i, scene.classes] = 1.0
    return ImagePool(
        pixels=torch.from_numpy(np.stack([p for p, _, _ in items])),
        patch_labels=torch.from_numpy(np.stack([lab for _, lab, _ in items])),
        presence=presence,
        scenes=[s for _, _, s in items],
    )


class QuestionBatches(IterableDataset):
    """Endless batches of (image index, input ids, labels); labels mark the answer token and EOS only.

    Sequences are right-padded: with causal attention no real token sees a pad, so no attention mask is needed
    and positions are the same as for a left-padded prompt at generation time.

    With `text_only`, every example is a `hinted_mcq` of any type and the prompt has no image tokens at all
    (`--text-steps`): about 50 tokens instead of 640.
    """

    def __init__(
        self,
        scenes: list[Any],
        processor: Any,
        cfg: TrainConfig,
        image_seq_length: int,
        rank: int = 0,
        text_only: bool = False,
    ):
        self.scenes = scenes
        self.text_only = text_only
        self.rank = rank  # data-parallel rank: every process draws its own questions
        self.processor = processor
        self.cfg = cfg
        self.image_seq_length = image_seq_length
        tok = processor.tokenizer
        self.image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_id, self.eos_id = tok.pad_token_id, tok.eos_token_id

    def prompt_ids(self, text: str, system: str | None) -> list[int]:
        """The processor's ids for the prompt: chat template, then `<image>` expanded to one id per patch (or,
        `text_only`, dropped)."""
        ids = self.processor.tokenizer(ev.chat_prompt(self.processor, text, system))["input_ids"]
        out: list[int] = []
        for i in ids:
            if i != self.image_id:
                out.append(i)
            elif not self.text_only:
                out.extend([i] * self.image_seq_length)
        return out

    def draw_example(self, scene: Any, rng: np.random.Generator) -> TrainingExample:
        cfg = self.cfg
        if self.text_only:
            while (example := hinted_mcq(scene, rng, MCQ_TYPES)) is None:  # counts always exist
                pass
            return example
        return sample_training_example(
            scene,
            rng,
            mcq_fraction=cfg.mcq_fraction,
            caption_fraction=cfg.caption_fraction,
            binding_fraction=cfg.binding_fraction,
            attribute_fraction=cfg.attribute_fraction,
            position_fraction=cfg.position_fraction,
            region_fraction=cfg.region_fraction,
            region_check_fraction=cfg.region_check_fraction,
            open_position_fraction=cfg.open_position_fraction,
            hinted_fraction=cfg.hinted_fraction,
        )

    def make_batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        index = rng.integers(len(self.scenes), size=cfg.batch_size)
        seqs, lengths, kinds = [], [], []
        for i in index:
            ex = self.draw_example(self.scenes[i], rng)
            position_mcq = ex.kind == "mcq" and ex.qtype in POSITION_MCQ_TYPES
            kinds.append(KINDS.index("mcq_position" if position_mcq else ex.kind))
            system = SYSTEM_PROMPT if rng.random() < cfg.system_fraction else None
            prompt = self.prompt_ids(ex.text, system)
            answer = self.processor.tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
            seqs.append(prompt + answer + [self.eos_id])
            lengths.append(len(prompt))
        width = max(len(s) for s in seqs)
        if cfg.compile:
            width = -(-width // PAD_MULTIPLE) * PAD_MULTIPLE
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        for row, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, n : len(seq)] = torch.tensor(seq[n:])
        return {"index": torch.from_numpy(index), "input_ids": input_ids, "labels": labels,
                "kind": torch.tensor(kinds)}  # fmt: skip

    def __iter__(self):
        info = get_worker_info()
        stream = [self.cfg.seed, 99, info.id if info else 0] + ([self.rank] if self.rank else [])
        rng = np.random.default_rng(stream)
        while True:
            yield self.make_batch(rng)


# ---------------------------------------------------------------------------------------------- model


class AuxHeads(nn.Module):
    """Training-only heads on the vision tower: [CLS] -> present classes, patch -> covering class, and
    optionally patch -> its own row and column (keeps absolute position decodable from the features, as it is
    in CLIP; without it the class objectives wash position out by the penultimate layer). The position loss is
    cross-entropy over the 24 rows and the 24 columns, or ("mse") the squared error of the row and column
    scaled to [0, 1]: two linear directions, which cannot take over the features as the unbounded margins of
    the cross-entropy did (88% of the layer -2 variance was position, 3% class, in the run that used it).

    With `quadrant`, every patch covered by an object also predicts its quadrant (4-way cross-entropy). The
    class loss gives object patches large class margins, so that position was 3-6% of their variance and an
    attention head looking for "the shape in the top-left" also took the other objects (a third of its
    weight); a quadrant classifier on the same patches gives them a quadrant direction of the same kind. The
    top-left is where row < 12 AND column < 12, which no linear score of the row and column ranks first."""

    def __init__(
        self, hidden: int, position: bool = False, position_loss: str = "ce", quadrant: bool = False
    ):
        super().__init__()
        self.cls = nn.Linear(hidden, NUM_CLASSES)
        self.patch = nn.Linear(hidden, NUM_CLASSES + 1)
        if position_loss not in ("ce", "mse"):
            raise ValueError(f"position_loss must be 'ce' or 'mse', got {position_loss!r}")
        self.position_loss = position_loss
        width = 2 * GRID if position_loss == "ce" else 2
        self.position = nn.Linear(hidden, width) if position else None
        self.quadrant = nn.Linear(hidden, 4) if quadrant else None
        # each patch's quadrant, kept on the heads' device rather than copied there every step
        self.register_buffer("patch_quadrant", torch.from_numpy(patch_quadrants()), persistent=False)

    def losses(
        self, vision_out: Any, presence: torch.Tensor, patch_labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        cls_logits = self.cls(vision_out.pooler_output).float()
        patch_logits = self.patch(vision_out.hidden_states[-2][:, 1:]).float()
        cls_loss = F.binary_cross_entropy_with_logits(cls_logits, presence)
        patch_loss = F.cross_entropy(patch_logits.flatten(0, 1), patch_labels.flatten())
        with torch.no_grad():
            exact = ((cls_logits > 0) == (presence > 0.5)).all(dim=1).float().mean()
            obj = patch_labels != BACKGROUND_LABEL
            hits = (patch_logits.argmax(-1)[obj] == patch_labels[obj]).float().sum()
            patch_acc = hits / obj.sum().clamp(min=1)
        out = {"cls": cls_loss, "patch": patch_loss, "cls_exact": exact, "patch_acc": patch_acc}
        if self.position is not None:
            features = vision_out.hidden_states[-2][:, 1:]
            cell = torch.arange(GRID * GRID, device=features.device)
            target = torch.stack([cell // GRID, cell % GRID], dim=-1).expand(*features.shape[:2], 2)
            if self.position_loss == "mse":
                pred = self.position(features).float()  # row and column, divided by GRID - 1
                out["position"] = F.mse_loss(pred, target / (GRID - 1))
                with torch.no_grad():
                    out["position_acc"] = ((pred * (GRID - 1) - target).abs() < 0.5).float().mean()
            else:
                logits = self.position(features).float().view(*features.shape[:2], 2, GRID)
                out["position"] = F.cross_entropy(logits.flatten(0, 2), target.flatten())
                with torch.no_grad():
                    out["position_acc"] = (logits.argmax(-1) == target).float().mean()
        if self.quadrant is not None:
            obj = patch_labels != BACKGROUND_LABEL
            logits = self.quadrant(vision_out.hidden_states[-2][:, 1:][obj]).float()
            gold = self.patch_quadrant.expand_as(obj)[obj]
            out["quadrant"] = F.cross_entropy(logits, gold)
            with torch.no_grad():
                out["quadrant_acc"] = (logits.argmax(-1) == gold).float().mean()
        return out


class PixelNormaliser:
    """uint8 HWC images -> the CLIP processor's normalised CHW floats (identical to `processor(images=...)`)."""

    def __init__(self, processor: Any, device: torch.device):
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, device=device).view(1, 3, 1, 1)
        self.scale = float(ip.rescale_factor)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float() * self.scale
        return (x - self.mean) / self.std


def answer_loss(
    model: Any,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    per_example: bool = False,
):
    """LLaVA's forward written out (`features`: vision layer -2 without CLS -> projector -> image-token slots),
    with logits only where a label is: cross-entropy on the answer + EOS, and whether each row's first answer
    token is right. The loss is the mean over all answer tokens of the batch (LLaVA's), or with `per_example`
    the mean over rows of each row's mean, so that a one-word answer weighs as much as a whole caption. With
    `features` None the prompts have no image tokens (`--text-steps`)."""
    inner = model.model
    embeds = model.get_input_embeddings()(input_ids)
    if features is not None:
        image_features = inner.multi_modal_projector(features)
        slots = (input_ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, image_features.to(embeds.dtype))
    hidden = inner.language_model(inputs_embeds=embeds).last_hidden_state
    targets = labels[:, 1:]
    where = targets != -100
    logits = model.lm_head(hidden[:, :-1][where]).float()
    gold = targets[where]
    if per_example:
        row = torch.arange(len(where), device=where.device)[:, None].expand_as(where)[where]
        weight = 1.0 / (where.sum(1).float() * len(where))  # every row has an answer token and EOS
        loss = (F.cross_entropy(logits, gold, reduction="none") * weight[row]).sum()
    else:
        loss = F.cross_entropy(logits, gold)
    with torch.no_grad():
        first = torch.zeros_like(where)
        first[torch.arange(len(where)), where.float().argmax(1)] = True  # the answer token of each row
        correct = (logits.argmax(-1) == gold)[first[where]].float()
    return loss, correct


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class StepBudget:
    """Caps a stage's step count to a time budget, measured after warm-up (logged; pass --steps to reproduce)."""

    def __init__(self, planned: int, budget_s: float, device: torch.device, ctx: DistContext | None = None):
        self.total, self.budget_s, self.device = planned, budget_s, device
        self.ctx = ctx or DistContext()  # every process must run the same number of steps: rank 0's count
        self.t0: float | None = None

    def update(self, step: int) -> int:
        if self.budget_s <= 0:
            return self.total
        if step == 10:
            _sync(self.device)
            self.t0 = time.time()
        elif step == 40 and self.t0 is not None:
            _sync(self.device)
            per_step = (time.time() - self.t0) / 30
            fit = self.ctx.broadcast(int(self.budget_s / per_step))
            _log(
                self.ctx, f"  {per_step * 1000:.1f} ms/step; {self.total} steps planned, {fit} fit the budget"
            )
            self.total = max(41, min(self.total, fit))
        return self.total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _log(ctx: DistContext, line: str) -> None:
    if ctx.is_main:
        print(line, flush=True)


class VisionObjective(nn.Module):
    """Stage 1 as one module (the vision tower and the training heads), so that DDP can wrap it."""

    def __init__(self, model: Any, heads: AuxHeads):
        super().__init__()
        self.tower, self.heads = model.model.vision_tower, heads

    def forward(self, pixels, presence, patch_labels) -> dict[str, torch.Tensor]:
        return self.heads.losses(self.tower(pixels, output_hidden_states=True), presence, patch_labels)


class AnswerObjective(nn.Module):
    """Stage 2 as one module (the trained tower layers, projector and LLM), so that DDP can wrap it. The rest of
    the vision tower is frozen here: DDP reduces gradients in buckets, and a bucket holding a trainable
    parameter that gets no gradient would never be averaged."""

    def __init__(self, model: Any, tower_layers: nn.ModuleList, per_example: bool):
        super().__init__()
        self.model, self.tower_layers, self.per_example = model, tower_layers, per_example
        model.model.vision_tower.requires_grad_(False)
        tower_layers.requires_grad_(True)

    def forward(self, features, input_ids, labels) -> tuple[torch.Tensor, torch.Tensor]:
        if features is not None and len(self.tower_layers):
            features = run_tower_layers(self.tower_layers, features)
        return answer_loss(self.model, features, input_ids, labels, self.per_example)


def data_parallel(
    module: nn.Module, ctx: DistContext, device: torch.device, find_unused_parameters: bool = False
) -> nn.Module:
    """`module` wrapped in DistributedDataParallel under a multi-process launch, else as it is."""
    if ctx.world <= 1:
        return module
    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def replicas_identical(model: Any, ctx: DistContext) -> bool:
    """True when every process ends with bit-identical weights (DDP keeps the replicas in step)."""
    if ctx.world <= 1:
        return True
    import torch.distributed as dist

    mine = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    first = mine.clone()
    dist.broadcast(first, src=0)
    same = torch.tensor([float(torch.equal(mine, first))], device=mine.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


# ------------------------------------------------------------------------------------------- training


def train_vision(
    model, heads, pool, normalise, cfg, device, autocast, budget_s: float, ctx: DistContext | None = None
) -> dict[str, Any]:
    ctx = ctx or DistContext()
    objective = data_parallel(VisionObjective(model, heads), ctx, device)
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay, **_fused(device))
    gen = torch.Generator().manual_seed(cfg.seed + 1 + 1000 * ctx.rank)
    budget = StepBudget(cfg.vision_steps, budget_s, device, ctx)
    step, t0, log = 0, time.time(), {}
    while step < budget.total:
        for group in opt.param_groups:
            group["lr"] = cfg.vision_lr * lr_factor(step, budget.total, cfg.warmup)
        index = torch.randint(len(pool.scenes), (cfg.batch_size,), generator=gen)
        index = index.to(pool.pixels.device)
        pixels = normalise(pool.pixels[index].to(device, non_blocking=True))
        with autocast():
            out = objective(pixels, pool.presence[index].to(device), pool.patch_labels[index].to(device))
        loss = out["cls"] + out["patch"] + cfg.position_weight * out.get("position", 0.0)
        loss = loss + cfg.quadrant_weight * out.get("quadrant", 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        budget.update(step)
        if step % cfg.log_every == 0 or step == budget.total:
            log = {k: round(float(v.detach()), 4) for k, v in out.items()}
            _log(ctx, f"vision {step}/{budget.total} {log} {time.time() - t0:.0f}s")
    return {"steps": step, "seconds": round(time.time() - t0, 1), **log}


def tower_top_layers(model: Any, count: int) -> tuple[int, nn.ModuleList]:
    """The `count` vision layers just below LLaVA's features (layer -2), and the index of their input in the
    tower's `hidden_states`: stage 2 caches that input and trains these layers."""
    layers = model.model.vision_tower.encoder.layers
    top = len(layers) + 1 + model.config.vision_feature_layer  # hidden_states index of the features
    if not 0 <= count <= top:
        raise ValueError(f"tower_layers must be in [0, {top}], got {count}")
    return top - count, layers[top - count : top]


def run_tower_layers(layers: nn.ModuleList, hidden: torch.Tensor) -> torch.Tensor:
    """Cached hidden states ([CLS] + patches) through `layers` -> the LLaVA features (patches only)."""
    for layer in layers:
        out = layer(hidden, None)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden[:, 1:]


@torch.no_grad()
def precompute_features(
    model, pool, normalise, device, autocast, batch_size: int = 128, tower_layers: int = 0
) -> torch.Tensor:
    """Penultimate-layer patch features of every pool image (what LLaVA feeds the projector), bf16 on GPU; with
    `tower_layers`, the input of the top layers that stage 2 trains instead ([CLS] included)."""
    tower = model.model.vision_tower.eval()
    index, _ = tower_top_layers(model, tower_layers)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, first = len(pool.scenes), 0 if tower_layers else 1
    out = torch.empty(n, model.config.image_seq_length + 1 - first, model.config.vision_config.hidden_size,
                      dtype=dtype, device=device)  # fmt: skip
    for start in range(0, n, batch_size):
        pixels = normalise(pool.pixels[start : start + batch_size].to(device))
        with autocast():
            hidden = tower(pixels, output_hidden_states=True).hidden_states[index]
            out[start : start + batch_size] = hidden[:, first:]
    return out


@torch.no_grad()
def centre_projector(
    model: Any, features: torch.Tensor, tower_layers: int, rows: int = 256
) -> dict[str, float]:
    """Data-dependent initialisation of the projector: fold the features' mean and overall scale into its first
    linear layer, so that it sees centred features of unit RMS. Layer -2 features share one dominant direction
    (mean pairwise cosine about 0.8), so a freshly initialised projector gives image tokens that, after the
    LLM's RMSNorm, differ little by content. The architecture is unchanged: only the initial values move."""
    _, layers = tower_top_layers(model, tower_layers)
    index = torch.linspace(0, len(features) - 1, min(rows, len(features))).long().to(features.device)
    sample = features[index].float()
    x = (run_tower_layers(layers, sample) if tower_layers else sample).flatten(0, 1)
    mean = x.mean(0)
    scale = (x - mean).pow(2).mean().sqrt()
    linear = model.model.multi_modal_projector.linear_1
    linear.weight.div_(scale)
    linear.bias.sub_(linear.weight @ mean)
    return {"feature_rms": round(float(x.pow(2).mean().sqrt()), 4), "centred_rms": round(float(scale), 4)}


def train_llm(
    model,
    features,
    batches,
    cfg,
    device,
    autocast,
    budget_s: float,
    ctx: DistContext | None = None,
    steps: int | None = None,
    stage: str = "llm",
) -> dict[str, Any]:
    """Stage 2: projector + LLM on captions, MCQ and POPE; the vision tower stays frozen (as in LLaVA-1.5), or
    its top `cfg.tower_layers` layers below the features train too, at `cfg.tower_lr` (`features` then holds
    their cached input). With `features` None, the text-only steps before it (`--text-steps`): `steps` of
    image-free `batches`, logged as `stage`."""
    ctx = ctx or DistContext()
    text_only = features is None
    _, tower_layers = tower_top_layers(model, cfg.tower_layers)
    llm = model.model.language_model
    if cfg.compile and llm._compiled_call_impl is None:  # in place: parameter names (the checkpoint) stay
        llm.compile(dynamic=False)
    objective = AnswerObjective(model, tower_layers, cfg.per_example_loss)
    # without the image, the projector and the tower layers get no gradient
    objective = data_parallel(objective, ctx, device, find_unused_parameters=text_only)
    tower_params = list(tower_layers.parameters())
    tower_ids = {id(p) for p in tower_params}
    llm_params = [p for p in model.parameters() if p.requires_grad and id(p) not in tower_ids]
    groups = [{"params": llm_params, "lr": cfg.lr, "base_lr": cfg.lr}]
    if tower_params:
        groups.append({"params": tower_params, "lr": cfg.tower_lr, "base_lr": cfg.tower_lr})
    params = llm_params + tower_params
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, **_fused(device))
    budget = StepBudget(cfg.steps if steps is None else steps, budget_s, device, ctx)
    loader = DataLoader(batches, batch_size=None, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if cfg.workers else None, persistent_workers=cfg.workers > 0)  # fmt: skip
    step, t0, log, running = 0, time.time(), {}, []
    for batch in loader:
        if step >= budget.total:
            break
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, budget.total, cfg.warmup)
        feats = None if text_only else features[batch["index"].to(features.device)]
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        with autocast():
            loss, correct = objective(feats, input_ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        budget.update(step)
        onehot = F.one_hot(batch["kind"].to(device), len(KINDS)).float()
        running.append(torch.cat([loss.detach()[None], correct @ onehot, onehot.sum(0)]))
        if step % cfg.log_every == 0 or step == budget.total:
            total = torch.stack(running).sum(0).tolist()
            k = len(KINDS)
            log = {"loss": round(total[0] / len(running), 4)}
            log |= {  # kinds this run draws only (a kind with no example in the window would read 0.0)
                f"{name}_acc": round(total[1 + i] / total[1 + k + i], 4)
                for i, name in enumerate(KINDS)
                if total[1 + k + i] > 0
            }
            running = []
            _log(ctx, f"{stage} {step}/{budget.total} {log} {time.time() - t0:.0f}s")
    return {"steps": step, "seconds": round(time.time() - t0, 1), **log}


def _fused(device: torch.device) -> dict[str, bool]:
    return {"fused": True} if device.type == "cuda" else {}


# ----------------------------------------------------------------------------------------- save, eval


def save_model(model: Any, processor: Any, directory: Path) -> Path:
    """`save_pretrained` with fp16 weights; config dtype float32 so `from_pretrained` loads fp32 by default."""
    directory.mkdir(parents=True, exist_ok=True)
    half = model.to(torch.float16)
    half.save_pretrained(directory)
    model.to(torch.float32)
    processor.save_pretrained(directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    for part in (config, config.get("text_config", {}), config.get("vision_config", {})):
        if "dtype" in part:
            part["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def run_evaluation(directory: Path, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Reload the saved model exactly as users do, then score held-out data, a blank image and the small sample."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(directory).to(device).eval()
    processor = AutoProcessor.from_pretrained(directory)
    workers = max(1, cfg.workers)
    pope = pope_records(cfg.eval_pope_images, ev.EVAL_SEED, workers)
    mcq = mcq_records(cfg.eval_mcq_questions, ev.EVAL_SEED, workers)
    rng = np.random.default_rng(0)
    pope_sub = [pope[i] for i in sorted(rng.choice(len(pope), min(cfg.eval_blank, len(pope)), replace=False))]
    mcq_sub = mcq[: cfg.eval_blank]
    bs = cfg.eval_batch_size
    t0 = time.time()
    result = {
        "heldout": ev.evaluate(model, processor, pope, mcq, bs),
        "blank_image": ev.evaluate(model, processor, pope_sub, mcq_sub, bs, blank=True),
        "vicuna_system_prompt": ev.evaluate(model, processor, pope_sub, mcq_sub, bs, system=SYSTEM_PROMPT),
    }
    if cfg.eval_sample:
        result["sample"] = ev.evaluate(model, processor, *ev.sample_rows(), batch_size=8)
    result["eval_seconds"] = round(time.time() - t0, 1)
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for name in ("heldout", "blank_image", "vicuna_system_prompt", "sample"):
        if name not in result:  # the sample with --no-eval-sample
            continue
        part = result[name]
        pope = " ".join(f"{k}={v['accuracy']:.4f}" for k, v in part.get("pope", {}).items())
        mcq = " ".join(f"{k}={v['accuracy']:.4f}" for k, v in part.get("mcq", {}).items())
        lines.append(f"{name}: POPE {pope} | MCQ {mcq}")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    ctx = DistContext.from_env()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    if device.type == "cuda" and ctx.world > 1:
        device = torch.device("cuda", ctx.local_rank)
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    t_start = time.time()
    if cfg.init_from:  # a trained model goes on training: its own processor and shape, no new stage 1
        if cfg.text_layers is not None or cfg.text_heads is not None:
            raise ValueError("--init-from keeps the saved model's shape: drop --text-layers and --text-heads")
        if not (Path(cfg.init_from) / "config.json").is_file():
            raise FileNotFoundError(f"--init-from {cfg.init_from}: no saved model there (no config.json)")
        model, processor = load_testbed(str(device), path=cfg.init_from)
        model.train()
    else:
        processor = build_processor()
        model = build_model(processor, seed=cfg.seed, **model_overrides(cfg)).to(device).train()
    size = sum(p.numel() for p in model.parameters()) / 1e6
    _log(
        ctx,
        f"model: {size:.2f}M parameters on {device}" + (f", {ctx.world} processes" if ctx.world > 1 else ""),
    )

    t0 = time.time()
    pool = build_pool(cfg.train_images, data_seed, max(1, cfg.workers))
    if device.type == "cuda":  # stage 1 then draws its batches on the GPU, with no copy a step
        pool.pixels, pool.presence = pool.pixels.to(device), pool.presence.to(device)
        pool.patch_labels = pool.patch_labels.to(device)
    _log(ctx, f"rendered {cfg.train_images} training images in {time.time() - t0:.0f}s")
    batches = QuestionBatches(pool.scenes, processor, cfg, model.config.image_seq_length, ctx.rank)
    _check_prompt_ids(batches, processor)
    normalise = PixelNormaliser(processor, device)

    # With a time budget, stage 1 may take at most a quarter of it and stage 2 gets whatever is left.
    vision_budget = 0.25 * cfg.time_budget_s
    if cfg.init_from:
        vision_log = {"steps": 0, "init_from": cfg.init_from}
    else:
        heads = AuxHeads(
            model.config.vision_config.hidden_size,
            position=cfg.position_weight > 0,
            position_loss=cfg.position_loss,
            quadrant=cfg.quadrant_weight > 0,
        ).to(device)
        vision_log = train_vision(model, heads, pool, normalise, cfg, device, autocast, vision_budget, ctx)
    features = precompute_features(model, pool, normalise, device, autocast, tower_layers=cfg.tower_layers)
    del pool.pixels  # the frozen part of the tower is done: stage 2 needs its output only
    if cfg.centre_projector and not cfg.init_from:  # an initialisation: a loaded projector is trained already
        _log(ctx, f"  centred the projector: {centre_projector(model, features, cfg.tower_layers)}")
    text_log = {}
    if cfg.text_steps:  # a fixed number of short steps, before the budget of stage 2 is measured
        text = QuestionBatches(
            pool.scenes, processor, cfg, model.config.image_seq_length, ctx.rank, text_only=True
        )
        text_log = train_llm(model, None, text, cfg, device, autocast, 0.0, ctx, cfg.text_steps, "text")
    llm_budget = max(0.0, cfg.time_budget_s - (time.time() - t_start)) if cfg.time_budget_s else 0.0
    llm_log = train_llm(model, features, batches, cfg, device, autocast, llm_budget, ctx)
    del features
    identical = replicas_identical(model, ctx)
    if not ctx.is_main:  # process 0 saves and evaluates; the others wait for it so that all leave together
        _leave(ctx)
        return {}
    if not identical:
        raise RuntimeError("the data-parallel replicas ended with different weights")

    model.eval()
    directory = save_model(model, processor, out / "model")
    with tarfile.open(out / "model.tar", "w") as tar:  # one file to copy back instead of a folder
        tar.add(directory, arcname="model")
    result = run_evaluation(directory, cfg, device)
    for line in summary_lines(result):
        print(line, flush=True)
    report = {
        "config": asdict(cfg) | {"data_seed": data_seed, "processes": ctx.world},
        "model_config": model_shape(model.config),
        "command": (f"torchrun --nproc-per-node {ctx.world} -m" if ctx.world > 1 else "python -m")
        + " vtprune.testbed.train "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "train": {"vision": vision_log, "llm": llm_log} | ({"text": text_log} if text_log else {}),
        "eval_seed": ev.EVAL_SEED,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": round(time.time() - t_start, 1),
        **result,
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    _leave(ctx)
    return report


def _leave(ctx: DistContext) -> None:
    """Leave the process group together: a process destroying it while another still works hung gloo at exit
    in about one launch in three (tests/ddp_answer_gradient.py)."""
    ctx.barrier()
    shutdown()


def _check_prompt_ids(batches: QuestionBatches, processor: Any) -> None:
    """Training ids must be exactly what the processor produces for the same prompt at evaluation time."""
    from PIL import Image

    from vtprune.testbed.render import blank_image

    text = "Is there a red circle in the image?"
    for system in (None, SYSTEM_PROMPT):
        expected = processor(images=Image.fromarray(blank_image()), text=ev.chat_prompt(processor, text, system),
                             return_tensors="pt")["input_ids"][0].tolist()  # fmt: skip
        if batches.prompt_ids(text, system) != expected:
            raise RuntimeError("training prompt ids differ from the processor's")


if __name__ == "__main__":
    main()
    end_launched_process()
