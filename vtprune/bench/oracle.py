"""The ORACLE of `vtprune bench`: the model fed only the kept tokens, with no scoring.

`FixedSelection` is a pruning method that replays what a `PruneRecord` says was kept, at the same stages
(vision stage before the LLM; LLM stages at the same prune layers with the same position handling), but
computes no score: it asks for no attention rows, no [CLS] attention and no features. Run through the same
engine on the same inputs, it gives the time of "the same model on the same reduced sequence", so that

    overhead = method time − oracle time

is exactly what scoring and selecting cost. The vision tower runs in both (the engine always encodes the
images), so it is included on both sides of the difference.

It is deliberately NOT registered: it only makes sense for the inputs its record came from. Pass the object
to `vtprune.prune(model, FixedSelection.from_record(record))`.

Replay: the index tensors are built on the first call of each stage (from the current visual tokens'
original numbering, with Python lists) and cached on the device, so the timed repeats that follow a warm-up
pay one dictionary lookup per stage. Tokens a method created (merged clusters, contextual tokens: `-1` in the
record) cannot be recomputed without the method; they are replayed as zero vectors, so token counts (and
therefore costs) match, while values do not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vtprune.methods.base import Method, ModelInfo, PruneConfigError, Selection, Stage
from vtprune.record import PruneRecord

__all__ = ["FixedSelection"]


@dataclass
class FixedSelection(Method):
    """Keeps exactly the tokens of a recorded prefill, at the recorded stages, without scoring."""

    plan: tuple[Stage, ...] = ()
    kept: tuple[
        tuple[tuple[int, ...], ...], ...
    ] = ()  # per stage, per sample: original indices (-1 = created)
    replays: str = ""
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    name: ClassVar[str] = "oracle"
    stage_kind: ClassVar[str] = "-"
    paper: ClassVar[str] = "-"

    @classmethod
    def from_record(cls, record: PruneRecord) -> FixedSelection:
        """The oracle of the prefill `record` describes (an unpruned record gives an oracle with no stage)."""
        plan: list[Stage] = []
        kept: list[tuple[tuple[int, ...], ...]] = []
        for stage in record.stages:
            if (
                stage.name == "none"
                and stage.kind == "vision"
                and all(c == record.visual_tokens for c in stage.counts)
            ):
                continue  # the engine's stand-in stage of an unpruned prefill: nothing was dropped
            if stage.kind in ("vision", "vit"):
                # A ViT-merging stage is replayed as "the LLM gets the surviving patches" (unmerged features,
                # full vision tower): the token counts the LLM sees are the method's, with no scoring.
                planned = Stage(kind="vision", keep=max(stage.counts), name=stage.name)
            else:
                planned = Stage(
                    kind="llm",
                    keep=max(stage.counts),
                    # score layer == prune layer and no query rows: the engine captures nothing for this stage
                    score_layer=stage.prune_layer,
                    prune_layer=stage.prune_layer,
                    positions=stage.positions,
                    queries=None,
                    name=stage.name,
                )
            plan.append(planned)
            kept.append(tuple(tuple(int(i) for i in row) for row in stage.kept))
        return cls(plan=tuple(plan), kept=tuple(kept), replays=record.method)

    def params(self) -> dict:
        return {"replays": self.replays}

    def stages(self, info: ModelInfo) -> list[Stage]:
        return list(self.plan)

    # --- replay ---------------------------------------------------------------------------------------
    def select(self, stage_index: int, stage: Stage, signals) -> Selection:
        if stage.kind == "vision":
            shape = (signals.projected.shape[0], signals.projected.shape[1])
        else:
            shape = tuple(signals.original_index.shape)
        cached = self._cache.get(stage_index)
        if cached is None or cached[0] != shape:
            build = self._vision_replay if stage.kind == "vision" else self._llm_replay
            cached = (shape, build(stage_index, signals))
            self._cache[stage_index] = cached
        return Selection(**cached[1], info={"replays": self.replays})

    def _rows(self, stage_index: int, rows: int) -> tuple[tuple[int, ...], ...]:
        recorded = self.kept[stage_index]
        if len(recorded) != rows:
            raise PruneConfigError(
                f"oracle: the record holds {len(recorded)} sample(s) but the batch has {rows}; "
                "replay a record on the inputs it came from"
            )
        return recorded

    def _vision_replay(self, stage_index: int, signals) -> dict:
        """Rows are images: split each sample's recorded list per image (created tokens follow their image)."""
        n_images, per_image, width = signals.projected.shape
        device = signals.projected.device
        samples = int(signals.image_sample.max()) + 1
        images_per_sample = n_images // samples
        per_image_kept: list[list[int]] = [[] for _ in range(n_images)]
        per_image_extra = [0] * n_images
        for b, row in enumerate(self._rows(stage_index, samples)):
            current = 0
            for index in row:
                if index >= 0:
                    current = index // per_image
                    if current >= images_per_sample:
                        raise PruneConfigError(
                            f"oracle: index {index} names an image the sample does not have"
                        )
                    per_image_kept[b * images_per_sample + current].append(index % per_image)
                else:
                    per_image_extra[b * images_per_sample + current] += 1
        if any(per_image_extra):
            return self._vision_replay_as_created(stage_index, signals, samples, images_per_sample)
        indices, valid = _pad(per_image_kept, device)
        return {"indices": indices, "valid": None if bool(valid.all()) else valid}

    def _vision_replay_as_created(
        self, stage_index: int, signals, samples: int, images_per_sample: int
    ) -> dict:
        """A row holding created tokens (VisionZip's [CLS] and contextual tokens) is replayed whole as
        `extra` tokens, in the recorded order: kept patches with their projected features and `extra_index`
        = their index, created tokens as zero vectors with index -1 (VisionZip hands the engine the same)."""
        n_images, per_image, width = signals.projected.shape
        device = signals.projected.device
        rows: list[list[int]] = [[] for _ in range(n_images)]
        for b, row in enumerate(self._rows(stage_index, samples)):
            if len(row) % images_per_sample == 0:  # the engine concatenates equal-width image rows
                chunk = len(row) // images_per_sample
                for k in range(images_per_sample):
                    part = row[k * chunk : (k + 1) * chunk]
                    rows[b * images_per_sample + k] = [i % per_image if i >= 0 else -1 for i in part]
                continue
            current = 0  # unequal widths (slots dropped as invalid): a created token follows its image
            for index in row:
                if index >= 0:
                    current = index // per_image
                rows[b * images_per_sample + current].append(index % per_image if index >= 0 else -1)
        width_c = max(len(r) for r in rows)
        extra_index = torch.full((n_images, width_c), -1, dtype=torch.long)
        extra_valid = torch.zeros(n_images, width_c, dtype=torch.bool)
        for i, row in enumerate(rows):
            extra_index[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            extra_valid[i, : len(row)] = True
        extra_index, extra_valid = extra_index.to(device), extra_valid.to(device)
        gathered = torch.gather(
            signals.projected, 1, extra_index.clamp(min=0)[:, :, None].expand(-1, -1, width)
        )
        extra = gathered * (extra_index >= 0)[:, :, None].to(gathered.dtype)
        return {
            "indices": torch.zeros(n_images, 0, dtype=torch.long, device=device),
            "extra": extra,
            "extra_valid": None if bool(extra_valid.all()) else extra_valid,
            "extra_index": extra_index,
        }

    def _llm_replay(self, stage_index: int, signals) -> dict:
        """Rows are samples: find each recorded original index among the current visual tokens."""
        original = signals.original_index.tolist()
        valid_now = signals.visual_valid.tolist()
        device = signals.original_index.device
        indices: list[list[int]] = []
        extras: list[int] = []
        for b, row in enumerate(self._rows(stage_index, len(original))):
            where: dict[int, int] = {}
            created: list[int] = []
            for pos, (orig, ok) in enumerate(zip(original[b], valid_now[b], strict=True)):
                if not ok:
                    continue
                if orig >= 0:
                    where.setdefault(orig, pos)
                else:
                    created.append(pos)
            picked, new = [], 0
            for index in row:
                if index >= 0:
                    if index not in where:
                        raise PruneConfigError(
                            f"oracle: visual token {index} is not among sample {b}'s tokens at stage {stage_index}"
                        )
                    picked.append(where[index])
                elif created:
                    picked.append(created.pop(0))
                else:
                    new += 1  # a token the method created at this stage
            indices.append(picked)
            extras.append(new)
        index_t, valid = _pad(indices, device)
        out: dict = {"indices": index_t, "valid": None if bool(valid.all()) else valid}
        if any(extras):
            c = max(extras)
            width = signals.hidden.shape[-1]
            out["extra"] = torch.zeros(len(indices), c, width, dtype=signals.hidden.dtype, device=device)
            out["extra_valid"] = (
                torch.arange(c, device=device)[None] < torch.tensor(extras, device=device)[:, None]
            )
            out["extra_index"] = torch.full((len(indices), c), -1, dtype=torch.long, device=device)
        return out


def _pad(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, T) long indices padded with 0 and the (R, T) mask of real entries."""
    width = max((len(r) for r in rows), default=0)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        index[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        valid[i, : len(row)] = True
    return index.to(device), valid.to(device)
