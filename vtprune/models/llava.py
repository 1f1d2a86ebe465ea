"""Adapter for Hugging Face `LlavaForConditionalGeneration` (llava-hf/llava-1.5-7b-hf, -13b).

Everything model-specific lives here: where the decoder layers, the rotary embedding, the vision tower and
the projector are; where each sample's image tokens are (from `input_ids == image_token_id`, never a fixed
offset, so any chat template works); and how the vision features LLaVA feeds the LLM are computed.
"""

from __future__ import annotations

import torch
from torch import nn

from vtprune import compat
from vtprune.errors import PruneConfigError
from vtprune.models import register_adapter
from vtprune.models.base import ImageLayout, ModelAdapter, find_layers


@register_adapter
class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_types = ("llava",)
    model_classes = ("LlavaForConditionalGeneration",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.base = model.model  # LlavaModel
        self.language_model = self.base.language_model
        self.layers = self.language_model.layers
        self.vision_tower = self.base.vision_tower
        self.vision_layers = find_layers(self.vision_tower, "encoder.layers")
        self.projector = self.base.multi_modal_projector
        self.image_token_id = self.config.image_token_id
        feature_layer = self.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise PruneConfigError("vtprune supports a single int `vision_feature_layer` (LLaVA-1.5 uses -2)")
        self.feature_hidden_index = feature_layer % (len(self.vision_layers) + 1)
        # hidden_states[i] is the output of encoder layer i-1: the layer whose attention made the features.
        self.feature_layer = self.feature_hidden_index - 1
        self.select_strategy = self.config.vision_feature_select_strategy
        vcfg = self.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        self.grid = (side, side)
        self.tokens_per_image = side * side + (1 if self.select_strategy == "full" else 0)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self.language_model.rotary_emb(hidden, position_ids=position_ids)

    # --- image tokens ---------------------------------------------------------------------------------
    def locate_images(self, input_ids: torch.Tensor, num_images: int, token_counts=None) -> ImageLayout:
        """Find each sample's image-token blocks and check them against the number of images given."""
        is_image, per_sample = self.image_tokens(input_ids)
        batch = input_ids.shape[0]
        # Adjacent images form one run of image tokens: cut runs into blocks of tokens_per_image.
        p = self.tokens_per_image
        rank = torch.cumsum(is_image, dim=1) - 1
        previous = torch.nn.functional.pad(is_image[:, :-1], (1, 0), value=False)
        run_start = is_image & ~previous
        block_start = is_image & (rank % p == 0)
        bad_runs = bool((run_start & ~block_start).any()) or bool((per_sample % p != 0).any())
        blocks = per_sample // p
        if bad_runs:
            raise PruneConfigError(
                f"each image must expand to {p} consecutive image tokens, found {per_sample.tolist()} image tokens "
                "per sample (was the prompt built by the model's processor?)"
            )
        if bool((blocks != blocks[0]).any()) or num_images != int(blocks.sum()):
            raise PruneConfigError(
                f"{num_images} image(s) were given but the prompts hold {blocks.tolist()} image-token blocks "
                "per sample; every sample of a batch needs the same number of images"
            )
        starts = torch.nonzero(block_start)[:, 1].view(batch, int(blocks[0]))
        return ImageLayout(starts=starts, lengths=torch.full_like(starts, p))

    # --- vision features --------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, **kwargs):
        """Run the vision tower once through the model's own `get_image_features`, so the features equal
        what the unmodified model feeds its LLM. Returns the tower's output (with `pooler_output` = the
        projected features per image), the same object `generate()` pre-computes as `mm_encoder_outputs`."""
        return self.base.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.select_strategy,
            output_hidden_states=True,
            return_dict=True,
            **kwargs,
        )

    def unpack_image_output(self, out) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states of the feature layer incl. [CLS], projected features (N, P, D))."""
        if out.hidden_states is None:
            raise PruneConfigError("the vision tower output has no hidden states; vtprune needs them")
        return out.hidden_states[self.feature_hidden_index], compat.projected_image_features(out)
