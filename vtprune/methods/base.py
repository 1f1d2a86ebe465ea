"""Method, Stage, Selection, the scoring base class and the method registry.

A method is a small dataclass with typed, validated fields (`vtprune/methods/fields.py`). It declares where
it acts (`stages()`) and, for each stage, turns signals into a `Selection` (`select()`); a method that only
scores tokens subclasses `ScorerMethod` and writes `score()`. It never touches the model: the engine
(`vtprune/engine/`) is the only code that changes sequence length. `ModelInfo` (what a method may know
of the model, from its adapter), `bounded` and `PruneConfigError` are re-exported here for the method files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, NamedTuple

import torch

from vtprune.errors import PruneConfigError
from vtprune.methods.fields import bounded, check_fields  # noqa: F401  (re-exported for the method files)
from vtprune.models.base import ModelInfo
from vtprune.selection import topk_indices

if TYPE_CHECKING:
    from vtprune.signals.context import LLMSignals, VisionSignals


@dataclass(frozen=True)
class Stage:
    """One place where visual tokens are dropped.

    kind="vision": before the LLM; the LLM sees only the kept tokens with contiguous positions.
    kind="llm": `score_layer` is the decoder layer whose own q/k give the attention rows the method scores
    with (captured while that layer runs on the unpruned sequence); `prune_layer` is the first decoder layer
    that sees the pruned sequence. They differ between papers: FastV scores layer K-1
    and prunes before K; SparseVLM scores layer l and prunes before l+1; PyramidDrop scores with layer k's
    projections of layer k's input and prunes before k (score_layer == prune_layer: the engine then computes
    the rows from the incoming hidden states with that layer's norm, q/k projections and RoPE).
    `keep` is the number of visual tokens per image after this stage (multiplied by the number of images
    of a sample for LLM stages). `queries` names the attention rows the stage needs: "last" (the last
    prompt token), "text" (every token after the last visual token), "all", "image" or None.
    kind="vit": inside the vision encoder (iLLaVA, FlowCut): after the attention sub-block of each CLIP layer
    in `vit_layers` the method's `merge_vit(stage, layer, hidden, signals)` (signals: `ViTLayerSignals`)
    removes `vit_remove` patches (0: as many as the method decides at each layer, per image; it returns None
    where it removes nothing, and that layer runs untouched); the LLM sees only the survivors (`keep` =
    patches per image left). At most one, before any vision/llm stage.
    """

    kind: Literal["vit", "vision", "llm"]
    keep: int
    score_layer: int | None = None
    prune_layer: int | None = None
    positions: Literal["original", "reindex"] = "original"
    queries: Literal["last", "text", "all", "image"] | None = None
    name: str = ""
    vit_layers: tuple[int, ...] = ()  # kind="vit": CLIP encoder layers that merge (ascending)
    vit_remove: int = 0  # kind="vit": patches removed at each of them (0: adaptive, decided by the method)

    @classmethod
    def before_layer(
        cls,
        layer: int,
        keep: int,
        queries: Literal["last", "text", "all", "image"] | None,
        name: str,
        positions: Literal["original", "reindex"] = "original",
    ) -> Stage:
        """An LLM stage cut before decoder layer `layer`, scored with the attention of layer `layer` − 1 while
        it runs (FastV's K; SparseVLM's l is `before_layer(l + 1, ...)`)."""
        return cls(
            kind="llm",
            keep=keep,
            score_layer=layer - 1,
            prune_layer=layer,
            positions=positions,
            queries=queries,
            name=name,
        )


@dataclass
class Selection:
    """The output of a method for one stage.

    Rows are images for a vision stage and samples for an LLM stage. `indices` index the CURRENT visual
    tokens of the row (0..V-1), in the order the tokens will appear (raster order for almost every method).
    `valid` marks real slots when rows keep different counts (adaptive methods); invalid slots are masked out.
    `values` replaces the kept tokens' vectors (merging); for a vision stage they live in the LLM embedding
    space (projected). `extra` are new tokens (merged clusters, contextual tokens) placed right after the kept
    visual tokens; `extra_index` says which original token each represents (-1: none).
    """

    indices: torch.Tensor  # (R, T) long
    valid: torch.Tensor | None = None  # (R, T) bool
    values: torch.Tensor | None = None  # (R, T, D)
    extra: torch.Tensor | None = None  # (R, C, D)
    extra_valid: torch.Tensor | None = None  # (R, C) bool
    extra_index: torch.Tensor | None = None  # (R, C) long, index into current visual tokens or -1
    scores: torch.Tensor | None = None  # (R, V) the scores used, kept for analysis
    # JSON-friendly facts recorded with the stage; an integer or bool tensor is read to a list with the
    # stage's record (one transfer for the whole record, so the method needs no host sync of its own for it)
    info: dict = field(default_factory=dict)
    # True / False when the method knows on the host whether every slot (of `indices` and `extra`) holds a
    # real token of its row; the engine then learns without a host sync whether the new sequence has holes
    all_valid: bool | None = None


# `crop_budget` of a vision method on models whose images are several tower inputs (LLaVA-NeXT): "crop" gives
# every input an equal share of the image's budget and selects inside each with its own [CLS] (the official
# LLaVA-NeXT rule of VisPruner, VisionZip and CDPruner); "image" selects over all the image's tokens at once
# (DivPrune's rule). No effect on LLaVA-1.5. A method declares `crop_budget: CropBudget = "crop"`.
CropBudget = Literal["crop", "image"]


def resolve_keep(keep: int | float, total: int, what: str = "keep") -> int:
    """A count of visual tokens, or a fraction in (0, 1] of `total`, as a count in [1, total]."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise PruneConfigError(f"{what} must be an int count or a float fraction in (0, 1], got {keep!r}")
    if isinstance(keep, float):
        if 0.0 < keep <= 1.0:
            return max(1, round(keep * total))
        if not keep.is_integer():
            raise PruneConfigError(f"{what}={keep}: a fraction must be in (0, 1]")
    keep = int(keep)
    if keep <= 0:
        raise PruneConfigError(f"{what}={keep}: must be >= 1 (a count) or a fraction in (0, 1]")
    if keep > total:
        raise PruneConfigError(f"{what}={keep} is larger than the {total} visual tokens of an image")
    return keep


@dataclass
class Method:
    """Base class. Subclasses are dataclasses whose fields are the method's hyper-parameters.

    `keep`: visual tokens per image to keep (count or fraction in (0, 1]); None = the paper's default.
    """

    keep: int | float | None = None

    name: ClassVar[str] = ""
    stage_kind: ClassVar[str] = ""  # "vision" | "llm" | "vision+llm" | "-"
    paper: ClassVar[str] = ""
    attention_based: ClassVar[bool] = False  # scores with LLM text->image attention (debias/heads apply)
    # model families (ModelInfo.family) the method cannot run on, with the reason given to the user
    unsupported_families: ClassVar[dict[str, str]] = {}
    default_keep: ClassVar[int | float] = 64  # visual tokens per image when keep is None (the paper's budget)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.keep is not None:
            resolve_keep(self.keep, 10**9)  # type and range; the upper bound is checked in validate_for

    # --- planning -------------------------------------------------------------------------------------
    def validate_for(self, info: ModelInfo) -> None:
        """Check the configuration against the model (layers, token count); raise PruneConfigError."""
        if info.family in self.unsupported_families:
            raise PruneConfigError(
                f"{self.name} does not run on {info.family}: {self.unsupported_families[info.family]}"
            )
        if self.keep is not None:
            resolve_keep(self.keep, info.visual_tokens)
        for stage in self.stages(info):
            if stage.kind != "llm":
                continue
            last = info.num_layers - 1
            if stage.prune_layer is None or not 1 <= stage.prune_layer <= last:
                raise PruneConfigError(
                    f"{self.name}: prune layer {stage.prune_layer} is outside the LLM's layers (valid: 1..{last})"
                )
            if stage.score_layer is None or not 0 <= stage.score_layer <= stage.prune_layer:
                raise PruneConfigError(
                    f"{self.name}: score layer {stage.score_layer} must be in 0..{stage.prune_layer} "
                    f"(at or before the prune layer {stage.prune_layer})"
                )

    def keep_count(self, info: ModelInfo, default: int | float) -> int:
        return resolve_keep(self.keep if self.keep is not None else default, info.visual_tokens)

    def stages(self, info: ModelInfo) -> list[Stage]:
        """Where the method acts. The default, for a vision method: one vision stage keeping `keep` (or
        `default_keep`) tokens per image. Methods that act elsewhere or plan their own counts override it."""
        if self.stage_kind != "vision":
            raise NotImplementedError(f"{type(self).__name__} must define stages()")
        return [Stage(kind="vision", keep=self.keep_count(info, self.default_keep), name=self.name)]

    def vision_attention_layers(self, info: ModelInfo) -> tuple[int, ...]:
        """CLIP encoder layers (0-indexed) besides the feature layer whose attention the method reads
        through `VisionSignals.layer_qk` / `received_attention`; the engine captures their q/k while the
        tower runs."""
        return ()

    # --- selection ------------------------------------------------------------------------------------
    def select(self, stage_index: int, stage: Stage, signals: VisionSignals | LLMSignals) -> Selection:
        raise NotImplementedError

    # --- description ----------------------------------------------------------------------------------
    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class Scores(NamedTuple):
    """What `ScorerMethod.score` returns when plain scores are not enough."""

    values: torch.Tensor  # (R, V) one score per current visual token of each row; higher is kept first
    info: dict = {}  # JSON-friendly facts recorded with the stage
    valid: torch.Tensor | None = None  # (R, V) the tokens that may be kept; None: every real token of the row


def kept_per_row(stage: Stage, signals: VisionSignals | LLMSignals) -> int:
    """Visual tokens a row keeps at `stage`: `stage.keep` per image; an LLM-stage row is a sample, so its
    images' share, at most the row's current visual tokens."""
    if stage.kind == "llm":
        return min(stage.keep * signals.images_per_sample, signals.num_visual)
    return stage.keep


@dataclass
class ScorerMethod(Method):
    """Base of the methods that only score tokens (kvpress's ScorerPress): a subclass writes `score()`; the
    budget per row (`kept_per_row`), the top-k (ties: lower index) and the order (kept tokens stay in raster
    order) live here."""

    def score(self, stage_index: int, stage: Stage, signals: VisionSignals | LLMSignals) -> torch.Tensor | Scores:
        """(R, V) scores of the current visual tokens of each row, or `Scores` with facts and candidates."""
        raise NotImplementedError

    def select(self, stage_index: int, stage: Stage, signals: VisionSignals | LLMSignals) -> Selection:
        scored = self.score(stage_index, stage, signals)
        if not isinstance(scored, Scores):
            scored = Scores(scored)
        valid = scored.valid
        if valid is None and stage.kind == "llm":
            valid = signals.visual_valid  # left-padded batches: a sample's padding slots are never kept
        picked = topk_indices(scored.values, kept_per_row(stage, signals), valid=valid)
        # with every token a candidate, each of the k <= N slots holds one: known without reading the device
        all_valid = True if valid is None else None
        return Selection(*picked, scores=scored.values, info=dict(scored.info), all_valid=all_valid)


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by name to the API, the CLI and the tests."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    _load_builtin_methods()
    try:
        return METHODS[name]
    except KeyError:
        valid = ", ".join(sorted(METHODS))
        raise PruneConfigError(f"unknown method {name!r}; valid methods: {valid}") from None


def make_method(method: str | Method, keep: int | float | None = None, **params) -> Method:
    """A validated method instance from a name (+ keep and params) or an instance."""
    if isinstance(method, Method):
        if keep is not None or params:
            method = dataclasses.replace(method, **({"keep": keep} if keep is not None else {}), **params)
        return method
    cls = method_class(method)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise PruneConfigError(
            f"{method}: unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
        )
    try:
        return cls(keep=keep, **params)
    except TypeError as err:  # wrong types caught by dataclass init
        raise PruneConfigError(f"{method}: {err}") from None


def _load_builtin_methods() -> None:
    # Importing the package registers every built-in method.
    import vtprune.methods  # noqa: F401


@dataclass
class AttentionMethod(Method):
    """Base of the methods that score visual tokens with LLM text->image attention.

    Adds the composable signal modifiers of `vtprune/signals/` (they change scores only, never the
    engine): `heads` picks which heads' attention to trust ("mean" = all heads, as every official pruner;
    a FinePruner strategy name; or "auto" for the resource-aware choice), `num_heads` fixes their count
    (None = dynamic), `debias` lists score corrections, `debias_strength` scales the recency correction
    (0 = off) and `benchmark` picks the released per-benchmark recency constant where one exists.

    `debias` names, as the released patches of intcomp/attention-bias (@ e75ebe7) use them: "recency" (the
    positional weights) and "sink" (padding patches masked out of the score, with the method's own patch
    threshold: PDrop 0.01, the others 0.5; `signals/debias.py` PADDING_THRESHOLDS). "padding" is the same
    as "sink"; "massive", "attention" and "norm" add vtprune's other sink detectors and are only used when
    named.
    """

    debias: tuple[str, ...] | list[str] | str | None = None
    debias_strength: float = 1.0
    heads: str = "mean"
    num_heads: int | Literal["dynamic"] | None = bounded(None, ge=1)
    benchmark: str | None = None

    attention_based: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self._head_policy = self._make_head_policy()
            self._debias = self._make_debias()
        except (ValueError, TypeError) as err:
            raise PruneConfigError(f"{self.name}: {err}") from None

    def _make_head_policy(self):
        from vtprune.signals.heads import HeadPolicy

        if self.heads == "mean" and self.num_heads is None:
            return HeadPolicy()
        return HeadPolicy(strategy=self.heads, num_heads=self.num_heads)

    def _make_debias(self):
        from vtprune.signals.debias import Debias

        if not self.debias:
            return None
        spec = [self.debias] if isinstance(self.debias, str) else list(self.debias)
        recency = self.debias_strength if "recency" in spec else False
        names = [n for n in spec if n != "recency"]
        base = Debias.from_spec(names or None, method=self.name, benchmark=self.benchmark)
        return dataclasses.replace(base, recency=recency)

    def attention_scores(
        self, signals: LLMSignals, queries: str, budget: int, reduce: str = "mean", debias: bool = True
    ) -> tuple[torch.Tensor, dict]:
        """(B, V) visual-token scores from the attention of `queries` rows, after head selection and
        debiasing, plus facts for the record (selected heads, suppressed sinks).

        reduce="mean" averages the valid query rows (FastV, SparseVLM, PDrop); "sum" adds them (HiMAP).
        """
        scores, info, _ = self.attention_scores_and_sinks(signals, queries, budget, reduce, debias)
        return scores, info

    def attention_scores_and_sinks(
        self, signals: LLMSignals, queries: str, budget: int, reduce: str = "mean", debias: bool = True
    ) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
        """`attention_scores` plus the (B, V) bool mask of the tokens the sink step suppressed (None when
        no sink step ran), for a method that caps its budget at the unsuppressed tokens (FastV's patch)."""
        attn, row_valid = signals.attention(queries)  # (B, H, Q, V)
        info: dict = {}
        if self._head_policy.is_mean:
            per_row = attn.mean(dim=1)
        else:
            # FinePruner's budget thresholds are in LLaVA-1.5 tokens (576 per image).
            budget_576 = round(budget * 576 / signals.tokens_per_image)
            per_row, selection = self._head_policy.combine(attn, budget_576, row_valid)
            info["heads"] = selection.indices()
        weights = row_valid.to(per_row.dtype)[:, :, None]
        scores = (per_row * weights).sum(dim=1)
        if reduce == "mean":
            scores = scores / weights.sum(dim=1).clamp(min=1)
        suppressed = None
        if debias and self._debias is not None:
            option = self._debias
            if not signals.is_full_visual_set():
                # The recency curve is calibrated on raster positions of a full image (signals/debias.py).
                option = dataclasses.replace(option, recency=False)
            if option.enabled:
                scores, mask = option.apply(scores, signals.debias_context(), return_mask=True)
                info["suppressed"] = mask.sum(dim=1)
                suppressed = mask if option.sink else None
        return scores, info, suppressed
