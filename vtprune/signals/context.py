"""What a method may read when it selects: the signals of one stage, computed once and shared.

`VisionSignals` has one row per image (vision stage); `LLMSignals` one row per sample (LLM stage). Attention
rows are computed lazily from captured post-RoPE query/key states (signals/attention.py) and cached, so a
method that does not ask for them costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from vtprune.signals.attention import attention_of_rows, attention_rows, received_attention

if TYPE_CHECKING:
    from vtprune.models.base import ModelAdapter


@dataclass
class Captured:
    """Post-RoPE query/key states of one attention call, as the kernel saw them."""

    query: torch.Tensor  # (B, H, L, dh)
    key: torch.Tensor  # (B, Hkv, L, dh)
    scaling: float
    value: torch.Tensor | None = None  # (B, Hkv, L, dh), captured only where a method reads it (vit stages)


@dataclass(eq=False)
class VisionSignals:
    """Signals of the vision stage; rows are images.

    When the vision tower sees each image as one input (LLaVA-1.5), its rows are the images. When an image is
    several tower inputs ("crops": LLaVA-NeXT's base view and high-resolution tiles), `source` says where
    each of the image's tokens comes from (crop * p + patch, -1 for a token made outside the tower such as
    `image_newline`); `captured`, `pixel_values` and `image_output` then have one row per crop, and the
    [CLS] of an image is the one of its base view (`image_crop`).
    """

    adapter: ModelAdapter
    hidden: torch.Tensor  # (N, 1 + P, Dv) feature-layer output per image token, [CLS] first
    projected: torch.Tensor  # (N, P, D) what the LLM would receive
    image_sample: torch.Tensor  # (N,) the sample each image belongs to
    input_ids: torch.Tensor  # (B, L) the prompts
    text_valid: torch.Tensor  # (B, L) True for real (non-padding, non-image) prompt tokens
    captured: Captured | None = None  # the feature layer's attention q/k (per tower input)
    pixel_values: torch.Tensor | None = None  # (C, 3, H, W) the tower's input, when vtprune saw it
    image_output: object = None  # the tower's output (hidden states of every layer)
    source: torch.Tensor | None = None  # (N, P) crop * p + patch of each token, -1: not from the tower
    image_crop: torch.Tensor | None = None  # (N,) the tower input whose [CLS] is the image's
    lengths: torch.Tensor | None = None  # (N,) tokens of each image when they differ (P is the longest)
    image_index: torch.Tensor | None = None  # (N,) row of `image_output` each image comes from (beams repeat)
    layer_captures: dict = field(default_factory=dict)  # CLIP layer -> Captured (vision_attention_layers)
    cache: dict = field(default_factory=dict)

    def _from_crops(self, per_crop: torch.Tensor) -> torch.Tensor:
        """(C, p, ...) per-patch values of the tower inputs -> (N, P, ...) per image token (0 where -1)."""
        if self.source is None:
            return per_crop
        flat = per_crop.reshape(-1, *per_crop.shape[2:])
        index = self.source.clamp(min=0)
        values = flat[index]
        missing = (self.source < 0).reshape(*self.source.shape, *([1] * (values.ndim - 2)))
        return values.masked_fill(missing, 0)

    def subset(self, first: int, count: int, length: int) -> VisionSignals:
        """The signals of images first..first+count-1, cut to `length` tokens (images of different lengths
        are selected one at a time; the crops' tensors are shared)."""
        cut = slice(first, first + count)
        out = VisionSignals(
            adapter=self.adapter,
            hidden=self.hidden[cut, : 1 + length],
            projected=self.projected[cut, :length],
            image_sample=self.image_sample[cut],
            input_ids=self.input_ids,
            text_valid=self.text_valid,
            captured=self.captured,
            pixel_values=self.pixel_values,
            image_output=self.image_output,
            source=self.source[cut, :length] if self.source is not None else None,
            image_crop=self.image_crop[cut] if self.image_crop is not None else None,
            lengths=self.lengths[cut] if self.lengths is not None else None,
            image_index=self.image_index[cut] if self.image_index is not None else None,
            layer_captures=self.layer_captures,
        )
        if "qk" in self.__dict__:
            out.__dict__["qk"] = self.__dict__["qk"]
        return out

    def crop_rows(self, parts: list[tuple[int, int, torch.Tensor]], crop_hidden: torch.Tensor) -> VisionSignals:
        """Signals whose rows are parts of images: (image, tower input, its tokens in that image), all parts of
        one token count, each with its tower input's own [CLS] (`crop_hidden[crop, 0]`). LLaVA-NeXT methods that
        select inside each crop see every crop as an image."""
        images = torch.tensor([image for image, _, _ in parts], device=self.hidden.device)
        crops = torch.tensor([crop for _, crop, _ in parts], device=self.hidden.device)
        tokens = torch.stack([t for _, _, t in parts]).to(self.hidden.device)  # (R, n)
        out = VisionSignals(
            adapter=self.adapter,
            hidden=torch.cat([crop_hidden[crops, :1], self.hidden[images[:, None], 1 + tokens]], dim=1),
            projected=self.projected[images[:, None], tokens],
            image_sample=self.image_sample[images],
            input_ids=self.input_ids,
            text_valid=self.text_valid,
            captured=self.captured,
            pixel_values=self.pixel_values,
            image_output=self.image_output,
            source=self.source[images[:, None], tokens],
            image_crop=crops,
            image_index=self.image_index[images] if self.image_index is not None else None,
            layer_captures=self.layer_captures,
        )
        if "qk" in self.__dict__:
            out.__dict__["qk"] = self.__dict__["qk"]
        return out

    @cached_property
    def qk(self) -> Captured:
        """The feature layer's q/k: captured while the tower ran, else recomputed from its input."""
        if self.captured is not None:
            return self.captured
        if self.image_output is None:
            raise RuntimeError("the vision feature layer's attention is not available")
        return Captured(*self.adapter.recompute_vision_qk(self.image_output))

    @property
    def num_images(self) -> int:
        return self.hidden.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.adapter.grid

    @cached_property
    def features(self) -> torch.Tensor:
        """(N, P, Dv) the patch features the projector receives ([CLS] dropped, LLaVA's `default`)."""
        return self.hidden[:, 1:] if self.adapter.select_strategy == "default" else self.hidden

    @cached_property
    def cls_attention_heads(self) -> torch.Tensor:
        """(N, Hv, P) [CLS]-query attention of the feature layer to each patch, per head (float32).

        Softmax over all 1 + P keys, then the [CLS] column dropped, not renormalised (as the official
        VisPruner and VisionZip code read `attentions[-2][:, :, 0, 1:]`).
        A tower without [CLS] (Qwen-VL) gives its substitute instead: the attention each token receives in
        its last full-attention block (the adapter's `token_importance`, documented there).
        """
        if not self.adapter.has_cls:
            return self._from_crops(self.adapter.token_importance(self.image_output)[0].transpose(1, 2)).transpose(1, 2)
        qk = self.qk
        row0 = torch.zeros(qk.query.shape[0], 1, dtype=torch.long, device=self.hidden.device)
        probs = attention_rows(qk.query, qk.key, qk.scaling, row0, None, causal=False)
        per_crop = probs[:, :, 0, 1:]  # each tower input's own [CLS] over its own patches
        if self.source is None:
            return per_crop
        return self._from_crops(per_crop.transpose(1, 2)).transpose(1, 2)

    @cached_property
    def cls_attention(self) -> torch.Tensor:
        """(N, P) head-mean [CLS] attention."""
        return self.cls_attention_heads.mean(dim=1)

    @cached_property
    def keys(self) -> torch.Tensor:
        """(N, 1 + P, Hv * dh) key vectors of the feature layer (VisionZip's similarity metric)."""
        if not self.adapter.has_cls:  # per token: its 2 x 2 patches' mean key; slot 0 (no [CLS]) zero
            key = self._from_crops(self.adapter.token_importance(self.image_output)[1])
            return torch.cat([key.new_zeros(key.shape[0], 1, key.shape[-1]), key], dim=1)
        key = self.qk.key.float().transpose(1, 2).flatten(2)  # (C, 1 + p, Hv * dh)
        if self.source is None:
            return key
        return torch.cat([key[self.image_crop, :1], self._from_crops(key[:, 1:])], dim=1)

    def layer_qk(self, layer: int) -> Captured:
        """q/k of CLIP encoder layer `layer` (0-indexed): captured while the tower ran for the feature layer
        and for the layers the method names in `vision_attention_layers`, else recomputed once from the
        layer's input hidden state (available when vtprune ran the tower itself). Rows are the tower's inputs
        (the images on LLaVA-1.5, the crops on LLaVA-NeXT), as for `captured`."""
        if layer == self.adapter.feature_layer:
            return self.qk
        if layer in self.layer_captures:
            return self.layer_captures[layer]
        key = ("layer_qk", layer)
        if key not in self.cache:
            if self.image_output is None:
                raise RuntimeError(f"the hidden states of vision layer {layer} are not available")
            with torch.no_grad():
                q, k, scaling = self.adapter.recompute_vision_qk(self.image_output, layer)
            if self.image_index is not None:
                q, k = q[self.image_index], k[self.image_index]
            self.cache[key] = Captured(q, k, float(scaling))
        return self.cache[key]

    def received_attention(self, layer: int) -> torch.Tensor:
        """(N, T) attention each token of CLIP layer `layer` receives ([CLS] first, T = 1 + P): softmax over
        all keys per query row, then the mean over heads and over every query row ([CLS] row included) —
        HiPrune's "global attention". Computed once per layer from q/k (no eager attention), float32, a few
        heads at a time (`vtprune.signals.attention.received_attention`: the (N, H, T, T) probabilities are
        never held at once)."""
        key = ("received", layer)
        if key not in self.cache:
            qk = self.layer_qk(layer)
            self.cache[key] = received_attention(qk.query, qk.key, qk.scaling)
        return self.cache[key]

    def padding_fraction(self, tolerance: float = 0.03) -> torch.Tensor | None:
        """(N, P) the part of each patch that is pad-to-square filler, or None when the pixels are not at
        hand. The padding attention-sink debiasing (docs/methods/attention_options.md) thresholds it with its
        method's patch threshold (0.5; PDrop 0.01); with centre-crop preprocessing nothing is padding.

        The released patches (intcomp/attention-bias `generate_pad_mask` @ e75ebe7) compute this fraction
        from the original image size: LLaVA's `expand2square` pads the short side symmetrically, so padding
        is a band of whole pixel rows (or columns) at the border. The model does not see the image size, so
        the band is read from the pixels: the rows (columns) that are entirely the CLIP mean colour (~0 in
        every normalised channel) and touch the border. Filler-coloured pixels inside the picture are never
        padding, which matters for PDrop's 0.01 threshold (two such pixels would flag a patch)."""
        if self.pixel_values is None:
            return None
        if self.pixel_values.ndim != 4:  # Qwen-VL's flattened patches: images are resized, never padded
            return torch.zeros(self.projected.shape[:2], device=self.projected.device)
        near_mean = (self.pixel_values.float().abs() < tolerance).all(dim=1)  # (C, H, W) per tower input

        def border_band(lines: torch.Tensor) -> torch.Tensor:  # (C, L) filler lines -> those touching a border
            lines = lines.to(torch.uint8)
            from_start = lines.cumprod(dim=1)
            from_end = lines.flip(1).cumprod(dim=1).flip(1)
            return (from_start | from_end).bool()

        rows = border_band(near_mean.all(dim=2))
        cols = border_band(near_mean.all(dim=1))
        band = (rows[:, :, None] | cols[:, None, :]).float()[:, None]
        patch = self.adapter.config.vision_config.patch_size
        # per tower input (C, p), then per image token (N, P): LLaVA-NeXT's crops map through `source`
        return self._from_crops(torch.nn.functional.avg_pool2d(band, patch).flatten(1))

    def padding_mask(self, threshold: float = 0.5, tolerance: float = 0.03) -> torch.Tensor | None:
        """(N, P) True for patches whose padding fraction is above `threshold` (None without pixels)."""
        fraction = self.padding_fraction(tolerance)
        return None if fraction is None else fraction > threshold

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Push vision-width vectors through LLaVA's projector (for merged tokens)."""
        return self.adapter.project(features.to(self.hidden.dtype))

    def text_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L, D) LLM input embeddings of each image's prompt and (N, L) mask of its real text tokens."""
        embeds = self.adapter.embed(self.input_ids)
        return embeds[self.image_sample], self.text_valid[self.image_sample]


@dataclass(eq=False)
class ViTLayerSignals:
    """What a vit stage's `merge_vit` reads at one CLIP layer; rows are images, [CLS] first.

    Everything is computed lazily from the layer's own q/k/v (captured under SDPA), in float32; slots that
    are not `valid` (images that kept fewer patches than others at an earlier layer) are masked as keys.
    """

    layer: int
    captured: Captured  # the layer's attention inputs (CLIP has no RoPE), value included
    valid: torch.Tensor | None  # (N, T) real tokens; None: all
    state: dict  # shared by the merges of one tower forward (FlowCut's cumulative scores)

    @property
    def num_tokens(self) -> int:
        return self.captured.query.shape[2]

    def _key_mask(self) -> torch.Tensor | None:
        return None if self.valid is None else (~self.valid)[:, None, None, :]

    def _softmax(self, logits: torch.Tensor) -> torch.Tensor:
        mask = self._key_mask()
        if mask is not None:
            logits = logits.masked_fill(mask, float("-inf"))
        return torch.softmax(logits, dim=-1)

    @cached_property
    def received(self) -> torch.Tensor:
        """(N, T) attention each token receives: head mean, then the mean over every (valid) query row."""
        q, k = self.captured.query.float(), self.captured.key.float()
        probs = self._softmax(torch.matmul(q, k.transpose(-1, -2)) * self.captured.scaling)  # (N, H, T, T)
        per_row = probs.mean(dim=1)
        if self.valid is None:
            return per_row.mean(dim=1)
        weights = self.valid.float()[:, :, None]
        return (per_row * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    @cached_property
    def cls_attention_heads(self) -> torch.Tensor:
        """(N, H, T) the [CLS] query row's attention probabilities (softmax over all valid keys)."""
        q, k = self.captured.query[:, :, :1].float(), self.captured.key.float()
        return self._softmax(torch.matmul(q, k.transpose(-1, -2)) * self.captured.scaling)[:, :, 0]

    @cached_property
    def values(self) -> torch.Tensor:
        """(N, Hkv, T, dh) the layer's value states, float32."""
        if self.captured.value is None:
            raise RuntimeError("the value states of this vision layer were not captured")
        return self.captured.value.float()


@dataclass(eq=False)
class LLMSignals:
    """Signals at an LLM stage boundary; rows are samples."""

    adapter: ModelAdapter
    layer: int  # the prune layer (first layer that will see the pruned sequence)
    hidden: torch.Tensor  # (B, L, D) hidden states entering the prune layer
    key_valid: torch.Tensor  # (B, L) real tokens (no padding / holes)
    visual_index: torch.Tensor  # (B, V) sequence positions of the current visual tokens
    visual_valid: torch.Tensor  # (B, V)
    original_index: torch.Tensor  # (B, V) original visual-token numbering (-1: a created token)
    position_ids: torch.Tensor  # (B, L) positions the tokens currently have ((3, B, L) for M-RoPE models)
    images_per_sample: int
    input_embeds: torch.Tensor  # (B, L0, D) LLM input embeddings (after the vision stage)
    input_visual_index: torch.Tensor  # (B, V0) positions of the visual tokens in input_embeds
    input_valid: torch.Tensor  # (B, L0)
    captured: Captured | None = None  # the score layer's attention q/k (None when score == prune layer)
    vision: VisionSignals | None = None  # the vision tower's signals of the same prefill
    row_tokens_per_image: int | None = None  # set when images have different token counts (one sample)
    cache: dict = field(default_factory=dict)

    @property
    def num_visual(self) -> int:
        return self.visual_index.shape[1]

    @property
    def tokens_per_image(self) -> int:
        return self.row_tokens_per_image or self.adapter.tokens_per_image

    def row(self, sample: int, tokens_per_image: int) -> tuple[LLMSignals, torch.Tensor]:
        """The signals of one sample holding only its real visual tokens, and (V',) the index of each among
        the current visual tokens (samples whose images have different token counts select one at a time,
        each with its own budget; the image slots a shorter image left empty are not offered)."""
        cut = slice(sample, sample + 1)
        n = self.images_per_sample
        real = self.visual_valid[sample]
        order = torch.sort((~real).to(torch.int8), stable=True).indices[: int(real.sum())]
        captured = None
        if self.captured is not None:
            captured = Captured(self.captured.query[cut], self.captured.key[cut], self.captured.scaling)
        vision = None
        if self.vision is not None:
            vision = self.vision.subset(sample * n, n, self.vision.projected.shape[1])
        row = LLMSignals(
            adapter=self.adapter,
            layer=self.layer,
            hidden=self.hidden[cut],
            key_valid=self.key_valid[cut],
            visual_index=self.visual_index[cut, order],
            visual_valid=self.visual_valid[cut, order],
            original_index=self.original_index[cut, order],
            position_ids=self.position_ids[..., cut, :],  # (B, L) or M-RoPE's (3, B, L)
            images_per_sample=n,
            input_embeds=self.input_embeds[cut],
            input_visual_index=self.input_visual_index[cut],
            input_valid=self.input_valid[cut],
            captured=captured,
            vision=vision,
            row_tokens_per_image=tokens_per_image,
        )
        return row, order

    def is_full_visual_set(self) -> bool:
        """True while every original visual token is still present, in raster order of one grid per image
        (never for images of several crops: the raster-calibrated corrections do not apply to them)."""
        if self.adapter.variable_tokens:
            return False
        full = self.images_per_sample * self.tokens_per_image
        return self.num_visual == full and bool(
            (self.original_index == torch.arange(full, device=self.original_index.device)).all()
        )

    def per_original(self, values: torch.Tensor) -> torch.Tensor:
        """Map (N_images, P, ...) per-image values onto the current visual tokens: (B, V, ...)."""
        b = self.visual_index.shape[0]
        flat = values.reshape(b, self.images_per_sample * values.shape[1], *values.shape[2:])
        lengths = self.vision.lengths if self.vision is not None else None
        if lengths is not None:
            # A sample's original numbering runs over its images' real tokens, image after image.
            real = torch.arange(values.shape[1], device=values.device)[None] < lengths[:, None]
            order = torch.sort((~real).reshape(b, -1).to(torch.int8), dim=1, stable=True).indices
            flat = flat[torch.arange(b, device=order.device)[:, None], order]
        index = self.original_index.clamp(min=0)
        return flat[torch.arange(b, device=index.device)[:, None], index]

    def debias_context(self):
        """What the debiasing options (signals/debias.py) can use at this stage."""
        from vtprune.signals.debias import DebiasContext

        padding = cls_attention = None
        created = self.original_index < 0
        if self.vision is not None:
            pad = self.vision.padding_fraction()
            if pad is not None:
                padding = self.per_original(pad).masked_fill(created, 0.0)
            if self.vision.captured is not None or self.vision.image_output is not None:
                cls_attention = self.per_original(self.vision.cls_attention).masked_fill(created, 0.0)
        cfg = self.adapter.config.vision_config
        return DebiasContext(
            padding_fraction=padding,
            hidden=self.visual_hidden(),
            cls_attention=cls_attention,
            grid=self.adapter.grid,
            image_size=getattr(cfg, "image_size", None),  # Qwen-VL: dynamic resolution
        )

    def query_index(self, queries: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Q) sequence positions of the wanted query rows and (B, Q) validity; computed once per
        `queries` ("text" costs a host sync for its width unless `set_text_width` gave it)."""
        key = ("query_index", queries)
        if key not in self.cache:
            self.cache[key] = self._query_index(queries)
        return self.cache[key]

    def _query_index(self, queries: str) -> tuple[torch.Tensor, torch.Tensor]:
        b, length = self.key_valid.shape
        device = self.key_valid.device
        if queries == "last":
            # Left padding keeps the last position real for every sample.
            return torch.full((b, 1), length - 1, device=device), torch.ones(
                b, 1, dtype=torch.bool, device=device
            )
        if queries == "image":
            return self.visual_index, self.visual_valid
        positions = torch.arange(length, device=device).expand(b, length)
        if queries == "all":
            return positions, self.key_valid
        if queries == "text":
            after = self._text_rows()
            width = self.cache.get("text_width")
            if width is None:
                width = int(after.sum(dim=1).max())
            order = torch.sort((~after).to(torch.int8), dim=1, stable=True).indices[:, :width]
            return order, torch.gather(after, 1, order)
        raise ValueError(f"unknown query rows {queries!r}; valid: last, text, all, image")

    def _text_rows(self) -> torch.Tensor:
        """(B, L) the "text" query rows: every real token after the last visual token (the question, the
        instruction, "ASSISTANT:")."""
        if "text_rows" not in self.cache:
            b, length = self.key_valid.shape
            positions = torch.arange(length, device=self.key_valid.device).expand(b, length)
            last_visual = self.visual_index.max(dim=1).values
            self.cache["text_rows"] = (positions > last_visual[:, None]) & self.key_valid
        return self.cache["text_rows"]

    def text_counts(self) -> torch.Tensor:
        """(B,) the number of "text" query rows of each sample, on the device (no host sync)."""
        return self._text_rows().sum(dim=1)

    def set_text_width(self, width: int) -> None:
        """Give the width of the "text" rows, ``max(text_counts())``, known without reading the device: the
        engine gives it from its host copies of the prompt before each LLM stage, so `query_index("text")`
        needs no host sync of its own. Call it before the rows are used."""
        if ("query_index", "text") in self.cache:
            raise RuntimeError("the text rows were already built")
        self.cache["text_width"] = int(width)

    def attention(self, queries: str = "last") -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, Q, V) attention probabilities of the query rows to the current visual tokens, and (B, Q)
        row validity. Softmax over all keys the row can see; computed once per `queries`."""
        if queries not in self.cache:
            q_index, q_valid = self.query_index(queries)
            if self.captured is not None:
                cap = self.captured
                probs = attention_rows(cap.query, cap.key, cap.scaling, q_index, self.key_valid)
            else:  # only the wanted rows' queries are projected
                cap = self.recompute_qk(q_index)
                probs = attention_of_rows(cap.query, cap.key, cap.scaling, q_index, self.key_valid)
            vis = self.visual_index[:, None, None, :].expand(-1, probs.shape[1], probs.shape[2], -1)
            self.cache[queries] = (torch.gather(probs, 3, vis), q_valid)
        return self.cache[queries]

    def keys(self) -> torch.Tensor:
        """(B, L, Hkv * dh) post-RoPE key states of the score layer, float32, heads concatenated (DART's pivot
        norms): the captured ones, or the prune layer's own projections of its input when score == prune
        layer. No attention probabilities are formed, so nothing here needs eager attention."""
        if "keys" not in self.cache:
            cap = self.captured if self.captured is not None else self.recompute_qk()
            self.cache["keys"] = cap.key.float().transpose(1, 2).flatten(2)
        return self.cache["keys"]

    def normed_hidden(self) -> torch.Tensor:
        """(B, L, D) the hidden states entering the prune layer after the language model's output RMSNorm,
        float32 (DART's duplication metric)."""
        if "normed_hidden" not in self.cache:
            with torch.no_grad():
                self.cache["normed_hidden"] = self.adapter.final_norm(self.hidden).float()
        return self.cache["normed_hidden"]

    def recompute_qk(self, rows: torch.Tensor | None = None) -> Captured:
        """q/k of the prune layer applied to its unpruned input (PyramidDrop's scoring, docs/methods/pdrop.md).

        With `rows` (B, Q) sequence positions, the query holds only those rows, (B, H, Q, dh): the scores read
        a few query rows (the last token, the text) against every key, so the other rows' projection would be
        wasted. The keys are those of every token."""
        layer = self.adapter.layers[self.layer]
        attn = layer.self_attn
        normed = layer.input_layernorm(self.hidden)
        b, length, width = normed.shape
        k = attn.k_proj(normed).view(b, length, -1, attn.head_dim).transpose(1, 2)
        cos, sin = self.adapter.rotary(normed, self.position_ids)
        if rows is None:
            q = attn.q_proj(normed).view(b, length, -1, attn.head_dim).transpose(1, 2)
            q, k = self.adapter.apply_rotary(q, k, cos, sin)
            return Captured(q, k, attn.scaling)
        n_rows = rows.shape[1]
        picked = torch.gather(normed, 1, rows[:, :, None].expand(-1, -1, width))
        q = attn.q_proj(picked).view(b, n_rows, -1, attn.head_dim).transpose(1, 2)
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)  # (B, L, dh), one row per sample
        at_rows = rows[:, :, None].expand(-1, -1, cos.shape[-1])
        cos_q, sin_q = torch.gather(cos, 1, at_rows), torch.gather(sin, 1, at_rows)
        # The model's own RoPE rotates a query and a key at the same positions; the partner argument of each
        # call is one head wide, so nothing is rotated twice.
        q, _ = self.adapter.apply_rotary(q, q[:, :1], cos_q, sin_q)
        _, k = self.adapter.apply_rotary(k[:, :1], k, cos, sin)
        return Captured(q, k, attn.scaling)

    def visual_hidden(self) -> torch.Tensor:
        """(B, V, D) hidden states of the current visual tokens."""
        index = self.visual_index[:, :, None].expand(-1, -1, self.hidden.shape[-1])
        return torch.gather(self.hidden, 1, index)
