"""Theoretical FLOPs, KV-cache bytes and roofline floors for LLaVA-style models.

Everything here is arithmetic on an architecture description (`ArchSpec`); no model is built and no weights
are read, so the numbers are available for any method and budget before (or without) a GPU run.

Two FLOPs conventions are reported side by side, because the papers and physics disagree
(the FastV and SparseVLM papers count differently from the hardware):

* **True FLOPs** (`prefill_flops`, `decode_flops`): 2 FLOPs per multiply-add; q/k/v/o projections sized
  for grouped-query attention; SwiGLU with its three matrices; causal attention counted over the causal
  half only (query i sees i+1 keys); the LM head for the last position only (what `generate` computes
  with `logits_to_keep`); the CLIP tower and projector reported separately. Norms, RoPE, softmax and
  activations are left out: together they are below 0.1% at LLaVA-1.5 sizes.
* **Paper-convention "FLOPs"** (`fastv_convention_flops`, `sparsevlm_convention_flops`): FastV's
  per-layer 4nd² + 2n²d + 2ndm (really MACs, full n×n attention, two FFN matrices), and SparseVLM's
  3ndm variant. They exist only so that our tables line up with published ones.

Token counts are given **per LLM layer** (`layer_tokens[l]` = tokens entering decoder layer l, text
included), so one code path covers unpruned models, vision-stage methods (every layer sees the same
shorter sequence) and multi-stage in-LLM methods (record per-layer counts, then both "keep after prune" and
the layer average follow). `layer_tokens_for_stages` builds that list from a method's stages, with the
accounting of a prune record (`vtprune/record.py`).

LLaVA-NeXT (AnyRes) is the same LLM and tower, but one image is several tower inputs ("crops": the base view
and the tiles of the best `image_grid_pinpoints` resolution) and its LLM tokens are the base view's patches,
the tiles' patches unpadded, and one `image_newline` per tile-grid row. `image_work(spec, (h, w))` gives both
numbers for an image size by the model's own arithmetic (select_best_resolution, unpad_image of
transformers' llava_next), and `prefill_flops(..., crops=n)` runs the tower and projector on n crops while the
LLM counts the tokens it is given.

Qwen2-VL / Qwen2.5-VL (`ArchSpec.family`, presets in `QWEN_PRESETS`): the same LLM arithmetic (GQA, SwiGLU,
causal attention); the tower embeds (2-frame x 14 x 14) patches with a Conv3d, runs its blocks over every
patch of the image (Qwen2.5: inside windows of 112 px, except the `fullatt_block_indexes` blocks; Qwen2: all
full attention) and its merger MLP maps each 2 x 2 patches to one LLM token, so the tower's cost follows the
image's patch grid (`image_work(spec, (h, w))`, `vision_flops(spec, image_size=(h, w))`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vtprune.record import PruneRecord, StageRecord

if TYPE_CHECKING:  # transformers is only needed to build or read configs, not for the arithmetic
    from transformers import LlavaConfig

__all__ = [
    "ARCH_PRESETS",
    "HARDWARE",
    "PRESETS",
    "QWEN_CONFIGS",
    "QWEN_PRESETS",
    "QwenImageWork",
    "arch_config",
    "ArchSpec",
    "ImageWork",
    "decode_flops",
    "decode_step_bytes",
    "fastv_convention_flops",
    "image_work",
    "kv_bytes_per_token",
    "kv_cache_bytes",
    "layer_avg_visual_tokens",
    "layer_tokens_for_stages",
    "layer_visual_tokens_for_stages",
    "llava_config",
    "llm_weight_bytes",
    "prefill_flops",
    "projector_flops",
    "qwen_config",
    "qwen_grid",
    "qwen_spec",
    "qwen_window_sizes",
    "roofline_floor_ms",
    "sparsevlm_convention_flops",
    "tokens_after_pruning",
    "vision_flops",
]


# --------------------------------------------------------------------------------------------------------
# Architecture description
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """The shape numbers of a LLaVA model that FLOPs, parameter and KV-cache arithmetic depend on.

    LLM fields follow LLaMA naming (`hidden_size` = d, `intermediate_size` = m of the SwiGLU FFN); vision
    fields describe the CLIP ViT tower. Build one from a loaded or constructed config with
    `ArchSpec.from_config(cfg)`, or take a named preset from `ARCH_PRESETS`.
    """

    name: str
    # LLM (LLaMA / Vicuna)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    # vision tower (CLIP ViT)
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    # projector / glue
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    projector_bias: bool = True
    # AnyRes tiling (LLaVA-NeXT): the (height, width) resolutions an image may be tiled at; () = LLaVA-1.5,
    # where every image is resized to one tower input
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    # ids and misc settings, kept so that `llava_config` can rebuild a faithful config
    image_token_index: int = 32000
    pad_token_id: int | None = 32001
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Qwen2-VL / Qwen2.5-VL (family "qwen2_vl" / "qwen2_5_vl"): a dynamic-resolution tower of
    # temporal x spatial patches, 2 x 2 merged into one LLM token; `image_size` is then only the side of the
    # synthetic image benchmarks assume (896 px: 32 x 32 = 1,024 tokens), and (Qwen2.5) most blocks attend
    # inside windows of `vision_window_size` px, the blocks in `vision_fullatt_blocks` over the whole image
    family: str = "llava"
    temporal_patch_size: int = 1
    spatial_merge_size: int = 1
    vision_window_size: int = 0  # 0: every block attends over the whole image
    vision_fullatt_blocks: tuple[int, ...] = ()
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def d(self) -> int:
        """LLM width d."""
        return self.hidden_size

    @property
    def m(self) -> int:
        """LLM FFN width m."""
        return self.intermediate_size

    @property
    def q_dim(self) -> int:
        """Width of the concatenated query heads (= d for LLaMA-2 7B/13B)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the concatenated key (or value) heads; smaller than `q_dim` under GQA."""
        return self.num_kv_heads * self.head_dim

    @property
    def grid_size(self) -> int:
        """Patches per side of the square image (24 for CLIP ViT-L/14 at 336 px)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens of one image (576 for LLaVA-1.5; 4,096 for an 896 x 896 image on Qwen-VL)."""
        return self.grid_size**2

    @property
    def vision_tokens(self) -> int:
        """Tokens inside the vision tower: patches plus [CLS] (577 for LLaVA-1.5; Qwen-VL has no [CLS])."""
        return self.num_patches + (0 if self.qwen else 1)

    @property
    def qwen(self) -> bool:
        """Whether this is a Qwen2-VL / Qwen2.5-VL (dynamic resolution, 2 x 2 merger, M-RoPE)."""
        return self.family in QWEN_FAMILIES

    @property
    def token_side(self) -> int:
        """Pixels per side of one LLM token: patch x merge (28 on Qwen-VL; the patch on LLaVA)."""
        return self.patch_size * self.spatial_merge_size

    @property
    def vision_mlp_matrices(self) -> int:
        """Matrices of a tower block's MLP: 3 for Qwen2.5-VL's SwiGLU, 2 for CLIP's and Qwen2-VL's fc1/fc2."""
        return 3 if self.family == "qwen2_5_vl" else 2

    @property
    def visual_tokens(self) -> int:
        """Visual tokens one tower input contributes to the LLM prompt before any pruning: a whole image on
        LLaVA-1.5, the base view of an AnyRes image (whose tiles add more: `image_work`).

        `default` drops [CLS] (576), `full` keeps it (577), as in `LlavaModel.get_image_features`.
        """
        if self.qwen:  # the default synthetic image, 2 x 2 patches merged per token
            return (self.image_size // self.token_side) ** 2
        return self.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def anyres(self) -> bool:
        """Whether an image is tiled (LLaVA-NeXT) rather than resized to one tower input (LLaVA-1.5)."""
        return bool(self.image_grid_pinpoints)

    @property
    def default_image_size(self) -> tuple[int, int] | None:
        """The image size benchmarks assume on AnyRes models: twice the tower's resolution, square (672 x 672
        for CLIP-336: the base view and 2 x 2 tiles); None on LLaVA-1.5, where the size does not matter."""
        if self.qwen:
            return (self.image_size, self.image_size)
        return (2 * self.image_size, 2 * self.image_size) if self.anyres else None

    @property
    def num_feature_layers(self) -> int:
        """How many vision layers are concatenated into the projector input (1 for LLaVA-1.5)."""
        return len(self.vision_feature_layer) if isinstance(self.vision_feature_layer, tuple) else 1

    @property
    def projector_in(self) -> int:
        return self.vision_hidden_size * self.num_feature_layers

    @property
    def projector_hidden(self) -> int:
        return self.hidden_size

    @property
    def projector_out(self) -> int:
        return self.hidden_size

    # ---- parameter counts ----------------------------------------------------------------------------
    @property
    def llm_layer_linear_params(self) -> int:
        """Weights of the matmuls of one decoder layer: q, k, v, o (GQA-aware) and the 3 SwiGLU matrices."""
        d = self.hidden_size
        return d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d + 3 * d * self.intermediate_size

    @property
    def llm_nonembedding_linear_params(self) -> int:
        """Non-embedding parameters (6.476 B for Vicuna-7B): what every forward reads."""
        return self.num_layers * self.llm_layer_linear_params

    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts per component, matching `LlavaForConditionalGeneration` (HF layout).

        Includes biases, norms, the [CLS] and position embeddings and the unused `post_layernorm`, so a
        test can compare against the module tree of a model built from `llava_config`.
        """
        dv, mv = self.vision_hidden_size, self.vision_intermediate_size
        vision_layer = 4 * (dv * dv + dv) + dv * mv + mv + mv * dv + dv + 2 * (2 * dv)
        vision = (
            dv  # class embedding
            + dv * self.num_channels * self.patch_size**2  # patch conv, no bias
            + self.vision_tokens * dv  # position embedding
            + 2 * dv  # pre_layrnorm
            + self.vision_layers * vision_layer
            + 2 * dv  # post_layernorm (present, unused by LLaVA)
        )
        bias = 1 if self.projector_bias else 0
        projector = (self.projector_in + bias) * self.projector_hidden + (
            self.projector_hidden + bias
        ) * self.projector_out
        d = self.hidden_size
        llm_layers = self.num_layers * (self.llm_layer_linear_params + 2 * d)
        counts = {
            "vision_tower": vision,
            "projector": projector,
            **({"image_newline": self.hidden_size} if self.anyres else {}),  # LlavaNextModel.image_newline
            "llm_embedding": self.vocab_size * d,
            "llm_layers": llm_layers,
            "llm_final_norm": d,
            "lm_head": self.vocab_size * d,
        }
        counts["total"] = sum(counts.values())
        return counts

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: LlavaConfig | Any, name: str | None = None) -> ArchSpec:
        """Read the shape numbers from a `LlavaConfig` (anything with `text_config` and `vision_config`) or a
        Qwen2-VL / Qwen2.5-VL config."""
        if getattr(config, "model_type", None) in QWEN_FAMILIES:
            return qwen_spec(config.to_dict(), name=name or getattr(config, "_name_or_path", "") or None)
        text = getattr(config, "text_config", None)
        vision = getattr(config, "vision_config", None)
        if text is None or vision is None:
            raise ValueError(
                f"ArchSpec.from_config needs a LLaVA-style config with text_config and vision_config, "
                f"got {type(config).__name__}"
            )
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        feature_layer = getattr(config, "vision_feature_layer", -2)
        if isinstance(feature_layer, (list, tuple)):
            feature_layer = tuple(int(x) for x in feature_layer)
        rope = getattr(text, "rope_parameters", None) or {}
        rope_theta = rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))
        image_token = getattr(config, "image_token_index", None)
        if image_token is None:
            image_token = getattr(config, "image_token_id", 32000)
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            pad = getattr(text, "pad_token_id", None)
        anyres = getattr(config, "model_type", None) == "llava_next"
        pinpoints = getattr(config, "image_grid_pinpoints", None) if anyres else None
        return cls(
            name=name or getattr(config, "_name_or_path", "") or "llava",
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=text.vocab_size,
            vision_hidden_size=vision.hidden_size,
            vision_intermediate_size=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            vision_heads=vision.num_attention_heads,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            num_channels=getattr(vision, "num_channels", 3),
            vision_feature_layer=feature_layer,
            vision_feature_select_strategy=getattr(config, "vision_feature_select_strategy", "default"),
            projector_bias=getattr(config, "multimodal_projector_bias", True),
            image_grid_pinpoints=tuple((int(h), int(w)) for h, w in pinpoints or ()),
            image_token_index=image_token,
            pad_token_id=pad,
            max_position_embeddings=getattr(text, "max_position_embeddings", 4096),
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
        )


_CLIP_VIT_L_336 = {
    "vision_hidden_size": 1024,
    "vision_intermediate_size": 4096,
    "vision_layers": 24,
    "vision_heads": 16,
    "image_size": 336,
    "patch_size": 14,
}

_VICUNA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_layers": 32,
    "num_heads": 32,
    "num_kv_heads": 32,
    "head_dim": 128,
    "vocab_size": 32064,
}
_VICUNA_13B = {**_VICUNA_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_layers": 40, "num_heads": 40,
               "num_kv_heads": 40}

# llava-hf/llava-v1.6-vicuna-{7b,13b}-hf (config.json): the tiles an image may be cut into, (height, width)
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

# llava-hf/llava-1.5-{7b,13b}-hf: Vicuna v1.5 (LLaMA-2 shapes, MHA) with the vocabulary padded to 32064
# (image token 32000, pad 32001) and CLIP ViT-L/14-336.
# llava-hf/llava-v1.6-vicuna-{7b,13b}-hf: the same LLM and tower, AnyRes over LLAVA_NEXT_PINPOINTS, layer -2,
# `default` strategy, image token 32000. Their config.json sets no top-level pad id (text_config.pad_token_id
# is 0); 32001 is the tokenizer's `<pad>`, kept here like the 1.5 presets (it only names the embedding row
# that starts at zero, which no timing sees, and the id synthetic prompts avoid).
ARCH_PRESETS: dict[str, ArchSpec] = {
    "llava-1.5-7b": ArchSpec(name="llava-1.5-7b", **_VICUNA_7B, **_CLIP_VIT_L_336),
    "llava-1.5-13b": ArchSpec(name="llava-1.5-13b", **_VICUNA_13B, **_CLIP_VIT_L_336),
    "llava-1.6-vicuna-7b": ArchSpec(
        name="llava-1.6-vicuna-7b", **_VICUNA_7B, **_CLIP_VIT_L_336, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS
    ),
    "llava-1.6-vicuna-13b": ArchSpec(
        name="llava-1.6-vicuna-13b", **_VICUNA_13B, **_CLIP_VIT_L_336, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS
    ),
}

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
QWEN_DEFAULT_IMAGE = 896  # px per side of the benchmarks' synthetic image: 32 x 32 = 1,024 tokens


def _qwen_text(max_positions: int) -> dict:
    """The LLM of Qwen2-VL-7B and Qwen2.5-VL-7B (Qwen2-7B: GQA with 4 KV heads, M-RoPE sections 16/24/24)."""
    return {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "max_window_layers": 28,
        "use_sliding_window": False,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }


_QWEN_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
}

# config.json of Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen2-VL-7B-Instruct in transformers 5's nested layout
# (flat text keys under text_config, `rope_scaling` {"type": "mrope"} as rope_parameters), every shape number
# written out (the config classes' defaults differ: Qwen2.5's vision hidden_size defaults to 3584, not 1280).
# Counted on the meta device these build 8,292,166,656 and 8,291,375,616 parameters, the checkpoints' sizes.
QWEN_CONFIGS: dict[str, dict] = {
    "qwen2.5-vl-7b": {
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "text_config": _qwen_text(128000),
        "vision_config": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "hidden_act": "silu",
            "in_channels": 3,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
        },
        **_QWEN_IDS,
    },
    "qwen2-vl-7b": {
        "model_type": "qwen2_vl",
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "text_config": _qwen_text(32768),
        "vision_config": {
            "depth": 32,
            "embed_dim": 1280,
            "mlp_ratio": 4,
            "num_heads": 16,
            "hidden_act": "quick_gelu",
            "in_channels": 3,
            "hidden_size": 3584,  # Qwen2-VL's name for the merger's output width (the LLM's)
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **_QWEN_IDS,
    },
}


def qwen_spec(config: dict, name: str | None = None, image_size: int = QWEN_DEFAULT_IMAGE) -> ArchSpec:
    """The ArchSpec of a Qwen2-VL / Qwen2.5-VL config given as a dict (`config.to_dict()` or a
    `QWEN_CONFIGS` entry); `image_size` is the side of the synthetic image benchmarks assume."""
    family = config["model_type"]
    if family not in QWEN_FAMILIES:
        raise ValueError(f"qwen_spec reads {' or '.join(QWEN_FAMILIES)} configs, got {family!r}")
    text, vision = config["text_config"], config["vision_config"]
    heads = text["num_attention_heads"]
    if family == "qwen2_5_vl":
        dv, mv = vision["hidden_size"], vision["intermediate_size"]
        window, full = vision["window_size"], tuple(int(i) for i in vision["fullatt_block_indexes"])
    else:  # Qwen2-VL: `hidden_size` is the merger's output, blocks `embed_dim` wide, all full attention
        dv, mv = vision["embed_dim"], vision["embed_dim"] * vision["mlp_ratio"]
        window, full = 0, ()
    rope = text.get("rope_parameters") or {}
    return ArchSpec(
        name=name or family,
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_layers=text["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or text["hidden_size"] // heads,
        vocab_size=text["vocab_size"],
        vision_hidden_size=dv,
        vision_intermediate_size=mv,
        vision_layers=vision["depth"],
        vision_heads=vision["num_heads"],
        image_size=image_size,
        patch_size=vision["patch_size"],
        num_channels=vision.get("in_channels", 3),
        image_token_index=config["image_token_id"],
        pad_token_id=text.get("pad_token_id"),
        max_position_embeddings=text.get("max_position_embeddings", 32768),
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", 1000000.0)),
        family=family,
        temporal_patch_size=vision["temporal_patch_size"],
        spatial_merge_size=vision["spatial_merge_size"],
        vision_window_size=window,
        vision_fullatt_blocks=full,
        video_token_id=config.get("video_token_id"),
        vision_start_token_id=config.get("vision_start_token_id"),
        vision_end_token_id=config.get("vision_end_token_id"),
    )


# Kept apart from ARCH_PRESETS (the LLaVA family, whose module layout `param_counts` and `llava_config`
# describe); `PRESETS` holds both, and every function here takes either name.
QWEN_PRESETS: dict[str, ArchSpec] = {k: qwen_spec(v, name=k) for k, v in QWEN_CONFIGS.items()}
PRESETS: dict[str, ArchSpec] = {**ARCH_PRESETS, **QWEN_PRESETS}


def qwen_config(name: str, attn_implementation: str | None = "sdpa"):
    """The `Qwen2_5_VLConfig` / `Qwen2VLConfig` of a `QWEN_CONFIGS` preset (for random-weight benchmarks)."""
    import copy

    import transformers

    from vtprune import compat

    if name not in QWEN_CONFIGS:
        raise ValueError(f"unknown Qwen-VL preset {name!r}; known: {sorted(QWEN_CONFIGS)}")
    values = copy.deepcopy(QWEN_CONFIGS[name])
    cls = {"qwen2_5_vl": transformers.Qwen2_5_VLConfig, "qwen2_vl": transformers.Qwen2VLConfig}[
        values.pop("model_type")
    ]
    config = cls(**values)
    if attn_implementation is not None:
        compat.set_attention_implementation(config, attn_implementation)
    return config


def arch_config(name: str, attn_implementation: str | None = "sdpa"):
    """The transformers config of any `ARCH_PRESETS` entry (LLaVA, LLaVA-NeXT or Qwen-VL)."""
    if name in QWEN_CONFIGS:
        return qwen_config(name, attn_implementation)
    return llava_config(name, attn_implementation)


def _preset(name: str) -> ArchSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown architecture preset {name!r}; known: {sorted(PRESETS)}") from None


def llava_config(name: str | ArchSpec, attn_implementation: str | None = "sdpa") -> LlavaConfig:
    """A full `LlavaConfig` (a `LlavaNextConfig` for AnyRes specs) with the real architecture of a preset (or
    of any `ArchSpec`).

    Meant for benchmarks with random weights where no checkpoint is at hand: `LlavaForConditionalGeneration
    (llava_config("llava-1.5-7b"))` has the same module shapes (7.063 B parameters) as llava-hf's model, so
    timings and memory are those of the real thing (likewise `LlavaNextForConditionalGeneration` for the
    llava-1.6 presets). Build it under `torch.device("meta")` for shape-only work. Token ids follow llava-hf
    (image 32000, pad 32001).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    from vtprune import compat

    spec = _preset(name) if isinstance(name, str) else name
    if spec.qwen:
        raise ValueError(f"{spec.name} is a Qwen-VL architecture: build its config with qwen_config")
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        num_channels=spec.num_channels,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        pad_token_id=spec.pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    feature_layer = (
        list(spec.vision_feature_layer)
        if isinstance(spec.vision_feature_layer, tuple)
        else spec.vision_feature_layer
    )
    common = {
        "vision_config": vision,
        "text_config": text,
        "image_token_index": spec.image_token_index,
        "image_seq_length": spec.visual_tokens,
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": spec.vision_feature_select_strategy,
        "vision_feature_layer": feature_layer,
        "multimodal_projector_bias": spec.projector_bias,
        "pad_token_id": spec.pad_token_id,
    }
    if spec.anyres:
        config = LlavaNextConfig(
            **common,
            image_grid_pinpoints=[list(p) for p in spec.image_grid_pinpoints],
            architectures=["LlavaNextForConditionalGeneration"],
        )
    else:
        config = LlavaConfig(**common, architectures=["LlavaForConditionalGeneration"])
    if attn_implementation is not None:
        compat.set_attention_implementation(config, attn_implementation)
    return config


def _as_spec(spec: ArchSpec | str) -> ArchSpec:
    return _preset(spec) if isinstance(spec, str) else spec


# --------------------------------------------------------------------------------------------------------
# What one image costs (AnyRes tiling)
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageWork:
    """One image before pruning: the tower inputs it costs and the visual tokens the LLM receives."""

    crops: int  # tower inputs: 1 on LLaVA-1.5; the base view + the tiles on AnyRes
    tokens: int  # visual tokens in the prompt
    size: tuple[int, int] | None = None  # (height, width) of the image; None where the size does not matter
    tiles: tuple[int, int] = (0, 0)  # tile grid (rows, cols); (0, 0) = no tiles
    tile_tokens: tuple[int, int] = (0, 0)  # the tiles' patch grid after unpadding (rows, cols)

    @property
    def base_tokens(self) -> int:
        rows, cols = self.tile_tokens
        return self.tokens - rows * cols - rows if self.crops > 1 else self.tokens

    def describe(self) -> str:
        """E.g. "672x672 image: 5 tower inputs (base view + 2x2 tiles), 2928 tokens = 576 base + 48x48 tiles
        + 48 newlines"; the single-input case is just the token count."""
        if self.size is None:
            return f"1 tower input, {self.tokens} tokens per image"
        head = f"{self.size[0]}x{self.size[1]} image"
        if self.crops == 1:
            return f"{head}: 1 tower input (no tiles), {self.tokens} tokens = {self.tokens - 1} + 1 newline"
        (th, tw), (rows, cols) = self.tiles, self.tile_tokens
        return (
            f"{head}: {self.crops} tower inputs (base view + {th}x{tw} tiles), {self.tokens} tokens = "
            f"{self.base_tokens} base + {rows}x{cols} tiles + {rows} newlines"
        )


@dataclass(frozen=True)
class QwenImageWork(ImageWork):
    """One Qwen-VL image: one tower input of t x h x w patches, (h / 2) x (w / 2) merged LLM tokens."""

    grid: tuple[int, int, int] = (1, 0, 0)  # (temporal, rows, cols) patches: the model's image_grid_thw

    def describe(self) -> str:
        """"896x896 image: 1 tower input of 64x64 patches, 1024 tokens (2x2 patches merged per token)"."""
        _, rows, cols = self.grid
        merge = int(round((rows * cols / self.tokens) ** 0.5))
        return (
            f"{self.size[0]}x{self.size[1]} image: 1 tower input of {rows}x{cols} patches, "
            f"{self.tokens} tokens ({merge}x{merge} patches merged per token)"
        )


def qwen_grid(spec: ArchSpec | str, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(rows, cols) of patches of one Qwen-VL image of `image_size` (height, width; default the spec's
    `default_image_size`). The sides must be multiples of `token_side` (28 px): the synthetic inputs are the
    processor's output after its resize, which always lands on such a size."""
    s = _as_spec(spec)
    size = tuple(image_size) if image_size is not None else s.default_image_size
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
        raise ValueError(f"an image size is two positive integers (height, width), got {image_size!r}")
    side = s.token_side
    if size[0] % side or size[1] % side:
        raise ValueError(
            f"{s.name} takes images whose sides are multiples of {side} px (patch {s.patch_size} x merge "
            f"{s.spatial_merge_size}, what its processor resizes to), got {size[0]}x{size[1]}; e.g. "
            f"{(size[0] // side or 1) * side}x{(size[1] // side or 1) * side}"
        )
    return size[0] // s.patch_size, size[1] // s.patch_size


def _chunks(length: int, width: int) -> list[int]:
    """`length` cut into pieces of `width` from the start, the last one shorter."""
    return [min(width, length - start) for start in range(0, length, width)]


def qwen_window_sizes(spec: ArchSpec | str, grid: tuple[int, int]) -> list[int]:
    """Patches in each attention window of a windowed Qwen2.5-VL block on a (rows, cols) patch grid.

    As `get_window_index` of transformers' Qwen2.5-VL: the grid of merged tokens is cut into windows of
    `window_size // (patch * merge)` merged tokens per side (4 at 112 px) from the top-left corner, the last
    window row / column smaller (its padding is dropped), and a window holds its merged tokens' 2 x 2 patches.
    A tower without windows (Qwen2-VL) has one window: the whole image."""
    s = _as_spec(spec)
    rows, cols = grid
    if not s.vision_window_size:
        return [rows * cols]
    merge, width = s.spatial_merge_size, s.vision_window_size // s.token_side
    heights, widths = _chunks(rows // merge, width), _chunks(cols // merge, width)
    return [a * b * merge * merge for a in heights for b in widths]


def _qwen_vision_flops(s: ArchSpec, image_size: tuple[int, int] | None) -> int:
    """One image through a Qwen-VL tower: the Conv3d patch embedding (temporal patch x patch x patch x
    channels per patch), every block's linears (qkv + proj, and the MLP's 2 or 3 matrices), and attention
    over the image's n patches (4·n²·dv: QKᵀ and AV, non-causal) in the full-attention blocks, or over each
    window in the windowed ones (4·dv·Σ window²)."""
    rows, cols = qwen_grid(s, image_size)
    n, dv, mv = rows * cols, s.vision_hidden_size, s.vision_intermediate_size
    patch_embed = 2 * n * (s.num_channels * s.temporal_patch_size * s.patch_size**2) * dv
    linear = 2 * n * (4 * dv * dv + s.vision_mlp_matrices * dv * mv)
    full = 4 * n * n * dv
    if s.vision_window_size:
        full_blocks = len(s.vision_fullatt_blocks)
        windowed = 4 * dv * sum(w * w for w in qwen_window_sizes(s, (rows, cols)))
    else:
        full_blocks, windowed = s.vision_layers, 0
    attention = full_blocks * full + (s.vision_layers - full_blocks) * windowed
    return patch_embed + s.vision_layers * linear + attention


def _select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """transformers' `select_best_resolution`: the pinpoint keeping the most pixels, then wasting the fewest."""
    height, width = size
    best, most, least_wasted = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = ph * pw - effective
        if effective > most or (effective == most and wasted < least_wasted):
            best, most, least_wasted = (ph, pw), effective, wasted
    return best


def _unpadded(rows: int, cols: int, size: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) llava_next's `unpad_image` leaves of a rows x cols grid laid over an image of `size`:
    the rows (or columns) that only cover the letterbox are dropped, the same number on each side."""
    height, width = size
    if width / height > cols / rows:
        kept = int(round(height * (cols / width), 7))
        return rows - 2 * ((rows - kept) // 2), cols
    kept = int(round(width * (rows / height), 7))
    return rows, cols - 2 * ((cols - kept) // 2)


def image_work(spec: ArchSpec | str, image_size: tuple[int, int] | None = None) -> ImageWork:
    """Tower inputs and LLM tokens of one image of `image_size` (height, width), by LlavaNextModel's
    arithmetic: the best pinpoint is cut into tiles of the tower's resolution, the tower sees the base view and
    every tile (`image_size_to_num_patches`); the LLM gets the base view's patches, the tiles' patch grid
    unpadded, and one newline per grid row (`pack_image_features`). On LLaVA-1.5 every image is one tower
    input of `visual_tokens` tokens, so no size is taken. The default size is `default_image_size`."""
    s = _as_spec(spec)
    if s.qwen:  # dynamic resolution: one tower input, 2 x 2 merged patches per token
        rows, cols = qwen_grid(s, image_size)
        size = tuple(image_size) if image_size is not None else s.default_image_size
        merge = s.spatial_merge_size
        return QwenImageWork(crops=1, tokens=rows * cols // (merge * merge), size=size, grid=(1, rows, cols))
    if not s.anyres:
        if image_size is not None:
            raise ValueError(
                f"an image size applies to AnyRes (LLaVA-NeXT) models only: {s.name} resizes every image to "
                f"{s.image_size}x{s.image_size} ({s.visual_tokens} tokens)"
            )
        return ImageWork(crops=1, tokens=s.visual_tokens)
    if s.vision_feature_select_strategy != "default":
        raise ValueError("AnyRes token counts are defined for vision_feature_select_strategy='default'")
    size = tuple(image_size) if image_size is not None else s.default_image_size
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
        raise ValueError(f"an image size is two positive integers (height, width), got {image_size!r}")
    best_h, best_w = _select_best_resolution(size, s.image_grid_pinpoints)
    tiles = (math.ceil(best_h / s.image_size), math.ceil(best_w / s.image_size))
    crops = 1 + tiles[0] * tiles[1]
    if crops == 1:  # a pinpoint of the tower's own size: the base view and one newline
        return ImageWork(crops=1, tokens=s.num_patches + 1, size=size)
    # the grid's shape comes from floor division (get_anyres_image_grid_shape), the crop count from ceil
    grid = ((best_h // s.image_size) * s.grid_size, (best_w // s.image_size) * s.grid_size)
    rows, cols = _unpadded(*grid, size)
    return ImageWork(
        crops=crops, tokens=s.num_patches + rows * cols + rows, size=size, tiles=tiles, tile_tokens=(rows, cols)
    )


# --------------------------------------------------------------------------------------------------------
# Token accounting (the rules of vtprune/record.py, for stages given by hand)
# --------------------------------------------------------------------------------------------------------


def _check_stages(num_layers: int, visual_before: int, stages: Sequence[tuple[int, int]]) -> None:
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if visual_before < 0:
        raise ValueError(f"visual_before must be >= 0, got {visual_before}")
    prev_layer, prev_count = -1, visual_before
    for stage in stages:
        if len(stage) != 2:
            raise ValueError(f"a stage is (prune_layer, visual_after), got {stage!r}")
        layer, count = int(stage[0]), int(stage[1])
        if not 0 <= layer < num_layers:
            raise ValueError(f"prune_layer {layer} outside [0, {num_layers}) (0 = before the LLM)")
        if layer <= prev_layer:
            raise ValueError(f"stages must have strictly increasing prune_layer, got {list(stages)!r}")
        if not 0 <= count <= prev_count:
            raise ValueError(
                f"visual_after {count} at layer {layer} must lie in [0, {prev_count}] "
                "(pruning never adds tokens beyond the previous stage)"
            )
        prev_layer, prev_count = layer, count


def _record(num_layers: int, visual_before: int, stages: Sequence[tuple[int, int]]) -> PruneRecord:
    """A one-sample prune record of hand-given `(prune_layer, visual_after)` stages (layer 0: before the LLM)."""
    _check_stages(num_layers, visual_before, stages)
    return PruneRecord(
        method="",
        params={},
        visual_tokens=int(visual_before),
        num_layers=num_layers,
        stages=[
            StageRecord(
                name="",
                kind="vision" if int(layer) == 0 else "llm",
                score_layer=None,
                prune_layer=int(layer),
                positions="original",
                kept=[],
                counts=[int(count)],
            )
            for layer, count in stages
        ],
    )


def layer_visual_tokens_for_stages(
    num_layers: int, visual_before: int, stages: Sequence[tuple[int, int]]
) -> list[int]:
    """Visual tokens entering each LLM layer.

    `stages` is a list of `(prune_layer, visual_after)`: `prune_layer` is the **first layer that sees the
    pruned set** (0 = pruned before the LLM, i.e. a vision-stage method), whatever layer was scored. This
    normalises the three "K" conventions of the papers: FastV K=2 → (2, kept); PDrop "layer 2" →
    (2, kept); SparseVLM "layer 2" (layer 2 runs full, its output is pruned) → (3, kept).
    """
    return _record(num_layers, visual_before, stages).layer_tokens(0)


def layer_tokens_for_stages(
    num_layers: int, text_tokens: int, visual_before: int, stages: Sequence[tuple[int, int]]
) -> list[int]:
    """Total tokens (text + visual) entering each LLM layer; the input of `prefill_flops` and friends.

    `text_tokens` counts every non-visual token of the prompt (system prompt, BOS, question, template).
    """
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
    return [text_tokens + v for v in layer_visual_tokens_for_stages(num_layers, visual_before, stages)]


def tokens_after_pruning(visual_before: int, stages: Sequence[tuple[int, int]]) -> int:
    """Visual tokens the last stage leaves, i.e. what the deepest layers see ("keep after prune")."""
    if not stages:
        return int(visual_before)
    last_layer = max(int(s[0]) for s in stages)
    return _record(last_layer + 1, visual_before, stages).tokens_after_pruning[0]


def layer_avg_visual_tokens(num_layers: int, visual_before: int, stages: Sequence[tuple[int, int]]) -> float:
    """Visual tokens averaged over the LLM layers: the budget in-LLM methods are usually tuned to.

    E.g. FastV K=2 keeping 128 of 576 over 32 layers averages (2·576 + 30·128)/32 = 156, and PDrop
    layers [2, 10, 20] with ratios [0.32, 0.16, 0.08] averages exactly 128.
    """
    return sum(layer_visual_tokens_for_stages(num_layers, visual_before, stages)) / num_layers


def _per_layer(spec: ArchSpec, values: int | Sequence[int], what: str) -> list[int]:
    if isinstance(values, numbers.Integral):
        values = [int(values)] * spec.num_layers
    values = [int(v) for v in values]
    if len(values) != spec.num_layers:
        raise ValueError(f"{what} must have one entry per LLM layer ({spec.num_layers}), got {len(values)}")
    if any(v < 0 for v in values):
        raise ValueError(f"{what} must be >= 0, got {values}")
    return values


# --------------------------------------------------------------------------------------------------------
# True FLOPs (2 per multiply-add)
# --------------------------------------------------------------------------------------------------------


def vision_flops(spec: ArchSpec | str, crops: int = 1, image_size: tuple[int, int] | None = None) -> int:
    """FLOPs of `crops` tower inputs through the CLIP tower: patch-embedding conv + all encoder layers.

    HF's `get_image_features` (and the original LLaVA code) run every encoder layer with
    `output_hidden_states=True` even though LLaVA reads layer −2, so all `vision_layers` are counted.
    Attention is non-causal over `vision_tokens` (577) tokens: QKᵀ and AV cost 2·T²·dv FLOPs each. An
    AnyRes image is `ImageWork.crops` inputs (5 for a 672 x 672 image: the base view and 2 x 2 tiles), each
    its own 577-token sequence.

    Qwen-VL: `crops` images of `image_size` (height, width; default `default_image_size`), each its own
    sequence of patches (`_qwen_vision_flops`: windowed and full-attention blocks).
    """
    s = _as_spec(spec)
    if crops < 0:
        raise ValueError(f"crops must be >= 0, got {crops}")
    if s.qwen:
        return crops * _qwen_vision_flops(s, image_size)
    dv, mv, t = s.vision_hidden_size, s.vision_intermediate_size, s.vision_tokens
    patch_embed = 2 * s.num_patches * (s.num_channels * s.patch_size**2) * dv
    linear = 2 * t * (4 * dv * dv + 2 * dv * mv)
    attention = 4 * t * t * dv
    return crops * (patch_embed + s.vision_layers * (linear + attention))


def projector_flops(
    spec: ArchSpec | str, tokens: int | None = None, image_size: tuple[int, int] | None = None
) -> int:
    """FLOPs of the 2-layer MLP projector on `tokens` visual tokens (default: all of one tower input, 576).

    Vision-stage methods that select before the projector can pass their kept count instead. Qwen-VL: the
    merger's MLP (4·dv → 4·dv → d, on the 2 x 2 patches of each token; default: every token of one image of
    `image_size`).
    """
    s = _as_spec(spec)
    if s.qwen:
        unit = s.vision_hidden_size * s.spatial_merge_size**2
        n = image_work(s, image_size).tokens if tokens is None else int(tokens)
        return 2 * n * (unit * unit + unit * s.hidden_size)
    n = s.visual_tokens if tokens is None else int(tokens)
    return 2 * n * (s.projector_in * s.projector_hidden + s.projector_hidden * s.projector_out)


def _layer_linear_flops(s: ArchSpec, n: int) -> int:
    return 2 * n * s.llm_layer_linear_params


def prefill_flops(
    spec: ArchSpec | str,
    layer_tokens: int | Sequence[int],
    *,
    batch: int = 1,
    lm_head_positions: int = 1,
    include_vision: bool = True,
    projector_tokens: int | None = None,
    crops: int = 1,
    image_size: tuple[int, int] | None = None,
) -> dict[str, int]:
    """True FLOPs of one prefill.

    `layer_tokens[l]` is the number of tokens entering decoder layer l (an int broadcasts to all layers).
    Within a layer of n tokens, attention is causal: query i scores i+1 keys, so QKᵀ and AV together cost
    2·q_dim·n(n+1) FLOPs. The LM head runs on `lm_head_positions` positions per sample (1 = modern
    `generate`; older code computed logits for all n). Vision tower and projector are returned separately
    and added to `total` unless `include_vision=False`; they run on `crops` tower inputs per sample (an AnyRes
    image's `ImageWork.crops`): the projector maps every crop's patches before LlavaNextModel unpads them, so
    it sees crops × 576 tokens while the LLM sees the image's `tokens` (`layer_tokens`).

    Qwen-VL: `crops` images of `image_size` through the tower and the merger (`vision_flops`).

    Returns a dict of ints: `llm_linear`, `llm_attention`, `llm` (decoder layers), `lm_head`, `vision`,
    `projector`, `total`; all multiplied by `batch`.
    """
    s = _as_spec(spec)
    tokens = _per_layer(s, layer_tokens, "layer_tokens")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    linear = sum(_layer_linear_flops(s, n) for n in tokens)
    attention = sum(2 * s.q_dim * n * (n + 1) for n in tokens)
    lm_head = 2 * s.hidden_size * s.vocab_size * lm_head_positions
    vision = vision_flops(s, crops, image_size) if include_vision else 0
    if projector_tokens is None:
        projector_tokens = crops * (image_work(s, image_size).tokens if s.qwen else s.visual_tokens)
    projector = projector_flops(s, projector_tokens, image_size) if include_vision else 0
    out = {
        "llm_linear": linear,
        "llm_attention": attention,
        "llm": linear + attention,
        "lm_head": lm_head,
        "vision": vision,
        "projector": projector,
    }
    out = {k: v * batch for k, v in out.items()}
    out["total"] = out["llm"] + out["lm_head"] + out["vision"] + out["projector"]
    return out


def decode_flops(
    spec: ArchSpec | str,
    layer_context_lengths: int | Sequence[int],
    new_tokens: int,
    *,
    batch: int = 1,
) -> dict[str, int]:
    """True FLOPs of `new_tokens` single-token decode forwards after a prefill.

    `layer_context_lengths[l]` is the KV-cache length of layer l when decoding starts (equal to the
    prefill's `layer_tokens`: in-LLM methods keep full caches below their prune layer). Decode step t
    (0-based) appends one token, which attends to c_l + t + 1 keys at layer l: 4·q_dim FLOPs per key
    (QKᵀ and AV). Each step also runs the LM head for its one position. `generate(max_new_tokens=N)` does
    N−1 such steps: the first token comes from the prefill logits.
    """
    s = _as_spec(spec)
    ctx = _per_layer(s, layer_context_lengths, "layer_context_lengths")
    if new_tokens < 0:
        raise ValueError(f"new_tokens must be >= 0, got {new_tokens}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    t = int(new_tokens)
    linear = s.num_layers * t * _layer_linear_flops(s, 1)
    keys = sum(t * c + t * (t + 1) // 2 for c in ctx)
    attention = 4 * s.q_dim * keys
    lm_head = 2 * s.hidden_size * s.vocab_size * t
    out = {"llm_linear": linear, "llm_attention": attention, "llm": linear + attention, "lm_head": lm_head}
    out = {k: v * batch for k, v in out.items()}
    out["total"] = out["llm"] + out["lm_head"]
    return out


# --------------------------------------------------------------------------------------------------------
# Paper-convention "FLOPs" (MACs), for lining up with published tables
# --------------------------------------------------------------------------------------------------------


def fastv_convention_flops(
    spec: ArchSpec | str, layer_tokens: int | Sequence[int], *, ffn_matrices: int = 2
) -> int:
    """FastV's per-layer 4nd² + 2n²d + 2ndm summed with each layer's own n (FastV, arXiv 2403.06764).

    This is what FastV, DivPrune (`tflops.py`) and most tables call "FLOPs": one multiply-add counts 1,
    attention is the full n×n matrix, GQA is ignored (4d² for q/k/v/o) and the FFN has two matrices.
    n includes the text tokens. Gives 3.31 T for LLaVA-1.5-7B at 576 visual + 60 text tokens, about 40%
    of the true 8.34 T. `ffn_matrices=3` is SparseVLM's variant.
    """
    s = _as_spec(spec)
    tokens = _per_layer(s, layer_tokens, "layer_tokens")
    d, m = s.hidden_size, s.intermediate_size
    return sum(4 * n * d * d + 2 * n * n * d + ffn_matrices * n * d * m for n in tokens)


def sparsevlm_convention_flops(spec: ArchSpec | str, layer_tokens: int | Sequence[int]) -> int:
    """SparseVLM's code formula 4nd² + 2n²d + 3ndm (MACs, SwiGLU's third matrix counted): 4.23 T at n=636."""
    return fastv_convention_flops(spec, layer_tokens, ffn_matrices=3)


# --------------------------------------------------------------------------------------------------------
# Bytes and roofline
# --------------------------------------------------------------------------------------------------------


def kv_bytes_per_token(spec: ArchSpec | str, dtype_bytes: int = 2) -> int:
    """KV-cache bytes of one token held at every layer: 2 (K and V) × layers × kv_dim × dtype bytes.

    0.5 MiB for LLaVA-1.5-7B in fp16/bf16.
    """
    s = _as_spec(spec)
    return 2 * s.num_layers * s.kv_dim * dtype_bytes


def kv_cache_bytes(
    spec: ArchSpec | str, layer_tokens: int | Sequence[int], dtype_bytes: int = 2, *, batch: int = 1
) -> int:
    """KV-cache bytes summed over layers with each layer's own length.

    In-LLM methods keep full-length caches below their prune layer, so their saving is Σ kept_l / Σ total_l,
    not kept/total. Pass prefill `layer_tokens`, plus generated tokens if
    the cache after decoding is wanted.
    """
    s = _as_spec(spec)
    tokens = _per_layer(s, layer_tokens, "layer_tokens")
    return batch * sum(2 * n * s.kv_dim * dtype_bytes for n in tokens)


def llm_weight_bytes(spec: ArchSpec | str, dtype_bytes: int = 2) -> int:
    """Bytes every LLM forward must read: non-embedding weights plus the LM head (13.21 GB for 7B bf16).

    The embedding table is gathered, not streamed, so it is left out.
    """
    s = _as_spec(spec)
    return (s.llm_nonembedding_linear_params + s.vocab_size * s.hidden_size) * dtype_bytes


def decode_step_bytes(
    spec: ArchSpec | str, layer_context_lengths: int | Sequence[int], *, batch: int = 1, dtype_bytes: int = 2
) -> int:
    """Bytes read by one decode step: the weights once plus every sample's KV cache."""
    return llm_weight_bytes(spec, dtype_bytes) + kv_cache_bytes(
        spec, layer_context_lengths, dtype_bytes, batch=batch
    )


# Achievable dense bf16 compute (TFLOP/s) and HBM bandwidth (TB/s) assumed for the roofline floors.
HARDWARE: dict[str, tuple[float, float]] = {
    "h100-sxm": (790.0, 3.35),
    "h200": (790.0, 4.8),
}


def roofline_floor_ms(
    flops: float, nbytes: float, peak_tflops: float = 790.0, bw_tbps: float = 3.35
) -> float:
    """Lower bound on a kernel sequence's time: max(compute time, memory time), in milliseconds.

    Defaults are an H100 SXM at an achievable 790 TFLOP/s and 3.35 TB/s; e.g. the
    576-token LLaVA-1.5-7B prefill (8.34 TFLOP, 13.21 GB) floors at 10.6 ms, compute-bound.
    """
    if peak_tflops <= 0 or bw_tbps <= 0:
        raise ValueError("peak_tflops and bw_tbps must be positive")
    if flops < 0 or nbytes < 0 or not (math.isfinite(flops) and math.isfinite(nbytes)):
        raise ValueError(f"flops and nbytes must be finite and >= 0, got {flops}, {nbytes}")
    return max(flops / (peak_tflops * 1e12), nbytes / (bw_tbps * 1e12)) * 1e3
