"""Adapter for Hugging Face `LlavaNextForConditionalGeneration` (LLaVA-1.6: llava-hf/llava-v1.6-vicuna-7b-hf,
-vicuna-13b-hf, -mistral-7b-hf).

AnyRes: an image is resized to the best of the config's `image_grid_pinpoints` and cut into nh x nw tiles of
the tower's resolution; the tower sees the whole image resized (the "base view") and every tile. The LLM
receives the base view's p = 24 x 24 tokens, then the tiles' patches as one (nh * 24) x (nw * 24) grid,
unpadded (the rows or columns that only cover the letterbox are dropped) with one `image_newline` token
after each row. So the number of visual tokens differs per image (1,752 for a 600 x 300 image, 2,448 for
400 x 500 with the 7B pinpoints). This adapter says, for every one of an image's tokens, which tower input
("crop": 0 = base view, 1.. = tiles in row-major order) and which patch it comes from, or that it is an
`image_newline` (`token_sources`); the engine and the signals do the rest with no NeXT-specific code.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from vtprune import compat
from vtprune.errors import PruneConfigError
from vtprune.models import register_adapter
from vtprune.models.base import ImageLayout, blocks_by_count
from vtprune.models.llava import LlavaAdapter


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT has LLaVA-1.5's modules (CLIP tower, projector, Llama/Mistral LLM) plus `image_newline`; what
    differs is how an image becomes tokens."""

    family = "llava_next"
    model_types = ("llava_next",)
    model_classes = ("LlavaNextForConditionalGeneration",)
    variable_tokens = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if self.select_strategy != "default":
            raise PruneConfigError("vtprune supports LLaVA-NeXT with vision_feature_select_strategy='default'")
        self.crop_size = self.config.vision_config.image_size
        side = self.grid[0]
        self.patches_per_crop = side * side
        self.pinpoints = [tuple(p) for p in self.config.image_grid_pinpoints]
        # The most tokens an image can have: the base view, the largest tile grid, a newline per row.
        largest = max((h // self.crop_size) * (w // self.crop_size) * side * side + (h // self.crop_size) * side
                      for h, w in self.pinpoints)
        self.tokens_per_image = self.patches_per_crop + largest

    def session_hooks(self) -> list:
        """`generate()` encodes the images before the first forward and drops `image_sizes`, which say how
        each image was tiled: the model's `get_image_features` is wrapped (on this instance, until the
        session ends) to tag its output with them."""
        return [_TagImageSizes(self.base)]

    # --- where each image token comes from --------------------------------------------------------------
    def _model_file(self, name: str):
        return compat.model_file_function(self.base, name)

    def crops_of(self, image_size) -> int:
        """Tower inputs (base view + tiles) of an image of size (height, width)."""
        return self._model_file("image_size_to_num_patches")(
            image_size=image_size, grid_pinpoints=self.config.image_grid_pinpoints, patch_size=self.crop_size
        )

    def tile_grid(self, image_size) -> tuple[int, int]:
        """(rows, cols) of the tiles an image of size (height, width) is cut into."""
        nh, nw = self._model_file("get_anyres_image_grid_shape")(
            tuple(int(v) for v in image_size), self.config.image_grid_pinpoints, self.crop_size
        )
        return int(nh), int(nw)

    def token_sources(self, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """For each image, (P_i,) long: crop * p + patch of each of its tokens in the order the LLM receives
        them, -1 for `image_newline`; crops are numbered over the whole batch, in the tower's order.

        The tile grid is unpadded with the model file's own `unpad_image`, applied to the grid of indices."""
        side = self.grid[0]
        p = self.patches_per_crop
        sources, first_crop = [], 0
        for size in image_sizes.tolist():
            size = tuple(int(v) for v in size)
            crops = self.crops_of(size)
            base = torch.arange(p) + first_crop * p
            if crops == 1:  # no tiles: the base view and one newline (as LlavaNextModel.pack_image_features)
                sources.append(torch.cat([base, torch.tensor([-1])]))
                first_crop += 1
                continue
            nh, nw = self.tile_grid(size)
            rows = torch.arange(nh * side)[:, None]
            cols = torch.arange(nw * side)[None, :]
            tile = 1 + (rows // side) * nw + cols // side
            index = (first_crop + tile) * p + (rows % side) * side + cols % side
            kept = self._model_file("unpad_image")(index[None].double(), torch.tensor(size))[0].long()
            with_newline = torch.cat([kept, torch.full((kept.shape[0], 1), -1)], dim=1)
            sources.append(torch.cat([base, with_newline.flatten()]))
            first_crop += crops
        return sources

    # --- image tokens ---------------------------------------------------------------------------------
    def locate_images(self, input_ids: torch.Tensor, num_images: int, token_counts=None) -> ImageLayout:
        """Each sample's image token blocks; image i, in the processor's order, expands to `token_counts[i]`
        consecutive tokens."""
        is_visual, per_sample = self.image_tokens(input_ids)
        return blocks_by_count(is_visual, per_sample, num_images, token_counts, what="image")

    # --- vision features --------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None, **kwargs):
        if image_sizes is None:
            raise PruneConfigError("LLaVA-NeXT needs `image_sizes` (the processor returns them)")
        return super().encode_images(pixel_values, image_sizes=image_sizes, **kwargs)

    def unpack_image_output(self, out) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(feature-layer hidden states of every tower input (C, 1 + p, Dv), the projected tokens of each
        image: a list of (P_i, D))."""
        if out.hidden_states is None:
            raise PruneConfigError("the vision tower output has no hidden states; vtprune needs them")
        return out.hidden_states[self.feature_hidden_index], list(out.pooler_output)


class _TagImageSizes:
    """Wraps `get_image_features` of one model instance so its output carries `_vtprune_image_sizes`."""

    def __init__(self, base: nn.Module):
        self.base = base
        original = base.get_image_features
        signature = inspect.signature(original)

        @functools.wraps(original)
        def tagged(*args, **kwargs):
            out = original(*args, **kwargs)
            out._vtprune_image_sizes = signature.bind(*args, **kwargs).arguments.get("image_sizes")
            return out

        base.get_image_features = tagged

    def remove(self) -> None:
        self.base.__dict__.pop("get_image_features", None)
