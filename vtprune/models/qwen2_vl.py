"""Adapters for Hugging Face `Qwen2VLForConditionalGeneration` and `Qwen2_5_VLForConditionalGeneration`
(Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct, ...).

How Qwen-VL differs from LLaVA, and what this adapter tells the engine and the signals:

* Dynamic resolution. An image is resized to a multiple of 28 px and cut into 14 px patches; the tower's
  `merger` fuses every 2 x 2 patches into one LLM token, so an image of grid (t, h, w) patches is
  t * h * w / 4 tokens (`image_grid_thw`), different for every image size. Each image (or video) is one
  "tower input" here: `token_sources` numbers its tokens in the LLM's order (frame, row, column).
* 3-D rotary positions (M-RoPE). The LLM gives every token a (temporal, height, width) position; text
  tokens have three equal components. `prompt_positions` returns the unpruned model's own (3, B, L)
  positions (`get_rope_index` on the full prompt); the engine gathers them at the kept tokens, so a kept
  image token keeps exactly the position it has in the unpruned model and the text after the image keeps
  its positions too. Decoding continues from the unpruned prompt's next position (its `rope_deltas`).
* No [CLS] token, and (Qwen2.5) windowed attention in most tower blocks. The [CLS]-attention signal is
  replaced by the attention each merged token receives in the tower's last full-attention block
  (`token_importance`): see that method for the rule and its source.
* Videos: `pixel_values_videos` / `video_grid_thw` take the place of the images (one prompt holds images or
  videos, not both); a video is pruned as one unit with the budget of its t * h * w / 4 tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from vtprune import compat
from vtprune.errors import PruneConfigError
from vtprune.models import register_adapter
from vtprune.models.base import ImageLayout, ModelAdapter, VisualInput, blocks_by_count

# The most tokens one image gets from the Qwen processors' default `max_pixels` (12,845,056 px = 16,384
# tokens of 28 x 28 px); only a default: every image is planned with its own count.
MAX_IMAGE_TOKENS = 16384
# Query rows per chunk when the importance signal is recomputed (keeps a 4,096-patch image under ~1 GB).
QUERY_CHUNK = 1024


class QwenVLAdapter(ModelAdapter):
    """Shared by Qwen2-VL and Qwen2.5-VL (same LLM, same positions; the towers differ in attention windows)."""

    variable_tokens = True
    has_cls = False  # no [CLS] token: VisionSignals asks `token_importance` instead
    mrope = True  # positions are (3, B, L)
    select_strategy = "default"  # VisionSignals.features = hidden[:, 1:] (slot 0 is an empty [CLS] slot)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.base = model.model
        self.language_model = self.base.language_model
        self.layers = self.language_model.layers
        self.vision_tower = self.base.visual
        self.vision_layers = self.vision_tower.blocks
        self.projector = self.vision_tower.merger
        self.image_token_id = self.config.image_token_id
        self.video_token_id = self.config.video_token_id
        vcfg = self.config.vision_config
        self.merge = vcfg.spatial_merge_size
        self.feature_layer = self._signal_block()
        self.feature_hidden_index = len(self.vision_layers)
        self.grid = (0, 0)  # no fixed patch grid: every image has its own (image_grid_thw)
        self.tokens_per_image = MAX_IMAGE_TOKENS

    def _signal_block(self) -> int:
        return len(self.vision_layers) - 1

    def vision_attention_module(self):
        """None: the Qwen tower's attention runs per window / per frame; vtprune recomputes what it reads
        from the signal block's input (`token_importance`), so nothing is captured."""
        return None

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) at (B, L) or (3, B, L) positions (2-D positions are the same on the three axes)."""
        return self.language_model.rotary_emb(hidden, position_ids)

    # --- visual inputs ----------------------------------------------------------------------------------
    def has_visual_input(self, call: dict) -> bool:
        outputs = call.get("mm_encoder_outputs") or {}
        return any(
            call.get(key) is not None for key in ("pixel_values", "pixel_values_videos")
        ) or any(outputs.get(key) is not None for key in ("image", "video"))

    def take_visual_input(self, call: dict) -> VisualInput:
        """Pop the images or the videos of a forward call and encode them (unless generate() did)."""
        outputs = call.pop("mm_encoder_outputs", None) or {}
        pixels = {m: call.pop(k, None) for m, k in (("image", "pixel_values"), ("video", "pixel_values_videos"))}
        grids = {m: call.pop(k, None) for m, k in (("image", "image_grid_thw"), ("video", "video_grid_thw"))}
        present = [m for m in ("image", "video") if pixels[m] is not None or outputs.get(m) is not None]
        if len(present) != 1:
            raise PruneConfigError(
                f"{self.family}: vtprune prunes the images or the videos of a prompt, not both in one call"
            )
        modality = present[0]
        out = outputs.get(modality)
        encoded_here = out is None
        grid = grids[modality]
        if out is None:
            if grid is None:
                raise PruneConfigError(f"{self.family} needs `{modality}_grid_thw` (the processor returns it)")
            encode = self.base.get_image_features if modality == "image" else self.base.get_video_features
            out = encode(pixels[modality], grid, return_dict=True)
        elif grid is None:  # generate() encoded the inputs and dropped their grids: the tower tagged them
            grid = getattr(out, "_vtprune_grid", None)
            if grid is None:
                raise PruneConfigError(
                    f"{self.family}: the {modality} features were computed before vtprune.prune() was applied"
                )
        out._vtprune_grid = grid
        rope_inputs = {
            f"{modality}_grid_thw": _grids_per_prompt(grid, len(out.pooler_output), call["input_ids"].shape[0]),
            "second_per_grid_ts": call.pop("second_per_grid_ts", None),
        }
        call.pop("mm_token_type_ids", None)  # rebuilt from input_ids (prompt_positions)
        return VisualInput(out, grid, encoded_here, modality, rope_inputs)

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self.image_token_id) | (input_ids == self.video_token_id)

    def image_tokens(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        is_visual = self.visual_token_mask(input_ids)
        per_sample = is_visual.sum(dim=1)
        if bool((per_sample == 0).any()):
            missing = torch.nonzero(per_sample == 0).flatten().tolist()
            raise PruneConfigError(
                f"sample(s) {missing} contain no image or video token; the prompt must hold the processor-expanded "
                "`<|image_pad|>` / `<|video_pad|>` placeholders"
            )
        return is_visual, per_sample

    def tokens_of(self, grid: torch.Tensor) -> torch.Tensor:
        """(N,) LLM tokens of each (t, h, w) patch grid."""
        return grid.prod(dim=-1) // (self.merge * self.merge)

    def token_sources(self, sizes: torch.Tensor) -> list[torch.Tensor]:
        """Image i's tokens are rows i * Pmax + j of the padded per-image tower output (`unpack_image_output`)."""
        counts = self.tokens_of(sizes).tolist()
        width = max(counts)
        return [torch.arange(count) + i * width for i, count in enumerate(counts)]

    def token_coordinates(self, grid) -> torch.Tensor:
        """(P, 3) (frame, row, column) of each LLM token of one (t, h, w) patch grid, in the LLM's order;
        frame counts temporal patches (2 video frames each), row and column merged tokens."""
        t, h, w = (int(v) for v in grid)
        h, w = h // self.merge, w // self.merge
        frame, row, col = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        return torch.stack([frame.flatten(), row.flatten(), col.flatten()], dim=1)

    def locate_images(self, input_ids: torch.Tensor, num_images: int, token_counts=None) -> ImageLayout:
        """Each sample's image (or video) token blocks; image i, in the processor's order, expands to `token_counts[i]`
        consecutive tokens."""
        is_visual, per_sample = self.image_tokens(input_ids)
        return blocks_by_count(is_visual, per_sample, num_images, token_counts, what="image/video")

    # --- positions (M-RoPE) -----------------------------------------------------------------------------
    def prompt_positions(self, input_ids: torch.Tensor, mask2d, visual: VisualInput) -> torch.Tensor:
        """(3, B, L) the unpruned model's rotary positions of the full prompt (its own `get_rope_index`)."""
        token_type = torch.zeros_like(input_ids)
        token_type[input_ids == self.image_token_id] = 1
        token_type[input_ids == self.video_token_id] = 2
        kwargs = {k: v for k, v in visual.rope_inputs.items() if v is not None}
        positions, _ = self.base.get_rope_index(
            input_ids, mm_token_type_ids=token_type, attention_mask=mask2d, **kwargs
        )
        return positions

    # --- vision features --------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None, **kwargs):
        """The tower's output for images, tapped so `token_importance` can be computed (analysis tools)."""
        if image_grid_thw is None:
            raise PruneConfigError(f"{self.family} needs `image_grid_thw` (the processor returns it)")
        tap = _BlockInputTap(self.vision_tower, self.vision_layers[self.feature_layer])
        try:
            out = self.base.get_image_features(pixel_values, image_grid_thw, return_dict=True, **kwargs)
        finally:
            tap.remove()
        out._vtprune_grid = image_grid_thw
        return out

    def first_frame(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """(3, H, W) the first frame of the first image (or video) from the tower's flattened patches: the
        inverse of the Qwen-VL processors' patch layout (temporal patch, merge unit, channel, pixel)."""
        vcfg = self.config.vision_config
        t, h, w = (int(v) for v in grid)
        p, tp, m = vcfg.patch_size, vcfg.temporal_patch_size, self.merge
        x = pixel_values[: t * h * w].reshape(t, h // m, w // m, m, m, -1, tp, p, p)
        x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # (t, tp, C, h/m, m, p, w/m, m, p)
        return x.reshape(t * tp, -1, h * p, w * p)[0]

    def _unit_order(self, grid: torch.Tensor) -> torch.Tensor | None:
        """For each merged token in raster order, its 2 x 2 unit's place in the tower's sequence (Qwen2.5
        reorders patches by attention window), or None when the tower keeps raster order."""
        return None

    def _per_token(self, tower_rows: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
        """Tower-sequence rows (S, ...) -> per image (P_i, 4, ...) in the LLM's token order."""
        unit = self.merge * self.merge
        rows = tower_rows.reshape(-1, unit, *tower_rows.shape[1:])
        order = self._unit_order(grid)
        if order is not None:
            rows = rows[order.to(rows.device)]
        return list(torch.split(rows, self.tokens_of(grid).tolist()))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The merger's MLP: `features` are merger inputs (4 normalised patch states, concatenated)."""
        return self.projector.mlp(features)

    def unpack_image_output(self, out) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(per image (N, 1 + Pmax, 4 * Dv): slot 0 empty (no [CLS]), then each token's vision feature = what
        the merger's MLP receives for it (its 2 x 2 patches' last-block states, normalised by the merger's
        `ln_q`, concatenated), so `project(feature)` is exactly the token the LLM gets and merged features
        project as VisionZip's do on LLaVA; the projected tokens of each image, a list of (P_i, D))."""
        grid = out._vtprune_grid
        normed = self.projector.ln_q(out.last_hidden_state)
        per_image = [rows.flatten(1) for rows in self._per_token(normed, grid)]
        hidden = torch.nn.utils.rnn.pad_sequence(per_image, batch_first=True)
        hidden = torch.cat([hidden.new_zeros(hidden.shape[0], 1, hidden.shape[-1]), hidden], dim=1)
        return hidden, list(out.pooler_output)

    def recompute_vision_qk(self, out, layer_index: int | None = None):
        raise PruneConfigError(
            f"{self.family}: the vision tower has no [CLS] token and windowed attention; methods read "
            "`VisionSignals.cls_attention` (the received-attention substitute) instead of per-layer q/k"
        )

    def session_hooks(self) -> list:
        """A tap on the tower: the signal block's input, so the importance signal can be recomputed under SDPA
        even when generate() encodes the images before the first forward, and the grids."""
        return [_BlockInputTap(self.vision_tower, self.vision_layers[self.feature_layer])]

    def token_importance(self, out) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H, Pmax) per-head attention each merged token receives in the signal block, and (N, Pmax, H * dh)
        its keys (mean over its 2 x 2 patches), both float32, images padded to the longest; cached on `out`.

        The rule (Qwen has no [CLS] to read): the attention a patch receives, averaged over every query patch
        of its image (softmax over the image's patches, per frame for videos) and over heads, in the tower's
        last full-attention block (Qwen2.5-VL: the last of `fullatt_block_indexes`, the tower's last block in
        the released checkpoints; Qwen2-VL: every block is full, the last one), then averaged over the 2 x 2
        patches of each merged token. Sources: none of VisPruner, VisionZip or PruMerge has an official Qwen
        port (dvlab-research/VisionZip holds only the LLaVA path); the attention a token receives, averaged
        over all queries, is the [CLS]-free importance HiPrune calls "global attention" (vtprune's
        `VisionSignals.received_attention` on CLIP towers). One third-party Qwen2-VL VisionZip port instead reads patch 0's
        attention row of the second-to-last block as if patch 0 were a [CLS]; vtprune does not, since patch 0
        is an ordinary corner patch. q/k are recomputed from the block's input with the block's own
        projections and vision RoPE, so nothing runs in eager attention."""
        cached = getattr(out, "_vtprune_importance", None)
        if cached is not None:
            return cached
        tap = getattr(out, "_vtprune_block_input", None)
        if tap is None:
            raise PruneConfigError(
                f"{self.family}: the vision tower ran before vtprune.prune() was applied; pass pixel_values"
            )
        hidden, (cos, sin), cu_seqlens = tap
        block = self.vision_layers[self.feature_layer]
        attn = block.attn
        apply_rope = compat.model_file_function(attn, "apply_rotary_pos_emb_vision")
        with torch.no_grad():
            x = block.norm1(hidden)
            length = x.shape[0]
            q, k, _ = attn.qkv(x).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rope(q, k, cos, sin)
            q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # (H, S, dh)
            received = torch.zeros(k.shape[0], length, device=k.device)
            bounds = cu_seqlens.tolist()
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                keys = k[:, start:end]
                for first in range(start, end, QUERY_CHUNK):
                    last = min(end, first + QUERY_CHUNK)
                    probs = torch.softmax(q[:, first:last] @ keys.transpose(1, 2) * attn.scaling, dim=-1)
                    received[:, start:end] += probs.sum(dim=1)
                received[:, start:end] /= end - start
        grid = out._vtprune_grid
        per_head = [rows.mean(dim=1).T for rows in self._per_token(received.T, grid)]  # (H, P_i)
        keys = [rows.mean(dim=1).flatten(1) for rows in self._per_token(k.transpose(0, 1), grid)]  # (P_i, H*dh)
        importance = torch.nn.utils.rnn.pad_sequence([h.T for h in per_head], batch_first=True).transpose(1, 2)
        result = (importance, torch.nn.utils.rnn.pad_sequence(keys, batch_first=True))
        out._vtprune_importance = result
        return result


@register_adapter
class Qwen2VLAdapter(QwenVLAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    model_classes = ("Qwen2VLForConditionalGeneration",)


@register_adapter
class Qwen25VLAdapter(QwenVLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)

    def _signal_block(self) -> int:
        return max(self.config.vision_config.fullatt_block_indexes)

    def _unit_order(self, grid: torch.Tensor) -> torch.Tensor:
        vcfg = self.config.vision_config
        window_index, _ = compat.qwen_window_index(grid, self.merge, vcfg.window_size, vcfg.patch_size)
        return torch.argsort(window_index)


def _grids_per_prompt(grid: torch.Tensor, count: int, batch: int) -> torch.Tensor:
    """The grid of every image block of the prompts: generate() encodes each sample's images once and then
    repeats them for beams / num_return_sequences ([A1 A2, B1 B2] -> [A1 A2, A1 A2, B1 B2, B1 B2])."""
    if count == len(grid):
        return grid
    per_sample, repeat = count // batch, count // len(grid)
    j = torch.arange(count, device=grid.device)
    return grid[(j // (per_sample * repeat)) * per_sample + j % per_sample]


class _BlockInputTap:
    """Keeps the input (hidden states, vision RoPE, attention segments) of one tower block and attaches it
    to the tower's output as `_vtprune_block_input`, with the patch grids as `_vtprune_grid` (generate()
    encodes the images first and then drops `image_grid_thw`)."""

    def __init__(self, tower: nn.Module, block: nn.Module):
        self.pending = None

        def keep_input(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.pending = (hidden.detach(), kwargs["position_embeddings"], kwargs["cu_seqlens"])

        def tag_output(module, args, kwargs, output):
            output._vtprune_block_input = self.pending
            output._vtprune_grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
            self.pending = None

        self.handles = [
            block.register_forward_pre_hook(keep_input, with_kwargs=True),
            tower.register_forward_hook(tag_output, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def image_only_processor_class(processor_cls: type) -> type:
    """`processor_cls` (Qwen2VLProcessor, Qwen2_5_VLProcessor) accepting no video processor: transformers'
    video processors need torchvision, which vtprune does not require; images still go through the real
    Qwen image processor and token expansion."""

    class ImageOnly(processor_cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = processor_cls.__name__
    return ImageOnly


def load_image_only_processor(path: str, revision: str | None = None):
    """The processor of a Qwen-VL checkpoint without its video processor (when torchvision is missing)."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model_type = AutoConfig.from_pretrained(path, revision=revision).model_type
    name = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[model_type]
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    # The PIL image processor: AutoImageProcessor picks the torchvision one in transformers 5.17 (and fails
    # without it); both read the same preprocessor_config.json.
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, revision=revision)
    return image_only_processor_class(getattr(transformers, name))(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
        chat_template=tokenizer.chat_template or _chat_template_file(path),
    )


def _chat_template_file(path: str) -> str | None:
    from pathlib import Path

    file = Path(path) / "chat_template.jinja"
    return file.read_text() if file.exists() else None
