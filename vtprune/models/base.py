"""The model-adapter protocol: everything the engine, the signals and the methods may ask of a model.

A model family (LLaVA-1.5, LLaVA-NeXT, ...) is one `ModelAdapter` subclass in one file of `vtprune/models/`,
registered for the `config.model_type` values it serves (`@register_adapter`), as transformers maps model
types to classes. The engine and the signals never import a model class: they hold an adapter. Methods see
`ModelInfo` when they plan and the adapter only through their signals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from vtprune import compat
from vtprune.errors import PruneConfigError


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know about the model when it plans its stages."""

    num_layers: int  # LLM decoder layers
    num_heads: int
    visual_tokens: int  # per image (the most an image can have when `variable_tokens`)
    grid: tuple[int, int]  # patch grid of one crop (rows, cols)
    vision_layers: int
    vision_heads: int
    variable_tokens: bool = False  # images have different token counts (LLaVA-NeXT AnyRes)
    family: str = "llava"  # the adapter's family name, for messages
    vision_feature_layer: int | None = None  # vision layer (0-indexed) whose output is projected (22 of 24)


@dataclass
class VisualInput:
    """One forward call's visual inputs, as the engine needs them (`ModelAdapter.take_visual_input`)."""

    output: object  # the tower's output (`get_image_features`, or what generate() computed before the call)
    sizes: torch.Tensor | None  # per image: (height, width) in pixels (LLaVA-NeXT) or its (t, h, w) patch grid
    encoded_here: bool  # the tower ran in this call (not in generate() before it)
    modality: str = "image"  # "image" or "video"
    rope_inputs: dict = field(default_factory=dict)  # M-RoPE models: what their position rule needs


@dataclass
class ImageLayout:
    """Where the image-token blocks sit in each sample of a batch: block j of sample b starts at
    `starts[b, j]` and holds `lengths[b, j]` consecutive image tokens."""

    starts: torch.Tensor  # (B, n) sequence index of each block's first token
    lengths: torch.Tensor  # (B, n) image tokens of each block

    @property
    def images_per_sample(self) -> int:
        return self.starts.shape[1]

    @property
    def uniform(self) -> bool:
        return bool((self.lengths == self.lengths.flatten()[0]).all())


def blocks_by_count(
    is_visual: torch.Tensor, per_sample: torch.Tensor, num_images: int, token_counts, what: str = "image"
) -> ImageLayout:
    """Each sample's visual-token blocks when image i (in the processor's order, sample by sample) expands to
    `token_counts[i]` consecutive tokens of the (B, L) mask `is_visual` (families whose images differ in token
    count). `what` names the inputs in messages ("image", "image/video")."""
    batch = is_visual.shape[0]
    counts = torch.as_tensor(token_counts, device=is_visual.device).long()
    if num_images % batch:
        raise PruneConfigError(
            f"{num_images} image(s) for {batch} prompt(s); every sample of a batch needs the same number of images"
        )
    lengths = counts.view(batch, num_images // batch)
    if not torch.equal(lengths.sum(dim=1), per_sample):
        raise PruneConfigError(
            f"the prompts hold {per_sample.tolist()} {what} tokens per sample but the inputs expand to "
            f"{lengths.sum(dim=1).tolist()} (was the prompt built by the model's processor, with these inputs?)"
        )
    positions = [torch.nonzero(is_visual[b]).flatten() for b in range(batch)]
    offsets = torch.cumsum(lengths, dim=1) - lengths
    starts = torch.stack([positions[b][offsets[b]] for b in range(batch)])
    ends = torch.stack([positions[b][offsets[b] + lengths[b] - 1] for b in range(batch)])
    if bool((ends - starts + 1 != lengths).any()):
        raise PruneConfigError(f"each {what}'s tokens must be consecutive in the prompt")
    return ImageLayout(starts=starts, lengths=lengths)


def find_layers(root: nn.Module, suffix: str) -> nn.ModuleList:
    """The first ModuleList whose qualified name is or ends with `suffix` (e.g. "encoder.layers")."""
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and (name == suffix or name.endswith("." + suffix)):
            return module
    raise PruneConfigError(f"could not find `{suffix}` inside {type(root).__name__}")


class ModelAdapter:
    """Base class of the adapters. Subclasses set the modules in `__init__` and implement the methods below.

    Facts: `config`, `language_model` (the decoder stack: `layers`, `norm`), `layers` (the LLM's decoder
    layers), `vision_tower`, `vision_layers` (its encoder layers), `projector`, `image_token_id`, `grid`
    (patches per crop side), `tokens_per_image`,
    `feature_layer` (the vision layer whose output the projector receives), `select_strategy`.
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()  # `config.model_type` values served
    model_classes: ClassVar[tuple[str, ...]] = ()  # class names accepted (the ones with a generation head)

    model: nn.Module
    config: object
    language_model: nn.Module
    layers: nn.ModuleList
    vision_tower: nn.Module
    vision_layers: nn.ModuleList
    projector: nn.Module
    image_token_id: int
    grid: tuple[int, int]
    tokens_per_image: int
    feature_layer: int
    feature_hidden_index: int
    select_strategy: str
    variable_tokens: ClassVar[bool] = False
    has_cls: ClassVar[bool] = True  # the tower has a [CLS] token (else `token_importance` replaces its attention)
    mrope: ClassVar[bool] = False  # (3, B, L) rotary positions: `prompt_positions` gives the unpruned ones

    def __init__(self, model: nn.Module):
        if self.model_classes and type(model).__name__ not in self.model_classes:
            raise PruneConfigError(
                f"unsupported model class {type(model).__name__} for the {self.family} family; "
                f"supported: {', '.join(self.model_classes)}"
            )
        self.model = model
        self.config = model.config

    # --- facts ----------------------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        tcfg = self.config.text_config
        return ModelInfo(
            num_layers=len(self.layers),
            num_heads=tcfg.num_attention_heads,
            visual_tokens=self.tokens_per_image,
            grid=self.grid,
            vision_layers=len(self.vision_layers),
            vision_heads=self.config.vision_config.num_attention_heads,
            variable_tokens=self.variable_tokens,
            family=self.family,
            vision_feature_layer=self.feature_layer,
        )

    @property
    def attn_implementation(self) -> str:
        return compat.attention_implementation(self.config.text_config)

    def vision_attention_module(self) -> nn.Module:
        """The attention of the vision layer whose output the projector receives ([CLS] attention)."""
        return self.vision_layers[self.feature_layer].self_attn

    # --- the language model -----------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) of the LLM's rotary embedding at `position_ids`."""
        raise NotImplementedError

    def apply_rotary(self, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The language model's own RoPE application (its model file's `apply_rotary_pos_emb`)."""
        return compat.model_file_function(self.layers[0].self_attn, "apply_rotary_pos_emb")(query, key, cos, sin)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The language model's output norm (DART compares hidden states after it)."""
        return self.language_model.norm(hidden)

    # --- the vision side ----------------------------------------------------------------------------------
    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)

    def has_visual_input(self, call: dict) -> bool:
        """Whether a forward call carries images (pixels, or the tower output generate() computed)."""
        return call.get("pixel_values") is not None or compat.precomputed_image_output(call) is not None

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) the prompt's image (or video) placeholder tokens."""
        return input_ids == self.image_token_id

    def take_visual_input(self, call: dict) -> VisualInput:
        """Pop a forward call's images and run the tower once on them (unless generate() already did)."""
        pixel_values = call.pop("pixel_values", None)
        image_out = compat.precomputed_image_output(call)
        image_sizes = call.pop("image_sizes", None)
        if image_out is None:
            extra = {"image_sizes": image_sizes} if image_sizes is not None else {}
            image_out = self.encode_images(pixel_values, **extra)
        elif image_sizes is None:  # generate() encoded the images and dropped their sizes
            image_sizes = getattr(image_out, "_vtprune_image_sizes", None)
        call.pop("mm_encoder_outputs", None)
        return VisualInput(image_out, image_sizes, encoded_here=pixel_values is not None)

    def token_coordinates(self, size) -> torch.Tensor | None:
        """(P, 3) (frame, row, column) of each token of one image of `size`, where the family defines them
        (the record's `kept_coordinates`); None otherwise."""
        return None

    def prompt_positions(self, input_ids: torch.Tensor, mask2d, visual: VisualInput) -> torch.Tensor:
        """M-RoPE models (`mrope`): the unpruned model's (3, B, L) rotary positions of the full prompt."""
        raise NotImplementedError(f"{self.family} has 1-D positions")

    def image_tokens(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) image-token mask and (B,) image tokens per sample; every sample must hold some."""
        is_image = input_ids == self.image_token_id
        per_sample = is_image.sum(dim=1)
        if bool((per_sample == 0).any()):
            missing = torch.nonzero(per_sample == 0).flatten().tolist()
            raise PruneConfigError(
                f"sample(s) {missing} contain no image token (id {self.image_token_id}); the prompt must hold "
                "the processor-expanded `<image>` placeholder"
            )
        return is_image, per_sample

    def locate_images(self, input_ids: torch.Tensor, num_images: int, token_counts=None) -> ImageLayout:
        """Each sample's image-token blocks, checked against the images given (`token_counts[i]`: the
        tokens image i expands to, when they vary)."""
        raise NotImplementedError

    def encode_images(self, pixel_values: torch.Tensor, **kwargs):
        """Run the vision tower once through the model's own `get_image_features` (the features then equal
        what the unmodified model feeds its LLM); returns that output."""
        raise NotImplementedError

    def unpack_image_output(self, out) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
        """(feature-layer hidden states incl. [CLS] of every tower input (C, 1 + p, Dv), the projected tokens
        of the images: (N, P, D), or a list of (P_i, D) when their counts differ)."""
        raise NotImplementedError

    def session_hooks(self) -> list:
        """Hooks a pruning session needs on this model beyond the engine's own (each has `remove()`)."""
        return []

    def token_sources(self, image_sizes) -> list[torch.Tensor] | None:
        """Where each image token comes from when an image is several tower inputs (see
        `VisionSignals.source`); None when each image is one tower input whose patches are its tokens."""
        return None

    def recompute_vision_qk(self, out, layer_index: int | None = None):
        """q/k of vision layer `layer_index` (default: the feature layer) from its input hidden state, for
        tower outputs vtprune did not see computed (e.g. image features expanded by `generate` for beams) and
        for layers whose attention is not captured. Costs two projections of one layer of the (CLIP) tower."""
        index = self.feature_layer if layer_index is None else layer_index
        layer = self.vision_layers[index]
        attn = layer.self_attn
        hidden_states = getattr(out, "hidden_states", None)
        layer_input = hidden_states[index] if hidden_states is not None else None
        if layer_input is None:
            raise PruneConfigError(
                "the vision tower's attention is needed but was not captured and cannot be recomputed "
                "(the image features were computed before vtprune.prune() was applied)"
            )
        h = layer.layer_norm1(layer_input)
        n, length, _ = h.shape
        q = attn.q_proj(h).view(n, length, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(n, length, -1, attn.head_dim).transpose(1, 2)
        return q, k, attn.scale
