"""FLOPs, token accounting, KV bytes and roofline arithmetic against hand-computed values.

Reference numbers are computed by hand from the LLaVA-1.5 / LLaVA-NeXT architectures (parameter counts, the
FastV paper's FLOPs convention 4nd² + 2n²d + 2ndm per layer) and from the layer averages of the method pages
(docs/methods/pdrop.md, sparsevlm.md).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration
from transformers.models.llava_next import modeling_llava_next

from vtprune.bench.flops import (
    ARCH_PRESETS,
    HARDWARE,
    ArchSpec,
    ImageWork,
    decode_flops,
    decode_step_bytes,
    fastv_convention_flops,
    image_work,
    kv_bytes_per_token,
    kv_cache_bytes,
    layer_avg_visual_tokens,
    layer_tokens_for_stages,
    layer_visual_tokens_for_stages,
    llava_config,
    llm_weight_bytes,
    prefill_flops,
    projector_flops,
    roofline_floor_ms,
    sparsevlm_convention_flops,
    tokens_after_pruning,
    vision_flops,
)
from vtprune.testing import make_tiny_llava_next, tiny_llava_config

LLAVA7B = ARCH_PRESETS["llava-1.5-7b"]
LLAVA13B = ARCH_PRESETS["llava-1.5-13b"]
NEXT7B = ARCH_PRESETS["llava-1.6-vicuna-7b"]
NEXT13B = ARCH_PRESETS["llava-1.6-vicuna-13b"]
TEXT = 60  # text tokens of the conversion table below


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARCH_PRESETS))
def test_preset_config_roundtrip_and_param_counts(name: str) -> None:
    cfg = llava_config(name)
    assert ArchSpec.from_config(cfg, name=name) == ARCH_PRESETS[name]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)  # LlavaNextForConditionalGeneration for 1.6
    assert type(model).__name__ == cfg.architectures[0]
    counts = ARCH_PRESETS[name].param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["vision_tower"] == sum(p.numel() for p in model.model.vision_tower.parameters())
    assert counts["projector"] == sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert counts["lm_head"] == model.lm_head.weight.numel()


def test_llava_7b_facts() -> None:
    cfg = llava_config("llava-1.5-7b")
    assert cfg.text_config.vocab_size == 32064
    assert cfg.image_token_id == 32000 and cfg.pad_token_id == 32001
    assert cfg.image_seq_length == 576 and cfg.vision_feature_layer == -2
    s = LLAVA7B
    assert (s.d, s.m, s.num_layers, s.num_heads, s.head_dim) == (4096, 11008, 32, 32, 128)
    assert (s.vision_layers, s.vision_hidden_size, s.vision_heads, s.vision_intermediate_size) == (
        24,
        1024,
        16,
        4096,
    )
    assert (s.grid_size, s.num_patches, s.vision_tokens, s.visual_tokens) == (24, 576, 577, 576)
    assert (s.projector_in, s.projector_hidden, s.projector_out) == (1024, 4096, 4096)
    # LLaVA-1.5-7B: 7.063 B total, 6.476 B non-embedding
    assert s.param_counts()["total"] == 7_063_427_072
    assert _rel(s.llm_nonembedding_linear_params, 6.476e9) < 1e-3
    s13 = LLAVA13B
    assert (s13.d, s13.m, s13.num_layers, s13.num_heads) == (5120, 13824, 40, 40)


def test_llava_next_presets_follow_the_llava_hf_configs() -> None:
    """llava-hf/llava-v1.6-vicuna-{7b,13b}-hf: the 1.5 LLM and tower, AnyRes over five pinpoints."""
    for spec, base in ((NEXT7B, LLAVA7B), (NEXT13B, LLAVA13B)):
        cfg = llava_config(spec.name)
        assert cfg.model_type == "llava_next" and spec.anyres and not base.anyres
        assert cfg.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        assert (cfg.image_token_id, cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (
            32000,
            -2,
            "default",
        )
        assert cfg.text_config.vocab_size == 32064
        # the same shapes as LLaVA-1.5 plus the image_newline vector
        assert spec.param_counts()["total"] == base.param_counts()["total"] + spec.hidden_size
    assert NEXT7B.default_image_size == (672, 672) and LLAVA7B.default_image_size is None


def test_unknown_preset_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown architecture preset"):
        llava_config("llava-9b")
    with pytest.raises(ValueError, match="text_config"):
        ArchSpec.from_config(object())


# ---------------------------------------------------------------------------------------------------------
# FLOPs conversion table (LLaVA-1.5-7B, 60 text tokens)
# ---------------------------------------------------------------------------------------------------------

TABLE = [
    # visual tokens, true LLM TFLOP, FastV-formula T, SparseVLM-formula T
    (576, 8.34, 3.31, 4.23),
    (192, 3.28, 1.29, 1.65),
    (128, 2.45, 0.96, 1.23),
    (64, 1.61, 0.63, 0.81),
]


@pytest.mark.parametrize(("visual", "true_t", "fastv_t", "sparsevlm_t"), TABLE)
def test_conversion_table(visual: int, true_t: float, fastv_t: float, sparsevlm_t: float) -> None:
    layer_tokens = layer_tokens_for_stages(32, TEXT, 576, [(0, visual)])
    assert layer_tokens == [TEXT + visual] * 32
    f = prefill_flops(LLAVA7B, layer_tokens)
    assert _rel((f["llm"] + f["lm_head"]) / 1e12, true_t) < 0.01
    assert _rel(fastv_convention_flops(LLAVA7B, layer_tokens) / 1e12, fastv_t) < 0.01
    assert _rel(sparsevlm_convention_flops(LLAVA7B, layer_tokens) / 1e12, sparsevlm_t) < 0.01
    # the vision side is unchanged by pruning: ≈0.405 TFLOP
    assert _rel((f["vision"] + f["projector"]) / 1e12, 0.405) < 0.01
    assert f["total"] == f["llm"] + f["lm_head"] + f["vision"] + f["projector"]


def test_prefill_breakdown_at_636_tokens() -> None:
    # linear 2 × 6.476e9 × 636 = 8.24 T; causal attention 2 × 636² × 4096 × 32 = 0.106 T
    f = prefill_flops(LLAVA7B, 636)
    assert _rel(f["llm_linear"], 8.24e12) < 0.005
    assert _rel(f["llm_attention"], 0.106e12) < 0.005
    assert f["lm_head"] == 2 * 4096 * 32064
    assert f["llm_attention"] / f["llm"] == pytest.approx(0.0127, abs=0.001)  # "1.3% of prefill FLOPs"


def test_fastv_ratio_sanity_checks() -> None:
    # FastV K=2, R=50%, 60 text tokens → 56.8%; K=3 → 58.2%; 13B K=2 → 56.4%
    def ratio(spec: ArchSpec, k: int) -> float:
        full = fastv_convention_flops(spec, TEXT + 576)
        pruned = layer_tokens_for_stages(spec.num_layers, TEXT, 576, [(k, 288)])
        return fastv_convention_flops(spec, pruned) / full

    assert ratio(LLAVA7B, 2) == pytest.approx(0.568, abs=0.001)
    assert ratio(LLAVA7B, 3) == pytest.approx(0.582, abs=0.001)
    assert ratio(LLAVA13B, 2) == pytest.approx(0.564, abs=0.001)


# ---------------------------------------------------------------------------------------------------------
# Token accounting (layer averages: docs/methods/README.md)
# ---------------------------------------------------------------------------------------------------------


def test_pdrop_layer_average_is_exactly_128() -> None:
    kept = [int(576 * r) for r in (0.32, 0.16, 0.08)]
    assert kept == [184, 92, 46]
    stages = list(zip([2, 10, 20], kept, strict=True))
    counts = layer_visual_tokens_for_stages(32, 576, stages)
    assert counts == [576] * 2 + [184] * 8 + [92] * 10 + [46] * 12
    assert layer_avg_visual_tokens(32, 576, stages) == 128.0
    assert tokens_after_pruning(576, stages) == 46


def test_fastv_keep_128_layer_average_is_156() -> None:
    assert layer_avg_visual_tokens(32, 576, [(2, 128)]) == 156.0
    assert tokens_after_pruning(576, [(2, 128)]) == 128
    assert tokens_after_pruning(576, []) == 576
    assert layer_avg_visual_tokens(32, 576, [(0, 64)]) == 64.0  # vision stage: every layer sees 64


@pytest.mark.parametrize(
    "stages",
    [
        [(32, 100)],  # layer out of range
        [(-1, 100)],
        [(4, 100), (2, 50)],  # not increasing
        [(2, 100), (2, 50)],
        [(2, 600)],  # more than before
        [(2, 100), (4, 200)],  # grows again
        [(2, -1)],
    ],
)
def test_bad_stages_are_rejected(stages: list[tuple[int, int]]) -> None:
    with pytest.raises(ValueError):
        layer_tokens_for_stages(32, TEXT, 576, stages)


def test_per_layer_length_is_checked() -> None:
    with pytest.raises(ValueError, match="one entry per LLM layer"):
        prefill_flops(LLAVA7B, [636] * 31)


# ---------------------------------------------------------------------------------------------------------
# A tiny config computed by hand (GQA, two layers with different lengths)
# ---------------------------------------------------------------------------------------------------------


def _tiny_spec() -> ArchSpec:
    cfg = tiny_llava_config(
        vocab_size=40,
        image_token_id=4,
        pad_token_id=1,
        image_size=28,  # 2×2 patches of 14 px → 4 patches, 5 vision tokens with [CLS]
        vision_hidden=32,
        vision_layers=3,
        vision_heads=4,
        text_hidden=64,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
        intermediate_size=96,
    )
    return ArchSpec.from_config(cfg, name="tiny")


def test_tiny_spec_matches_real_model_params() -> None:
    spec = _tiny_spec()
    assert (spec.q_dim, spec.kv_dim, spec.head_dim, spec.vision_tokens, spec.visual_tokens) == (
        64,
        32,
        16,
        5,
        4,
    )
    model = LlavaForConditionalGeneration(llava_config(spec))
    assert spec.param_counts()["total"] == sum(p.numel() for p in model.parameters())


def test_tiny_prefill_by_hand() -> None:
    spec = _tiny_spec()
    f = prefill_flops(spec, [5, 3])
    # per token per layer: q 64·64 + k 64·32 + v 64·32 + o 64·64 + SwiGLU 3·64·96 = 30720 MACs
    assert f["llm_linear"] == 2 * 30720 * (5 + 3)  # 491520
    # causal attention, 4 heads × 16: n=5 → 1+2+3+4+5 = 15 keys; n=3 → 6 keys; QKᵀ + AV, 2 FLOPs per MAC
    assert f["llm_attention"] == (15 + 6) * 16 * 4 * 2 * 2  # 5376
    assert f["lm_head"] == 2 * 64 * 40
    # vision: conv 4 patches × (3·14·14) × 32; per layer 5 tokens × (4·32² + 2·32·128) + 2 × 5² × 32 MACs
    conv = 2 * 4 * 588 * 32
    layer = 2 * 5 * (4 * 32 * 32 + 2 * 32 * 128) + 2 * 2 * 25 * 32
    assert f["vision"] == vision_flops(spec) == conv + 3 * layer == 528768
    assert f["projector"] == projector_flops(spec) == 2 * 4 * (32 * 64 + 64 * 64) == 49152
    assert f["total"] == 491520 + 5376 + 5120 + 528768 + 49152
    # batch scales everything
    f2 = prefill_flops(spec, [5, 3], batch=3)
    assert all(f2[k] == 3 * f[k] for k in f)
    assert prefill_flops(spec, [5, 3], include_vision=False)["total"] == 491520 + 5376 + 5120


def test_tiny_decode_by_hand() -> None:
    spec = _tiny_spec()
    d = decode_flops(spec, [5, 3], new_tokens=2)
    assert d["llm_linear"] == 2 * 2 * 2 * 30720  # layers × steps × 2 FLOPs × MACs per token
    # step 0 attends to c+1 keys, step 1 to c+2: layer 0 → 6+7, layer 1 → 4+5; 4·q_dim FLOPs per key
    assert d["llm_attention"] == (6 + 7 + 4 + 5) * 4 * 64
    assert d["lm_head"] == 2 * 2 * 64 * 40
    assert d["total"] == d["llm"] + d["lm_head"]
    assert decode_flops(spec, [5, 3], new_tokens=0)["total"] == 0


def test_tiny_fastv_convention_by_hand() -> None:
    spec = _tiny_spec()
    # n=5: 4·5·64² + 2·5²·64 + 2·5·64·96 = 81920 + 3200 + 61440; n=3: 49152 + 1152 + 36864
    assert fastv_convention_flops(spec, [5, 3]) == 146560 + 87168
    assert sparsevlm_convention_flops(spec, [5, 3]) == 146560 + 87168 + 5 * 64 * 96 + 3 * 64 * 96


def test_decode_matches_performance_md_formula() -> None:
    # per step: 2·P + 4·c·d·layers (+ LM head)
    c = 636
    d = decode_flops(LLAVA7B, c, new_tokens=1)
    p = LLAVA7B.llm_nonembedding_linear_params
    assert d["llm"] == 2 * p + 4 * (c + 1) * 4096 * 32


# ---------------------------------------------------------------------------------------------------------
# KV cache, bytes and roofline
# ---------------------------------------------------------------------------------------------------------


def test_kv_cache_bytes() -> None:
    assert kv_bytes_per_token(LLAVA7B) == 512 * 1024  # 0.5 MiB in fp16
    assert kv_cache_bytes(LLAVA7B, 576) == 576 * 512 * 1024  # 302 MB for one image
    assert _rel(kv_cache_bytes(LLAVA7B, 576), 302e6) < 0.001
    assert kv_cache_bytes(LLAVA7B, 576, batch=4) == 4 * kv_cache_bytes(LLAVA7B, 576)
    assert kv_cache_bytes(LLAVA7B, 576, dtype_bytes=4) == 2 * kv_cache_bytes(LLAVA7B, 576)
    # in-LLM methods keep full KV below K: FastV K=2, R=75% on the visual part
    per_layer = layer_tokens_for_stages(32, 0, 576, [(2, 144)])
    assert kv_cache_bytes(LLAVA7B, per_layer) == (2 * 576 + 30 * 144) * kv_bytes_per_token(LLAVA7B) // 32


def test_roofline_floors() -> None:
    weights = llm_weight_bytes(LLAVA7B)
    assert _rel(weights, 13.21e9) < 0.002
    f576 = prefill_flops(LLAVA7B, 636)
    assert roofline_floor_ms(f576["llm"] + f576["lm_head"], weights) == pytest.approx(10.6, abs=0.05)
    f64 = prefill_flops(LLAVA7B, 124)
    assert roofline_floor_ms(f64["llm"] + f64["lm_head"], weights) == pytest.approx(
        3.94, abs=0.01
    )  # weight-bound
    # decode, first step after a 636-token prefill: 13.21 GB + 0.33 GB of KV → 4.04 ms
    step = decode_step_bytes(LLAVA7B, 636)
    assert roofline_floor_ms(decode_flops(LLAVA7B, 636, 1)["total"], step) == pytest.approx(4.04, abs=0.01)
    peak, bw = HARDWARE["h200"]
    assert roofline_floor_ms(0, 4.8e9, peak, bw) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        roofline_floor_ms(1.0, 1.0, peak_tflops=0)


# ---------------------------------------------------------------------------------------------------------
# LLaVA-NeXT (AnyRes): tower inputs and LLM tokens of one image
# ---------------------------------------------------------------------------------------------------------


def test_next_672_image_is_5_crops_and_2928_tokens() -> None:
    work = image_work(NEXT7B)  # default 672 x 672: best pinpoint 672 x 672, 2 x 2 tiles, nothing unpadded
    assert work == ImageWork(crops=5, tokens=2928, size=(672, 672), tiles=(2, 2), tile_tokens=(48, 48))
    assert work.tokens == 576 + 48 * 48 + 48 and work.base_tokens == 576
    assert work.describe() == (
        "672x672 image: 5 tower inputs (base view + 2x2 tiles), 2928 tokens = 576 base + 48x48 tiles + 48 newlines"
    )
    # a wide image takes the 336 x 1008 pinpoint (1 x 3 tiles) and is unpadded to 24 rows of 72 patches
    assert image_work(NEXT7B, (300, 900)) == ImageWork(4, 576 + 24 * 72 + 24, (300, 900), (1, 3), (24, 72))
    assert image_work(LLAVA7B) == ImageWork(crops=1, tokens=576)


@pytest.mark.parametrize(
    "size", [(672, 672), (600, 300), (400, 500), (336, 336), (1, 1), (20, 3000), (3000, 20), (719, 1283)]
)
def test_image_work_matches_the_llava_next_model_file(size: tuple[int, int]) -> None:
    """The arithmetic equals transformers' own tiling (image_size_to_num_patches) and unpadding (unpad_image)."""
    pinpoints = [list(p) for p in NEXT7B.image_grid_pinpoints]
    crops = modeling_llava_next.image_size_to_num_patches(size, pinpoints, 336)
    rows, cols = modeling_llava_next.get_anyres_image_grid_shape(size, pinpoints, 336)
    grid = modeling_llava_next.unpad_image(torch.zeros(1, rows * 24, cols * 24), torch.tensor(size))
    work = image_work(NEXT7B, size)
    assert (work.crops, work.tokens) == (crops, 576 + grid.shape[1] * grid.shape[2] + grid.shape[1])


def test_image_work_refuses_bad_sizes() -> None:
    with pytest.raises(ValueError, match="AnyRes"):
        image_work(LLAVA7B, (672, 672))
    for bad in [(0, 672), (672, -1), (672,), (672.0, 672)]:
        with pytest.raises(ValueError, match="positive"):
            image_work(NEXT7B, bad)


def test_next_7b_prefill_runs_the_tower_on_every_crop() -> None:
    layer_tokens = layer_tokens_for_stages(32, TEXT, 2928, [(0, 640)])
    f = prefill_flops(NEXT7B, layer_tokens, crops=5)
    one = prefill_flops(LLAVA7B, layer_tokens)  # the same LLM work on the same tokens, one crop
    assert f["vision"] == 5 * vision_flops(NEXT7B) == 5 * one["vision"]
    assert f["projector"] == projector_flops(NEXT7B, 5 * 576) == 5 * one["projector"]
    assert (f["llm"], f["lm_head"]) == (one["llm"], one["lm_head"])
    assert _rel((f["vision"] + f["projector"]) / 1e12, 5 * 0.405) < 0.01  # ≈2.03 TFLOP whatever the budget
    unpruned = prefill_flops(NEXT7B, TEXT + 2928, crops=5)
    # 2 × 6.476e9 × 2988 linear (38.70 T) + causal attention 2 × 4096 × 2988 × 2989 × 32 (2.34 T) + 5 crops
    # (2.03 T): 43.07 TFLOP per sample, 4.9x the 8.75 T of LLaVA-1.5-7B at 576 tokens
    assert _rel(unpruned["llm_attention"] / 1e12, 2.34) < 0.005
    assert _rel(unpruned["total"] / 1e12, 43.07) < 0.001
    assert kv_cache_bytes(NEXT7B, TEXT + 2928) == (TEXT + 2928) * 512 * 1024  # 1.57 GB per sample


def test_tiny_next_by_hand() -> None:
    """The tiny LLaVA-NeXT (56 px crops of 4 x 4 patches, pinpoints 56x112, 112x56, 112x112), counted by hand."""
    model, _ = make_tiny_llava_next()
    spec = ArchSpec.from_config(model.config, name="tiny-next")
    assert spec.image_grid_pinpoints == ((56, 112), (112, 56), (112, 112)) and spec.default_image_size == (112, 112)
    assert spec.param_counts()["total"] == sum(p.numel() for p in model.parameters())
    # 112 x 112: 2 x 2 tiles + the base view = 5 crops; 16 base + 8 x 8 tile patches + 8 newlines = 88 tokens
    assert image_work(spec) == ImageWork(5, 88, (112, 112), (2, 2), (8, 8))
    # the test_llava_next images: 60 x 120 (h x w) -> 1 x 2 tiles, 16 + 4 x 8 + 4 = 52; 100 x 80 -> unpadded
    # from 8 x 8 to 8 x 6 columns, 16 + 48 + 8 = 72
    assert (image_work(spec, (60, 120)).crops, image_work(spec, (60, 120)).tokens) == (3, 52)
    assert image_work(spec, (100, 80)).tile_tokens == (8, 6) and image_work(spec, (100, 80)).tokens == 72
    # one crop: conv 16 patches x (3·14·14) x 32; per layer 17 tokens x (4·32² + 2·32·128) + 2 × 17² × 32 MACs
    conv = 2 * 16 * 588 * 32
    layer = 2 * 17 * (4 * 32 * 32 + 2 * 32 * 128) + 2 * 2 * 17 * 17 * 32
    assert vision_flops(spec) == conv + 3 * layer == 1_966_464
    f = prefill_flops(spec, 60 + 88, crops=5)
    assert f["vision"] == 5 * 1_966_464
    assert f["projector"] == 2 * (5 * 16) * (32 * 64 + 64 * 64)  # every crop's 16 patches, before unpadding
    # LLM: 4 layers of 148 tokens, 4·64² + 3·64·192 MACs per token; causal attention 148·149/2 keys × 64
    assert f["llm_linear"] == 4 * 2 * 148 * (4 * 64 * 64 + 3 * 64 * 192)
    assert f["llm_attention"] == 4 * 2 * 64 * 148 * 149
    assert kv_cache_bytes(spec, 60 + 88, dtype_bytes=4) == 4 * 2 * 148 * 64 * 4
