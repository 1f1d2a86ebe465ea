"""The drop engine: the one place that changes sequence length.

A `PruneSession` attaches hooks to an unmodified vision-language model, found through its adapter
(`vtprune/models/`):

* a pre-hook on the model's forward. At prefill (a call with `pixel_values`) it runs the vision tower once,
  lets the method's vision stage select, and hands the LLM `inputs_embeds` holding only the kept image
  tokens (positions re-indexed contiguously, as LLaVA does when an image has fewer tokens). At decode it
  rewrites the 2-D mask and the position ids so they match the shorter cache;
* a pre-hook on every decoder layer from the first LLM-stage prune layer on. At a prune layer (prefill) it
  asks the method for a selection and gathers the hidden states, the rotary embeddings, the attention mask
  and the positions; every later layer gets that stage's mask and rotary embeddings (prefill and decode),
  so each layer's KV cache holds exactly the tokens that layer saw;
* a capture of the post-RoPE q/k of the layers whose attention a method scores (signals/attention.py);
* for a "vit" stage (iLLaVA), hooks inside the CLIP encoder that merge patches after the attention sub-block
  of the listed layers (see `_vit_merge`); the tower's output then has fewer patches, and the original patch
  index of each survivor rides on the output object to the prefill.

Pruning happens once, at prefill; decode steps attend to the kept set. `generate()` works unchanged
(greedy, sampling, beams, batches with left padding), because the engine keeps, per stage, the prefix's
padding mask and positions and extends them with what `generate` appends.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vtprune import compat
from vtprune.errors import PruneConfigError
from vtprune.methods.base import Method, Selection, Stage
from vtprune.models import adapter_for
from vtprune.record import PruneRecord, StageRecord
from vtprune.signals import attention as attention_capture
from vtprune.signals.context import Captured, LLMSignals, VisionSignals, ViTLayerSignals


@dataclass
class Layout:
    """The sequence as one group of consecutive decoder layers sees it (the prefill part)."""

    first_layer: int
    key_valid: torch.Tensor  # (B, L) real tokens
    position_ids: torch.Tensor  # (B, L)
    visual_index: torch.Tensor  # (B, V) sequence positions of the visual tokens
    visual_valid: torch.Tensor  # (B, V)
    original_index: torch.Tensor  # (B, V) original visual-token numbering, -1 for created tokens
    stage: Stage | None = None
    all_valid: bool = True  # no padding or holes in the prefix (decided once, at prefill)
    model_positions: bool = True  # positions equal the model's own (so are its rotary embeddings)
    prefill_mask: object = None  # formatted attention mask for the prefill
    prefill_rope: tuple[torch.Tensor, torch.Tensor] | None = None

    decode_start: torch.Tensor | None = None  # (B,) first decoded position, when not the prefix's max + 1

    @property
    def next_position(self) -> torch.Tensor:
        """(B,) position of the first decoded token."""
        if self.decode_start is not None:
            return self.decode_start
        return _next_position(self.position_ids, self.key_valid)


@dataclass
class Episode:
    """State of one generate() call (or one forward with its cache)."""

    layouts: list[Layout]
    input_embeds: torch.Tensor
    captures: dict[int, Captured] = field(default_factory=dict)
    cache: object = None
    vision: VisionSignals | None = None
    images_per_sample: int = 1
    sample_tokens: list[int] = field(default_factory=list)  # visual tokens of each sample before pruning
    input_rebuilt: bool = False  # the LLM input was re-assembled (fewer or padded image slots)
    prefill_done: bool = False
    decode_len: int = 0
    step: dict = field(default_factory=dict)  # per decode step: (mask, rope) per layout

    def layout_for(self, layer: int) -> Layout:
        current = self.layouts[0]
        for layout in self.layouts:
            if layout.first_layer <= layer:
                current = layout
        return current


@dataclass
class _ImageTokens:
    """The visual tokens of every image as the LLM receives them, padded to the longest image."""

    hidden: torch.Tensor  # (N, 1 + P, Dv) feature-layer output per token, [CLS] first
    projected: torch.Tensor  # (N, P, D)
    lengths: torch.Tensor  # (N,) tokens of each image
    source: torch.Tensor | None = None  # (N, P) crop * p + patch, -1: not from the tower (VisionSignals)
    image_crop: torch.Tensor | None = None  # (N,) the image's base view among the tower inputs
    crop_hidden: torch.Tensor | None = None  # (C, 1 + p, Dv) the tower's output per input, when images have several

    @property
    def count(self) -> int:
        return self.lengths.shape[0]

    @property
    def uniform(self) -> bool:
        return bool((self.lengths == self.lengths[0]).all())

    @property
    def token_valid(self) -> torch.Tensor:
        return torch.arange(self.projected.shape[1])[None] < self.lengths[:, None]

    @classmethod
    def build(cls, adapter, crop_hidden: torch.Tensor, projected, image_sizes, batch: int) -> _ImageTokens:
        if isinstance(projected, torch.Tensor):  # each image is one tower input whose patches are its tokens
            return cls(crop_hidden, projected, torch.full((projected.shape[0],), projected.shape[1]))
        sources = adapter.token_sources(image_sizes)
        if sources is not None and len(projected) > len(sources):
            # generate() repeated each sample's images for beams / num_return_sequences after encoding them
            # once: the copies come from the same tower inputs.
            sources = [sources[int(j)] for j in expanded_images(len(projected), len(sources), batch)]
        counts = [t.shape[0] for t in projected]
        if sources is None or [len(s) for s in sources] != counts:
            raise PruneConfigError(
                f"{adapter.family}: the image features ({len(counts)} images) do not match the image sizes given"
            )
        device = crop_hidden.device
        source = torch.nn.utils.rnn.pad_sequence(sources, batch_first=True, padding_value=-1).to(device)
        per_crop = crop_hidden.shape[1] - 1
        image_crop = source[:, 0] // per_crop  # the base view comes first
        flat = crop_hidden[:, 1:].reshape(-1, crop_hidden.shape[-1])
        tokens = flat[source.clamp(min=0)].masked_fill((source < 0)[..., None], 0)
        return cls(
            hidden=torch.cat([crop_hidden[image_crop, :1], tokens], dim=1),
            projected=torch.nn.utils.rnn.pad_sequence(projected, batch_first=True),
            lengths=torch.tensor(counts),
            source=source,
            image_crop=image_crop,
            crop_hidden=crop_hidden,
        )


def expanded_images(expanded: int, computed: int, batch: int) -> torch.Tensor:
    """(expanded,) the computed image each image of an expanded batch is a copy of: generate() repeats each
    sample's group of images for beams / num_return_sequences ([A1 A2, B1 B2] -> [A1 A2, A1 A2, B1 B2, B1 B2])."""
    per_sample = expanded // batch
    repeat = expanded // computed
    j = torch.arange(expanded)
    return (j // (per_sample * repeat)) * per_sample + j % per_sample


def equal_shares(total: int, sizes: list[int]) -> list[int]:
    """`total` split as equally as possible over parts of the given sizes, none above its size (what a part
    cannot take goes to the others; earlier parts get the remainder first)."""
    shares = [0] * len(sizes)
    left, open_parts = total, [i for i, size in enumerate(sizes) if size > 0]
    while left > 0 and open_parts:
        each, extra = divmod(left, len(open_parts))
        for rank, i in enumerate(open_parts):
            give = min(each + (rank < extra), sizes[i] - shares[i])
            shares[i] += give
            left -= give
        open_parts = [i for i in open_parts if shares[i] < sizes[i]]
    return shares


def _row(selection: Selection, row: int) -> Selection:
    """Row `row` of a selection, as a one-row selection."""
    cut = slice(row, row + 1)
    fields = ("indices", "valid", "values", "extra", "extra_valid", "extra_index", "scores")
    return Selection(
        **{f: getattr(selection, f)[cut] if getattr(selection, f) is not None else None for f in fields},
        info=dict(selection.info),
    )


def _concat_selections(parts: list[Selection], projected: torch.Tensor) -> Selection:
    """One row from one-row selections over disjoint tokens of it (already in the row's numbering): kept tokens
    in the row's order, created tokens after them; a part without merged values keeps its projected tokens."""
    indices, values, extra, extra_index = [], [], [], []
    for part in parts:
        keep = part.valid[0] if part.valid is not None else torch.ones_like(part.indices[0], dtype=torch.bool)
        index = part.indices[0][keep]
        indices.append(index)
        values.append(part.values[0][keep] if part.values is not None else projected[0, index])
        if part.extra is not None:
            made = part.extra_valid[0] if part.extra_valid is not None else torch.ones_like(part.extra[0, :, 0], dtype=torch.bool)
            extra.append(part.extra[0][made])
            if part.extra_index is not None:
                extra_index.append(part.extra_index[0][made])
            else:
                extra_index.append(torch.full((int(made.sum()),), -1, device=projected.device))
    index = torch.cat(indices)
    order = torch.argsort(index)
    scores = [p.scores for p in parts if p.scores is not None]
    return Selection(
        indices=index[order][None],
        values=torch.cat(values)[order][None].to(projected.dtype),
        extra=torch.cat(extra)[None] if extra else None,
        extra_index=torch.cat(extra_index)[None] if extra else None,
        scores=torch.stack(scores).sum(dim=0) if scores else None,
        info={},
    )


def stack_selections(rows: list[Selection]) -> Selection:
    """One Selection from the one-row selections of rows planned one at a time (padded, unused slots
    invalid); facts that differ between rows are kept as per-row lists."""

    def pad(tensors, value, dtype=None):
        if all(t is None for t in tensors):
            return None
        like = next(t for t in tensors if t is not None)
        filled = [t if t is not None else like.new_full((1, 0, *like.shape[2:]), value) for t in tensors]
        width = max(t.shape[1] for t in filled)
        out = [F.pad(t, (0, 0) * (t.ndim - 2) + (0, width - t.shape[1]), value=value) for t in filled]
        return torch.cat(out).to(dtype) if dtype is not None else torch.cat(out)

    ones = [torch.ones_like(r.indices, dtype=torch.bool) if r.valid is None else r.valid for r in rows]
    extra_valid = [
        None if r.extra is None else (r.extra_valid if r.extra_valid is not None else r.extra.new_ones(r.extra.shape[:2]))
        for r in rows
    ]
    info: dict = {}
    for key in dict.fromkeys(k for r in rows for k in r.info):
        values = [r.info.get(key) for r in rows]
        info[key] = values[0] if all(v == values[0] for v in values) else values
    return Selection(
        indices=pad([r.indices for r in rows], 0),
        valid=pad(ones, False),
        values=pad([r.values for r in rows], 0),
        extra=pad([r.extra for r in rows], 0),
        extra_valid=pad([v.bool() if v is not None else None for v in extra_valid], False),
        extra_index=pad([r.extra_index for r in rows], -1),
        scores=pad([r.scores for r in rows], 0),
        info=info,
    )


def _to_current(selection: Selection, among: torch.Tensor, width: int) -> Selection:
    """A one-row selection made over a subset (`among`) of a row's `width` tokens, in the row's numbering."""
    scores = selection.scores
    if scores is not None:
        full = scores.new_zeros(1, width)
        scores = full.index_copy(1, among, scores)
    extra_index = selection.extra_index
    if extra_index is not None:
        extra_index = torch.where(extra_index >= 0, among[extra_index.clamp(min=0)], extra_index)
    return dataclasses.replace(selection, indices=among[selection.indices], scores=scores, extra_index=extra_index)


# --- rotary positions of M-RoPE models (Qwen2-VL, Qwen2.5-VL) ---------------------------------------------
# Their positions are (3, B, L): (temporal, height, width) per token. The engine keeps them in that shape in
# `Layout.position_ids`; these helpers are the only places that care about the leading axis.


def _next_position(position_ids: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """(B,) one past the largest position of a real token ((B, L) or (3, B, L) positions)."""
    positions = position_ids.masked_fill(~key_valid, -1)
    if positions.ndim == 3:
        positions = positions.max(dim=0).values
    return positions.max(dim=1).values + 1


def _gather_positions(position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Positions of the tokens at sequence index (B, L') ((B, L) or (3, B, L) positions)."""
    if position_ids.ndim == 3:
        return torch.gather(position_ids, 2, index[None].expand(position_ids.shape[0], -1, -1))
    return torch.gather(position_ids, 1, index)


def _layer_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """The `position_ids` a decoder layer receives: Qwen-VL layers get the text positions only when a
    packed batch needs them (never here), so 3-D positions are not passed."""
    return None if position_ids.ndim == 3 else position_ids


def _keeps_positions(stage: Stage, adapter) -> bool:
    """Whether the tokens a stage keeps keep their positions. On M-RoPE models always: a kept token keeps its
    (t, h, w) position (a contiguous re-indexing of a 3-D layout has no one meaning), so an LLM stage asking
    for "reindex" (PyramidDrop) keeps them too, and the record says "original"."""
    if adapter.mrope:
        return True
    return stage.kind == "llm" and stage.positions == "original"


def _position_source(src: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L') the previous column whose position each token of a gathered sequence takes: its own; a token
    created at this stage (src >= length, M-RoPE models only) takes the one of the token before it."""
    own = torch.where(src < length, src, -1)
    return torch.cummax(own, dim=1).values.clamp(min=0)


def kept_prompt_positions(
    full_positions: torch.Tensor,
    source_column: torch.Tensor,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """(3, B, L') positions of a rebuilt prompt whose column j holds the token of original column
    `source_column[b, j]` (-1: padding, an unused image slot or a created token): each kept token gets the
    unpruned model's position of that very token; a created token (VisionZip's contextual tokens) gets the
    position of the kept token before it; padding gets 0. Original columns increase along the rebuilt row,
    so a running maximum finds "the kept token before"."""
    column = torch.cummax(source_column, dim=1).values
    positions = _gather_positions(full_positions, column.clamp(min=0))
    return positions.masked_fill(~key_valid[None] | (column < 0)[None], 0)


def _index_or_none(tensor: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None or index is None:
        return tensor
    return tensor[index]


def _causal_allowed(key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, 1, q, k) bool: query i (the last q of k positions) may see key j <= its own position."""
    k_len = key_valid.shape[1]
    q_pos = torch.arange(k_len - q_len, k_len, device=key_valid.device)
    k_pos = torch.arange(k_len, device=key_valid.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_valid[:, None, :]
    # Padding or hole rows see nothing; let them see themselves so no softmax row is empty (no NaN).
    allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None]
    return allowed[:, None]


def format_mask(
    key_valid: torch.Tensor,
    q_len: int,
    implementation: str,
    dtype: torch.dtype,
    all_valid: bool | None = None,
    key_length: int | None = None,
):
    """An attention mask in the form the model's attention implementation expects (None when not needed).

    `all_valid` (no padding, no holes), when the caller already knows it, saves a device-to-host sync.
    `key_length`: the number of keys attention sees when the layer's cache is preallocated (a static cache
    returns its whole buffer); the slots after the layer's own tokens are masked out.
    """
    unused_slots = 0 if key_length is None else key_length - key_valid.shape[1]
    if all_valid is None:
        all_valid = bool(key_valid.all())
    if implementation.startswith("flash"):
        if unused_slots > 0:
            return F.pad(key_valid, (0, unused_slots), value=False).long()
        return None if all_valid else key_valid.long()
    if implementation == "sdpa" and all_valid and not unused_slots and q_len in (1, key_valid.shape[1]):
        return None  # SDPA's own causal path: no mask to build, and the fast kernels stay eligible
    allowed = _causal_allowed(key_valid, q_len)
    if unused_slots > 0:
        allowed = F.pad(allowed, (0, unused_slots), value=False)
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


class PruneSession:
    """Hooks that make one model prune with one method. Created by `vtprune.prune`, removed by `unprune`."""

    def __init__(self, model: torch.nn.Module, method: Method, timing: bool = False):
        self.model = model
        self.method = method
        self.adapter = adapter_for(model)
        self.info = self.adapter.info()
        method.validate_for(self.info)
        self.stages = method.stages(self.info)
        self._check_stages()
        self.vit_stage = next((s for s in self.stages if s.kind == "vit"), None)
        self.vision_stage = next((s for s in self.stages if s.kind == "vision"), None)
        # Stages before the LLM change the image blocks' length: positions and masks are rebuilt.
        self.shrinks_input = self.vision_stage is not None or self.vit_stage is not None
        self.llm_stages = [s for s in self.stages if s.kind == "llm"]
        self.timing = timing
        self.episode: Episode | None = None
        self.record: PruneRecord | None = None
        self._handles: list = []
        self._captured_modules: list[torch.nn.Module] = []
        self._pending_vision_layers: dict[int, Captured] = {}
        self._signature = inspect.signature(model.forward)
        self._plans: dict[tuple[int, int | None], tuple[Method, list[Stage]]] = {}

    def _planned(self, tokens: int, keep: int | None = None) -> tuple[Method, list[Stage]]:
        """The method and its stages for a row (an image, or a sample's images) of `tokens` visual tokens per
        image: models whose images differ in token count plan every row with its own count (a fraction keeps
        that fraction of the row's tokens; a count above them keeps them all). `keep` overrides the budget (a
        crop's share)."""
        if (tokens, keep) not in self._plans:
            method = self.method
            if keep is not None:
                method = dataclasses.replace(method, keep=keep)
            elif isinstance(method.keep, int) and not isinstance(method.keep, bool) and method.keep > tokens:
                method = dataclasses.replace(method, keep=tokens)
            stages = method.stages(dataclasses.replace(self.info, visual_tokens=tokens))
            shape = [(s.kind, s.score_layer, s.prune_layer) for s in stages]
            if shape != [(s.kind, s.score_layer, s.prune_layer) for s in self.stages]:
                raise PruneConfigError(
                    f"{self.method.name}: its layers depend on the image's token count ({tokens}); images with "
                    f"different token counts ({self.info.family}) need the same layers for every image"
                )
            self._plans[tokens, keep] = (method, stages)
        return self._plans[tokens, keep]

    def _select_images(self, index: int, signals: VisionSignals, images: _ImageTokens) -> Selection:
        """The vision-stage selection of a model whose images differ in token count: each image with the budget
        its own count gives. With `crop_budget="crop"` (the official LLaVA-NeXT rule of VisPruner, VisionZip and
        CDPruner) every tower input of an image gets an equal share of its budget and is selected with its own
        [CLS]; `image_newline` tokens are not kept. Parts of equal size and share are selected in one call."""
        per_crop_rule = getattr(self.method, "crop_budget", "image") == "crop"
        per_crop = images.crop_hidden.shape[1] - 1 if images.crop_hidden is not None else 0
        whole: dict[int, Selection] = {}
        groups: dict[tuple[int, int], list[tuple[int, int, torch.Tensor]]] = {}
        shares_of: dict[int, list[int]] = {}
        for image, length in enumerate(images.lengths.tolist()):
            method, stages = self._planned(length)
            keep = stages[index].keep
            if not per_crop_rule or keep >= length:
                whole[image] = method.select(index, stages[index], signals.subset(image, 1, length))
                continue
            source = images.source[image, :length]
            crop_of = torch.where(source >= 0, source // per_crop, -1)
            crops = torch.unique(crop_of[crop_of >= 0]).tolist()
            members = [torch.nonzero(crop_of == c).flatten() for c in crops]
            shares = equal_shares(keep, [len(m) for m in members])
            shares_of[image] = [share for share in shares if share]
            for crop, tokens, share in zip(crops, members, shares, strict=True):
                if share:
                    groups.setdefault((len(tokens), share), []).append((image, crop, tokens))
        parts: dict[int, list[Selection]] = {image: [] for image in shares_of}
        for (size, share), group in groups.items():
            method, stages = self._planned(size, keep=share)
            selection = method.select(index, stages[index], signals.crop_rows(group, images.crop_hidden))
            for row, (image, _, tokens) in enumerate(group):
                parts[image].append(_to_current(_row(selection, row), tokens, int(images.lengths[image])))
        rows = []
        for image in range(images.count):
            if image in whole:
                rows.append(whole[image])
                continue
            selection = _concat_selections(parts[image], signals.projected[image : image + 1])
            selection.info["crop_shares"] = shares_of[image]
            rows.append(selection)
        return stack_selections(rows)

    def _check_stages(self) -> None:
        kinds = [s.kind for s in self.stages]
        if "vit" in kinds[1:] or kinds.count("vit") > 1:
            raise PruneConfigError(f"{self.method.name}: at most one vit stage, and it must come first")
        rest = kinds[1:] if kinds[:1] == ["vit"] else kinds
        if "vision" in rest[1:] or rest.count("vision") > 1:
            raise PruneConfigError(
                f"{self.method.name}: at most one vision stage, and it must come first (after a vit stage)"
            )
        if kinds[:1] == ["vit"]:
            if self.info.variable_tokens:
                raise PruneConfigError(
                    f"{self.method.name}: merging inside the vision tower (a vit stage) is not supported on "
                    f"{self.info.family}, which packs a fixed number of patches per crop"
                )
            self._check_vit_stage(self.stages[0])
        layers = [s.prune_layer for s in self.stages if s.kind == "llm"]
        if layers != sorted(set(layers)):
            raise PruneConfigError(
                f"{self.method.name}: LLM stages must prune at increasing layers, got {layers}"
            )
        for stage in self.stages:
            # Attention methods read rows of the score layer's attention; a method that reads only its key
            # states (DART) names no rows.
            if (
                stage.kind == "llm"
                and stage.score_layer < stage.prune_layer
                and stage.queries is None
                and self.method.attention_based
            ):
                raise PruneConfigError(
                    f"{self.method.name}: an LLM stage that scores a layer must name its query rows"
                )

    def _check_vit_stage(self, stage: Stage) -> None:
        name = self.method.name
        if not hasattr(self.method, "merge_vit"):
            raise PruneConfigError(f"{name}: a vit stage needs the method to define merge_vit()")
        feature = self.adapter.feature_layer
        layers = list(stage.vit_layers)
        if not layers:
            raise PruneConfigError(f"{name}: a vit stage needs at least one vision layer")
        bad = [layer for layer in layers if not 0 <= layer < feature]
        if bad:
            raise PruneConfigError(
                f"{name}: vision layer(s) {bad} cannot merge tokens: valid layers are 0..{feature - 1} (the "
                f"tower has {len(self.adapter.vision_layers)} layers and LLaVA takes its features from layer "
                f"{feature}; later layers never reach the LLM)"
            )
        if layers != sorted(set(layers)):
            raise PruneConfigError(f"{name}: vit layers must be increasing and distinct, got {layers}")
        patches = self.adapter.grid[0] * self.adapter.grid[1]
        # vit_remove = 0: the method decides at each layer how many patches to remove (FlowCut).
        if stage.vit_remove < 0 or stage.vit_remove * len(layers) > patches - 1:
            raise PruneConfigError(
                f"{name}: vit_remove={stage.vit_remove} at {len(layers)} layer(s) must be >= 0 and leave at "
                f"least one of the {patches} patches"
            )

    # --- attach / detach --------------------------------------------------------------------------------
    def attach(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._post_forward, with_kwargs=True))
        self._handles.extend(self.adapter.session_hooks())
        if self.llm_stages:
            first = self.llm_stages[0].prune_layer
            for idx in range(first, self.info.num_layers):
                hook = self._make_layer_hook(idx)
                self._handles.append(
                    self.adapter.layers[idx].register_forward_pre_hook(hook, with_kwargs=True)
                )
        # The [CLS] row is read by vision-stage methods and by sink debiasing; capturing costs two references.
        self._handles.append(self.adapter.vision_tower.register_forward_hook(self._tag_vision_output))
        if self.vit_stage is not None:
            self._attach_vit()
        vision_attention = self.adapter.vision_attention_module()
        if vision_attention is not None:  # None: the adapter recomputes what it reads (Qwen-VL)
            self._add_capture(vision_attention, "vision")
        # Other CLIP layers whose attention the method reads (HiPrune's object layer): generate() encodes the
        # images without keeping every layer's hidden states, so their q/k are captured while the tower runs.
        vit_layers = self.vit_stage.vit_layers if self.vit_stage is not None else ()
        for layer in self.method.vision_attention_layers(self.info):
            if layer != self.adapter.feature_layer and layer not in vit_layers:
                self._add_capture(self.adapter.vision_layers[layer].self_attn, ("vision", layer))
        for stage in self.llm_stages:
            if stage.score_layer < stage.prune_layer:
                self._add_capture(self.adapter.layers[stage.score_layer].self_attn, stage.score_layer)

    def detach(self, active_sessions: int) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._captured_modules:
            attention_capture.remove_capture(module)
        self._captured_modules.clear()
        attention_capture.release_if_unused(active_sessions)
        self.episode = None

    def _add_capture(self, module: torch.nn.Module, key, with_value: bool = False) -> None:
        def capture(_module, query, key_states, scaling, value=None):
            if isinstance(key, tuple) and key[0] == "vision":  # another CLIP layer, tied to the tower output
                self._pending_vision_layers[key[1]] = Captured(query, key_states, float(scaling))
                return
            if isinstance(key, tuple):  # ("vit", layer): read by the merge of that layer, in the same pass
                self._vit_qk[key[1]] = Captured(query, key_states, float(scaling), value)
                return
            if key == "vision":  # the tower may run before the prefill call (generate pre-encodes images)
                self._pending_vision = Captured(query, key_states, float(scaling))
                return
            episode = self.episode
            if episode is not None and not episode.prefill_done and query.shape[2] > 1:
                # The prefill starts from an empty cache, so its keys are the first q; a static cache returns
                # its whole preallocated buffer.
                key_states = key_states[:, :, : query.shape[2]]
                episode.captures[key] = Captured(query, key_states, float(scaling))

        attention_capture.add_capture(module, capture, with_value=with_value)
        self._captured_modules.append(module)

    def _tag_vision_output(self, module, args, output):
        # Ties the captured [CLS] q/k (and the vit stage's surviving positions) to the very output object it
        # belongs to.
        output._vtprune_capture = getattr(self, "_pending_vision", None)
        output._vtprune_layer_captures = self._pending_vision_layers
        self._pending_vision_layers = {}
        output._vtprune_pixels = args[0] if args else None
        output._vtprune_vit_positions = getattr(self, "_vit_positions", None)
        if getattr(self, "_vit_valid", None) is not None and not bool(self._vit_valid.all()):
            raise PruneConfigError(
                f"{self.method.name}: the vit stage left the images of a batch with different patch counts"
            )
        counts = getattr(self, "_vit_counts", None)
        output._vtprune_vit_counts = torch.stack(counts, dim=1) if counts else None
        self._pad_projection = getattr(self, "_vit_positions", None) is not None
        self._pending_vision = None
        self._vit_positions = None
        return None

    # --- vit stage (merging inside the CLIP encoder) ------------------------------------------------------
    def _attach_vit(self) -> None:
        """At each listed CLIP layer l, merge after the attention sub-block and before the MLP, exactly:

        CLIPEncoderLayer computes h = x + attn(ln1(x)); out = h + mlp(ln2(h)). A pre-hook on l's `layer_norm2`
        receives h, merges it to h' (fewer tokens, scored with l's captured q/k) and hands ln2 a one-token
        stub (so the layer's own MLP costs nothing; its output is discarded); a forward hook on layer l, run
        before any other (transformers' hidden-state recorder included), returns h' + mlp(ln2(h')). CLIP
        layers are non-causal, have no cache and get the mask None, so later layers simply see fewer tokens;
        when an adaptive merge (FlowCut) leaves images with different counts, the rows are padded and the
        following layers get an additive key mask (`_vit_mask_hook`) until the counts are equal again.
        """
        self._vit_qk: dict[int, Captured] = {}
        self._vit_merged: dict[int, torch.Tensor] = {}
        self._vit_positions = None
        self._vit_valid: torch.Tensor | None = None  # (N, T) after a merge that kept different counts
        self._vit_state: dict = {}
        self._vit_counts: list[torch.Tensor] = []
        self._pad_projection = False
        self._handles.append(self.adapter.vision_tower.register_forward_pre_hook(self._vit_reset))
        self._handles.append(self.adapter.projector.register_forward_hook(self._vit_pad))
        for layer in self.vit_stage.vit_layers:
            module = self.adapter.vision_layers[layer]
            self._add_capture(module.self_attn, ("vit", layer), with_value=True)
            self._handles.append(module.layer_norm2.register_forward_pre_hook(self._vit_merge_hook(layer)))
            self._handles.append(module.register_forward_hook(self._vit_finish_hook(layer), prepend=True))
        # Later layers mask the padding slots of images that kept fewer patches (adaptive merges only).
        for module in self.adapter.vision_layers[self.vit_stage.vit_layers[0] + 1 :]:
            self._handles.append(module.register_forward_pre_hook(self._vit_mask_hook, with_kwargs=True))

    def _vit_reset(self, module, args):
        self._vit_qk.clear()
        self._vit_merged.clear()
        self._vit_positions = None
        self._vit_valid = None
        self._vit_state = {}
        self._vit_counts = []
        self._pad_projection = False

    def _vit_mask_hook(self, module, args, kwargs):
        """Hand a CLIP layer an additive key mask that hides the padding slots (rows of equal width whose
        images kept different numbers of patches), so each image attends exactly as if it were alone."""
        valid = self._vit_valid
        if valid is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if compat.attention_implementation(self.adapter.config.vision_config).startswith("flash"):
            raise PruneConfigError(
                f"{self.method.name}: per-image patch counts inside the vision tower need an sdpa or eager "
                "vision tower"
            )
        mask = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~valid, torch.finfo(hidden.dtype).min)[:, None, None, :]
        if len(args) > 1:
            given = args[1]
            return (args[0], mask if given is None else given + mask, *args[2:]), kwargs
        kwargs = dict(kwargs)
        given = kwargs.get("attention_mask")
        kwargs["attention_mask"] = mask if given is None else given + mask
        return args, kwargs

    def _vit_pad(self, module, args, output):
        """Zero-pad the projection of merged tower features back to the prompt's image-token count.

        generate() groups pre-encoded image features per sample by counting image placeholders (beams,
        num_return_sequences), so each image's feature list must keep its placeholder length; the prefill
        cuts the padding off again (`_vit_original_index` gives the real width)."""
        if not self._pad_projection:
            return None
        self._pad_projection = False  # only the projection that directly follows the tower
        missing = self.info.visual_tokens - output.shape[1]
        return F.pad(output, (0, 0, 0, missing)) if missing > 0 else None

    def _vit_merge_hook(self, layer: int):
        def hook(module, args):
            hidden = args[0]  # (N, T, Dv): the residual stream after layer `layer`'s attention sub-block
            captured = self._vit_qk.pop(layer)
            n, t, _ = hidden.shape
            signals = ViTLayerSignals(layer, captured, self._vit_valid, self._vit_state)
            out = self.method.merge_vit(self.vit_stage, layer, hidden, signals)
            # (merged, kept positions) or, when images keep different counts, (merged, kept, valid)
            merged, kept = out[0], out[1]
            valid = out[2] if len(out) > 2 else None
            if self._vit_positions is None:
                self._vit_positions = torch.arange(t, device=hidden.device).expand(n, t)
            self._vit_positions = torch.gather(self._vit_positions, 1, kept)
            self._vit_valid = valid
            if self.vit_stage.vit_remove == 0:  # adaptive: record the patches each image keeps ([CLS] first)
                width = kept.shape[1] - 1
                count = valid[:, 1:].sum(dim=1) if valid is not None else kept.new_full((n,), width)
                self._vit_counts.append(count)
            self._vit_merged[layer] = merged.to(hidden.dtype)
            return (hidden[:, :1],)  # the stub: the layer's own ln2/MLP output is replaced below

        return hook

    def _vit_finish_hook(self, layer: int):
        def hook(module, args, output):
            merged = self._vit_merged.pop(layer)
            ln = module.layer_norm2
            normed = F.layer_norm(merged, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            out = merged + module.mlp(normed)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook

    def _vit_original_index(self, image_out, expanded_from) -> torch.Tensor | None:
        """(N, P') original visual-token index (within its image) of each patch the tower output holds."""
        if self.vit_stage is None:
            return None
        positions = getattr(image_out, "_vtprune_vit_positions", None)
        if positions is None:
            raise PruneConfigError(
                f"{self.method.name}: the image features were computed without vtprune's vit-stage hooks "
                "(before vtprune.prune() was applied); pass pixel_values instead"
            )
        positions = _index_or_none(positions, expanded_from)
        # Tower positions count the [CLS] (always kept, first); LLaVA's "default" features drop it.
        return positions[:, 1:] - 1 if self.adapter.select_strategy == "default" else positions

    def _vision_capture(self, image_out, image_index: torch.Tensor | None) -> Captured | None:
        """The [CLS] q/k captured when the tower produced `image_out` (None when vtprune did not see it run;
        VisionSignals then recomputes q/k if asked). `image_index` maps expanded images to computed ones."""
        captured = getattr(image_out, "_vtprune_capture", None)
        if captured is None:
            return None
        if image_index is not None:
            captured = Captured(captured.query[image_index], captured.key[image_index], captured.scaling)
        return captured

    def _vision_layer_captures(self, image_out, image_index: torch.Tensor | None) -> dict[int, Captured]:
        """q/k of the other CLIP layers the method reads, captured when the tower produced `image_out`."""
        captured = getattr(image_out, "_vtprune_layer_captures", None) or {}
        if image_index is None:
            return dict(captured)
        return {
            layer: Captured(c.query[image_index], c.key[image_index], c.scaling)
            for layer, c in captured.items()
        }

    # --- timing -----------------------------------------------------------------------------------------
    def _clock(self) -> float:
        if self.timing and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    # --- top-level hooks --------------------------------------------------------------------------------
    def _bind(self, args, kwargs) -> dict:
        if not args:
            return dict(kwargs)
        bound = self._signature.bind_partial(*args, **kwargs)
        out = dict(bound.arguments)
        out.update(out.pop("kwargs", {}))
        return out

    def _pre_forward(self, module, args, kwargs):
        call = self._bind(args, kwargs)
        if self.adapter.has_visual_input(call):
            return (), self._prefill(call)
        episode = self.episode
        cache = compat.cache_from_call(call)
        if episode is not None and episode.prefill_done and cache is not None and cache is episode.cache:
            return (), self._decode(call)
        self.episode = None  # a text-only call: nothing to prune
        return None

    def _post_forward(self, module, args, kwargs, output):
        episode = self.episode
        if episode is None:
            return None
        if not episode.prefill_done:
            episode.prefill_done = True
            episode.cache = compat.cache_from_output(output)
            episode.captures.clear()  # release q/k of the scored layers
            if self.record is not None and self.timing:
                self.record.timings_ms["total_prefill"] = (self._clock() - self._prefill_start) * 1e3
        else:
            episode.decode_len += episode.step.get("q_len", 0)
            episode.step = {}
        return None

    # --- prefill ----------------------------------------------------------------------------------------
    def _encode_visual_input(self, call: dict):
        """Pop the call's visual inputs and run the tower once (generate() may have run it already): (tower
        output, image sizes, whether the tower ran in this call, the adapter's own description or None)."""
        take = getattr(self.adapter, "take_visual_input", None)
        if take is not None:  # the adapter unpacks its inputs itself (Qwen-VL: images or videos, grids)
            visual = take(call)
            return visual.output, visual.sizes, visual.encoded_here, visual
        pixel_values = call.pop("pixel_values", None)
        image_out = compat.precomputed_image_output(call)
        image_sizes = call.pop("image_sizes", None)
        if image_out is None:
            extra = {"image_sizes": image_sizes} if image_sizes is not None else {}
            image_out = self.adapter.encode_images(pixel_values, **extra)
        elif image_sizes is None:  # generate() encoded the images and dropped their sizes
            image_sizes = getattr(image_out, "_vtprune_image_sizes", None)
        call.pop("mm_encoder_outputs", None)
        return image_out, image_sizes, pixel_values is not None, None

    def _token_coordinates(self, image_sizes, batch: int) -> list[list[list[int]]] | None:
        """Per sample, per visual token in original numbering: (image, frame, row, column), where the adapter
        knows them (`token_coordinates`, Qwen-VL); None otherwise."""
        coordinates_of = getattr(self.adapter, "token_coordinates", None)
        if coordinates_of is None or image_sizes is None:
            return None
        per_image = [coordinates_of(size) for size in image_sizes]
        if len(per_image) % batch:
            return None
        n_img = len(per_image) // batch
        table = []
        for b in range(batch):
            rows = [torch.cat([torch.full((len(c), 1), i), c], dim=1) for i, c in enumerate(per_image[b * n_img : (b + 1) * n_img])]
            table.append(torch.cat(rows).tolist())
        return table

    def _prefill(self, call: dict) -> dict:
        self._prefill_start = self._clock()
        input_ids = call.get("input_ids")
        if input_ids is None:
            raise PruneConfigError(
                "vtprune needs `input_ids` (not only inputs_embeds) to locate the image tokens"
            )
        cache = compat.cache_from_call(call)
        if cache is not None and cache.get_seq_length() > 0:
            raise PruneConfigError(
                "vtprune prunes at prefill; continuing a non-empty cache with a new image is not supported"
            )
        if self.llm_stages and not compat.cache_holds_any_length(cache):
            raise PruneConfigError(
                f"{self.method.name} prunes inside the LLM, so each layer's KV cache holds a different number of "
                f"tokens: it supports the dynamic and static caches (cache_implementation='dynamic' or 'static'), "
                f"not {type(cache).__name__}"
            )
        batch, length = input_ids.shape
        mask2d = call.get("attention_mask")
        if mask2d is not None and mask2d.ndim == 4 and compat.static_key_length(cache, 0) is not None:
            # generate() prebuilt the 4-D mask of the full prompt; the engine builds the pruned ones itself.
            mask2d = compat.padding_mask_of_prebuilt(mask2d, length).long()
        if mask2d is not None and mask2d.ndim != 2:
            raise PruneConfigError("vtprune needs a 2-D attention_mask (batch, sequence)")
        text_valid_in = mask2d.bool() if mask2d is not None else torch.ones_like(input_ids, dtype=torch.bool)
        # Vision tower (once; generate() may have run it already): for models whose images differ in token
        # count, the counts (and so the image blocks of the prompt) are known only from the images.
        t0 = self._clock()
        image_out, image_sizes, encoded_here, visual_input = self._encode_visual_input(call)
        vision_ms = (self._clock() - t0) * 1e3
        hidden_v, projected = self.adapter.unpack_image_output(image_out)
        images = _ImageTokens.build(self.adapter, hidden_v, projected, image_sizes, batch)
        image_layout = self.adapter.locate_images(input_ids, images.count, images.lengths)
        n_img = image_layout.images_per_sample
        sample_tokens = image_layout.lengths.sum(dim=1).tolist()
        record = PruneRecord(
            method=self.method.name,
            params={k: v for k, v in self.method.params().items()},
            visual_tokens=max(sample_tokens),
            num_layers=self.info.num_layers,
            sample_visual_tokens=sample_tokens if len(set(sample_tokens)) > 1 else None,
        )
        if encoded_here:  # the tower ran here, not in generate()
            record.timings_ms["vision"] = vision_ms
        record.token_coordinates = self._token_coordinates(image_sizes, batch)
        self.record = record
        self.episode = episode = Episode(
            layouts=[], input_embeds=None, cache=cache, images_per_sample=n_img, sample_tokens=sample_tokens
        )
        # M-RoPE prompts always get explicit positions (the kept tokens' own), and so do their decode steps.
        episode.input_rebuilt = self.shrinks_input or not images.uniform or self.adapter.mrope

        hidden_v, projected = images.hidden, images.projected
        expanded_from = None
        if projected.shape[0] != hidden_v.shape[0]:
            # generate() repeats each sample's image group for beams / num_return_sequences in the projected
            # features only; map every expanded image to its computed one.
            expanded_from = expanded_images(projected.shape[0], hidden_v.shape[0], batch).to(projected.device)
            hidden_v = hidden_v[expanded_from]
        vit_orig = self._vit_original_index(image_out, expanded_from)
        if vit_orig is not None:
            projected = projected[:, : vit_orig.shape[1]]  # drop the padding `_vit_pad` added
        t1 = self._clock()
        per_image = projected.shape[1]
        n_total = hidden_v.shape[0]
        image_index = torch.arange(n_total, device=projected.device)
        is_image = self.adapter.visual_token_mask(input_ids)
        vision_signals = VisionSignals(
            adapter=self.adapter,
            hidden=hidden_v,
            projected=projected,
            image_sample=image_index // n_img,
            input_ids=input_ids,
            text_valid=text_valid_in & ~is_image,
            captured=self._vision_capture(image_out, expanded_from),
            pixel_values=_index_or_none(getattr(image_out, "_vtprune_pixels", None), expanded_from),
            image_output=image_out,
            source=images.source,
            image_crop=images.image_crop,
            lengths=None if images.uniform else images.lengths.to(projected.device),
            image_index=expanded_from,
            layer_captures=self._vision_layer_captures(image_out, expanded_from),
        )
        episode.vision = vision_signals
        # Original numbering: a sample's visual tokens, image after image.
        lengths = image_layout.lengths.to(projected.device)
        image_offset = (torch.cumsum(lengths, dim=1) - lengths).reshape(-1, 1)
        if vit_orig is not None:
            if self.adapter.select_strategy == "default" and vision_signals.captured is not None:
                # Per-original lookups (debiasing) expect the full patch width: merged-away patches get 0.
                full = torch.zeros(n_total, self.info.visual_tokens, device=projected.device)
                vision_signals.__dict__["cls_attention"] = full.scatter(
                    1, vit_orig, vision_signals.cls_attention.float()
                )
            vit_valid = torch.ones(vit_orig.shape, dtype=torch.bool, device=vit_orig.device)
            record.stages.append(
                self._stage_record(
                    self.vit_stage,
                    0,
                    (vit_orig + image_offset).view(batch, -1),
                    vit_valid.view(batch, -1),
                    None,
                )
            )
            record.stages[-1].extra.update(
                layers=list(self.vit_stage.vit_layers), removed_per_layer=self.vit_stage.vit_remove
            )
            counts = getattr(image_out, "_vtprune_vit_counts", None)
            if counts is not None:  # adaptive merges: patches per image after each listed layer
                counts = _index_or_none(counts, expanded_from)
                record.stages[-1].extra["patches_after_layer"] = counts.tolist()
        if self.vision_stage is not None:
            index = self.stages.index(self.vision_stage)
            if not self.info.variable_tokens:
                selection = self.method.select(index, self.vision_stage, vision_signals)
            elif images.uniform and getattr(self.method, "crop_budget", "image") == "image":
                method, stages = self._planned(int(images.lengths[0]))  # the images' token count's budget
                selection = method.select(index, stages[index], vision_signals)
            else:
                selection = self._select_images(index, vision_signals, images)
            tokens, valid, orig = self._vision_tokens(selection, projected)
            kept_width = selection.indices.shape[1]  # slots after it hold created tokens
            if vit_orig is not None:  # selection indices count the patches the tower kept
                orig = torch.where(orig >= 0, torch.gather(vit_orig, 1, orig.clamp(min=0)), orig)
            orig = torch.where(orig >= 0, orig + image_offset, orig)
            record.timings_ms["select_vision"] = (self._clock() - t1) * 1e3
            record.stages.append(
                self._stage_record(
                    self.vision_stage, 0, orig.view(batch, -1), valid.view(batch, -1), selection
                )
            )
        else:
            tokens = projected
            valid = images.token_valid.to(projected.device)[:, :per_image]
            if vit_orig is not None:
                orig = vit_orig + image_offset
            else:
                orig = torch.arange(per_image, device=projected.device).expand(n_total, -1) + image_offset
            orig = orig.masked_fill(~valid, -1)
            kept_width = tokens.shape[1]

        # Assemble the LLM input: text embeddings with each image block replaced by W slots holding its kept
        # tokens (unused slots are holes: masked, and skipped by the positions). Samples whose image blocks
        # were shorter start later (extra left padding), so every sample has the same length.
        embeds = self.adapter.embed(input_ids)
        device = embeds.device
        width = tokens.shape[1]
        starts, block_len = image_layout.starts.to(device), image_layout.lengths.to(device)
        removed = block_len.sum(dim=1)  # (B,)
        new_lengths = length - removed + n_img * width
        new_len = int(new_lengths.max())
        if new_len > length and compat.static_key_length(cache, 0) is not None:
            # Images of different token counts in one batch: the padded image slots lengthen the prompt.
            if not compat.grow_static_cache(cache, new_len - length):
                raise PruneConfigError(
                    f"the images of this batch differ in token count, so the pruned prompt is {new_len - length} "
                    "tokens longer than the one the static cache was sized for; pass a fresh cache"
                )
        shift = new_len - new_lengths  # (B,)
        block = torch.arange(n_img, device=device)
        before = torch.cumsum(block_len, dim=1) - block_len  # image tokens in earlier blocks
        slot_pos = (starts - before + block * width + shift[:, None])[:, :, None] + torch.arange(width, device=device)
        slot_pos = slot_pos.flatten(1)  # (B, n * W)
        positions = torch.arange(length, device=device)
        images_before = torch.cumsum(is_image, dim=1) - is_image.long()
        blocks_before = ((starts + block_len)[:, None, :] <= positions[None, :, None]).sum(dim=2)
        text_pos = positions - images_before + blocks_before * width + shift[:, None]
        inputs_embeds = embeds.new_zeros(batch, new_len, embeds.shape[-1])
        key_valid = torch.zeros(batch, new_len, dtype=torch.bool, device=device)
        text_rows, text_cols = torch.nonzero(~is_image, as_tuple=True)
        new_text_cols = text_pos[text_rows, text_cols]
        inputs_embeds[text_rows, new_text_cols] = embeds[text_rows, text_cols]
        key_valid[text_rows, new_text_cols] = text_valid_in[text_rows, text_cols]
        flat_tokens = tokens.reshape(batch, n_img * width, tokens.shape[-1]).to(embeds.dtype)
        inputs_embeds.scatter_(1, slot_pos[:, :, None].expand(-1, -1, embeds.shape[-1]), flat_tokens)
        key_valid.scatter_(1, slot_pos, valid.reshape(batch, n_img * width))

        position_ids = call.get("position_ids")
        decode_start = None
        if self.adapter.mrope:
            full_positions = self.adapter.prompt_positions(input_ids, mask2d, visual_input)
            source_column = torch.full((batch, new_len), -1, dtype=torch.long, device=device)
            source_column[text_rows, new_text_cols] = text_cols
            source_column.scatter_(1, slot_pos, self._visual_source_columns(is_image, orig, valid, kept_width))
            position_ids = kept_prompt_positions(full_positions, source_column, key_valid)
            # Decoding continues where the unpruned prompt would (its rope_deltas), whatever was kept.
            decode_start = _next_position(full_positions, text_valid_in | is_image)
        elif episode.input_rebuilt or position_ids is None and not bool(key_valid.all()):
            position_ids = (torch.cumsum(key_valid, dim=1) - 1).clamp(min=0).masked_fill(~key_valid, 0)
        elif position_ids is None:
            position_ids = torch.arange(new_len, device=embeds.device)[None].expand(batch, -1)
        if position_ids.ndim == 2 and position_ids.shape[0] != batch:
            position_ids = position_ids.expand(batch, -1)
        layout0 = Layout(
            all_valid=bool(key_valid.all()),
            first_layer=0,
            key_valid=key_valid,
            position_ids=position_ids,
            visual_index=slot_pos,
            visual_valid=valid.reshape(batch, n_img * width),
            original_index=orig.reshape(batch, n_img * width),
            decode_start=decode_start,
        )
        episode.layouts.append(layout0)
        episode.input_embeds = inputs_embeds

        call["input_ids"] = None
        call["inputs_embeds"] = inputs_embeds
        call["position_ids"] = position_ids
        call["attention_mask"] = None if mask2d is None and bool(key_valid.all()) else key_valid.long()
        if not self.stages:
            record.stages.append(
                self._stage_record(
                    Stage(kind="vision", keep=width, name="none"),
                    0,
                    layout0.original_index,
                    layout0.visual_valid,
                    None,
                )
            )
        return call

    @staticmethod
    def _visual_source_columns(is_image, orig, valid, kept_width: int) -> torch.Tensor:
        """(B, n * W) the prompt column of the token in each image slot: the sample's visual token number
        `orig` (image after image) -> its column; -1 for unused slots and created tokens (slot >= kept_width)."""
        batch = is_image.shape[0]
        most = int(is_image.sum(dim=1).max())
        visual_columns = torch.sort((~is_image).to(torch.int8), dim=1, stable=True).indices[:, :most]
        width = orig.shape[1]
        kept = valid & (orig >= 0) & (torch.arange(width, device=orig.device) < kept_width)
        columns = torch.gather(visual_columns, 1, orig.clamp(min=0).reshape(batch, -1)).view(orig.shape)
        return torch.where(kept, columns, -1).reshape(batch, -1)

    def _vision_tokens(self, selection: Selection, projected: torch.Tensor):
        """Kept (and created) tokens of each image in the LLM embedding space, their validity and numbering."""
        valid = (
            selection.valid
            if selection.valid is not None
            else torch.ones_like(selection.indices, dtype=torch.bool)
        )
        index = torch.where(valid, selection.indices, 0)  # unused slots point anywhere; they are masked
        rows, t = index.shape
        d = projected.shape[-1]
        if selection.values is not None:
            kept = selection.values
        else:
            kept = torch.gather(projected, 1, index[:, :, None].expand(-1, -1, d))
        orig = index.masked_fill(~valid, -1)
        if selection.extra is not None:
            c = selection.extra.shape[1]
            kept = torch.cat([kept, selection.extra.to(kept.dtype)], dim=1)
            extra_valid = (
                selection.extra_valid
                if selection.extra_valid is not None
                else torch.ones(rows, c, dtype=torch.bool, device=index.device)
            )
            valid = torch.cat([valid, extra_valid], dim=1)
            extra_index = (
                selection.extra_index
                if selection.extra_index is not None
                else torch.full((rows, c), -1, device=index.device)
            )
            orig = torch.cat([orig, extra_index], dim=1)
        return kept, valid, orig

    def _stage_record(
        self, stage: Stage, index: int, orig: torch.Tensor, valid: torch.Tensor, selection
    ) -> StageRecord:
        orig_list = orig.tolist()
        valid_list = valid.tolist()
        kept = [
            [o for o, v in zip(row, vrow, strict=False) if v]
            for row, vrow in zip(orig_list, valid_list, strict=False)
        ]
        return StageRecord(
            name=stage.name or f"{stage.kind}{index}",
            kind=stage.kind,
            score_layer=stage.score_layer,
            prune_layer=stage.prune_layer,
            positions="original" if _keeps_positions(stage, self.adapter) else "reindex",
            kept=kept,
            counts=[len(k) for k in kept],
            extra=dict(selection.info) if selection is not None else {},
        )

    # --- decoder-layer hook -------------------------------------------------------------------------------
    def _make_layer_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            episode = self.episode
            if episode is None:
                return None
            if not episode.prefill_done:
                return self._layer_prefill(layer_idx, args, kwargs)
            return self._layer_decode(layer_idx, args, kwargs)

        return hook

    def _layer_prefill(self, layer_idx: int, args, kwargs):
        episode = self.episode
        stage_index = next(
            (i for i, s in enumerate(self.stages) if s.kind == "llm" and s.prune_layer == layer_idx), None
        )
        hidden = args[0] if args else kwargs["hidden_states"]
        if stage_index is not None:
            hidden = self._drop(stage_index, layer_idx, hidden, kwargs)
        layout = episode.layout_for(layer_idx)
        if layout.first_layer == 0:
            return None
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = layout.prefill_mask
        kwargs["position_embeddings"] = layout.prefill_rope
        kwargs["position_ids"] = _layer_position_ids(layout.position_ids)
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _drop(self, stage_index: int, layer_idx: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Select at an LLM stage boundary and gather everything the later layers need."""
        t0 = self._clock()
        episode = self.episode
        stage = self.stages[stage_index]
        prev = episode.layout_for(layer_idx - 1)
        layout0 = episode.layouts[0]
        signals = LLMSignals(
            adapter=self.adapter,
            layer=layer_idx,
            hidden=hidden,
            key_valid=prev.key_valid,
            visual_index=prev.visual_index,
            visual_valid=prev.visual_valid,
            original_index=prev.original_index,
            position_ids=prev.position_ids,
            images_per_sample=episode.images_per_sample,
            input_embeds=episode.input_embeds,
            input_visual_index=layout0.visual_index,
            input_valid=layout0.key_valid,
            captured=episode.captures.pop(stage.score_layer, None)
            if stage.score_layer < stage.prune_layer
            else None,
            vision=episode.vision,
        )
        sample_tokens = episode.sample_tokens
        if not self.info.variable_tokens:
            selection = self.method.select(stage_index, stage, signals)
        elif len(set(sample_tokens)) == 1:  # the budget the samples' token count gives
            method, stages = self._planned(round(sample_tokens[0] / episode.images_per_sample))
            signals.row_tokens_per_image = round(sample_tokens[0] / episode.images_per_sample)
            selection = method.select(stage_index, stages[stage_index], signals)
        else:  # each sample with the budget its own token count gives
            rows = []
            for b, total in enumerate(sample_tokens):
                per_image = round(total / episode.images_per_sample)
                method, stages = self._planned(per_image)
                row, among = signals.row(b, per_image)
                selected = method.select(stage_index, stages[stage_index], row)
                rows.append(_to_current(selected, among, prev.visual_index.shape[1]))
            selection = stack_selections(rows)
        batch, length, d = hidden.shape
        device = hidden.device
        sel_valid = (
            selection.valid
            if selection.valid is not None
            else torch.ones_like(selection.indices, dtype=torch.bool)
        )
        sel = torch.where(sel_valid, selection.indices, 0)  # unused slots point anywhere; they are masked
        t = sel.shape[1]
        sel_valid = sel_valid & torch.gather(prev.visual_valid, 1, sel)
        kept_pos = torch.gather(prev.visual_index, 1, sel)  # (B, T) positions in the previous sequence
        is_visual = torch.zeros(batch, length, dtype=torch.bool, device=device)
        is_visual.scatter_(1, prev.visual_index, True)
        n_text = length - prev.visual_index.shape[1]
        text_pos = torch.sort(is_visual.to(torch.int8), dim=1, stable=True).indices[
            :, :n_text
        ]  # (B, Lt) ascending
        extra = selection.extra
        c = 0 if extra is None else extra.shape[1]
        keep_positions = _keeps_positions(stage, self.adapter)
        if c and keep_positions and not self.adapter.mrope:
            raise PruneConfigError(f"{self.method.name}: created tokens need re-indexed positions")
        # Order: every token by its previous position; created tokens right after the last kept visual token.
        last_visual = kept_pos.masked_fill(~sel_valid, -1).max(dim=1).values.float()
        keys = torch.cat(
            [
                text_pos.float(),
                kept_pos.float() + torch.arange(t, device=device) / (2 * t + 2),
                last_visual[:, None] + 0.5 + torch.arange(c, device=device) / (2 * c + 2),
            ],
            dim=1,
        )
        source = torch.cat(
            [text_pos, kept_pos, length + torch.arange(c, device=device).expand(batch, c)], dim=1
        )
        order = torch.sort(keys, dim=1, stable=True).indices
        src = torch.gather(source, 1, order)  # (B, L') index into [hidden | extra]
        slot_of = torch.argsort(order, dim=1)  # candidate -> new position
        new_visual_index = slot_of[:, n_text:]
        padded = hidden if not c else torch.cat([hidden, extra.to(hidden.dtype)], dim=1)
        new_hidden = torch.gather(padded, 1, src[:, :, None].expand(-1, -1, d))
        if selection.values is not None:
            new_hidden = new_hidden.scatter(
                1, slot_of[:, n_text : n_text + t, None].expand(-1, -1, d), selection.values.to(hidden.dtype)
            )
        valid_src = torch.cat([prev.key_valid, torch.ones(batch, c, dtype=torch.bool, device=device)], dim=1)
        key_valid = torch.gather(valid_src, 1, src)
        visual_valid = sel_valid
        original = torch.gather(prev.original_index, 1, sel)
        if c:
            extra_valid = (
                selection.extra_valid
                if selection.extra_valid is not None
                else torch.ones(batch, c, dtype=torch.bool, device=device)
            )
            key_valid.scatter_(1, slot_of[:, n_text + t :], extra_valid)
            visual_valid = torch.cat([visual_valid, extra_valid], dim=1)
            extra_index = selection.extra_index
            extra_orig = torch.full((batch, c), -1, dtype=torch.long, device=device)
            if extra_index is not None:
                extra_orig = torch.where(
                    extra_index >= 0,
                    torch.gather(prev.original_index, 1, extra_index.clamp(min=0)),
                    extra_orig,
                )
            original = torch.cat([original, extra_orig], dim=1)
        key_valid.scatter_(1, slot_of[:, n_text : n_text + t], sel_valid)

        if keep_positions:
            column = _position_source(src, length)
            position_ids = _gather_positions(prev.position_ids, column)
            # Gather from the rotary embeddings the previous layers used (the model's own before any LLM stage).
            cos, sin = prev.prefill_rope if prev.prefill_rope is not None else kwargs["position_embeddings"]
            cos = cos.expand(batch, -1, -1)
            sin = sin.expand(batch, -1, -1)
            gather_index = column[:, :, None].expand(-1, -1, cos.shape[-1])
            rope = (torch.gather(cos, 1, gather_index), torch.gather(sin, 1, gather_index))
        else:
            position_ids = (torch.cumsum(key_valid, dim=1) - 1).clamp(min=0).masked_fill(~key_valid, 0)
            rope = self.adapter.rotary(new_hidden, position_ids)
        impl = self.adapter.attn_implementation
        all_valid = bool(key_valid.all())
        layout = Layout(
            all_valid=all_valid,
            model_positions=prev.model_positions and keep_positions,
            first_layer=layer_idx,
            key_valid=key_valid,
            position_ids=position_ids,
            visual_index=new_visual_index,
            visual_valid=visual_valid,
            original_index=original,
            stage=stage,
            prefill_mask=format_mask(
                key_valid,
                key_valid.shape[1],
                impl,
                hidden.dtype,
                all_valid,
                key_length=compat.static_key_length(episode.cache, layer_idx),
            ),
            prefill_rope=rope,
        )
        episode.layouts.append(layout)
        self.record.stages.append(self._stage_record(stage, stage_index, original, visual_valid, selection))
        self.record.timings_ms[f"select_{stage.name or f'llm{stage_index}'}"] = (self._clock() - t0) * 1e3
        return new_hidden

    # --- decode -------------------------------------------------------------------------------------------
    def _decode(self, call: dict) -> dict:
        episode = self.episode
        ref = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
        batch, q_len = ref.shape[:2]
        done = episode.decode_len
        mask2d = call.get("attention_mask")
        if mask2d is not None and mask2d.ndim == 2 and mask2d.shape[1] >= done + q_len:
            tail = mask2d[:, mask2d.shape[1] - done - q_len :].bool()
        else:
            tail = torch.ones(batch, done + q_len, dtype=torch.bool, device=ref.device)
        offsets = torch.arange(done, done + q_len, device=ref.device)
        tail_valid = mask2d is None or bool(tail.all())  # the one host sync of a decode step
        episode.step = {"q_len": q_len, "tail": tail, "offsets": offsets, "tail_valid": tail_valid}
        if episode.input_rebuilt:
            layout0 = episode.layouts[0]
            full = torch.cat([layout0.key_valid, tail], dim=1)
            call["attention_mask"] = None if mask2d is None and bool(full.all()) else full.long()
            call["position_ids"] = layout0.next_position[:, None] + offsets
        return call

    def _layer_decode(self, layer_idx: int, args, kwargs):
        episode = self.episode
        layout = episode.layout_for(layer_idx)
        if layout.first_layer == 0 or not episode.step:
            return None
        key = ("layout", layout.first_layer)
        step = episode.step
        if key not in step:
            hidden = args[0] if args else kwargs["hidden_states"]
            key_valid = torch.cat([layout.key_valid, step["tail"]], dim=1)
            all_valid = layout.all_valid and step["tail_valid"]
            mask = format_mask(
                key_valid,
                step["q_len"],
                self.adapter.attn_implementation,
                hidden.dtype,
                all_valid,
                key_length=compat.static_key_length(episode.cache, layer_idx),
            )
            if layout.model_positions:
                # Kept tokens kept their positions: the model's own rotary embeddings are right as they are.
                step[key] = (mask, None, None)
            else:
                position_ids = layout.next_position[:, None] + step["offsets"]
                step[key] = (mask, self.adapter.rotary(hidden, position_ids), position_ids)
        mask, rope, position_ids = step[key]
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask
        if rope is not None:
            kwargs["position_embeddings"] = rope
            kwargs["position_ids"] = position_ids
        return args, kwargs
