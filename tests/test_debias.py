"""Recency debiasing and sink masking (docs/methods/attention_options.md)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtprune.signals.debias import (
    EXCLUDED_SCORE,
    PADDING_THRESHOLDS,
    RECENCY_LAMBDA,
    RECENCY_LAMBDA_DEFAULT,
    Debias,
    DebiasContext,
    apply_sink_mask,
    attention_mass_sinks,
    fit_recency,
    massive_activation_sinks,
    norm_outlier_sinks,
    padding_patch_mask,
    padding_threshold,
    recency_debias,
    recency_lambda,
    recency_weights,
    rms_normalize,
)


def topk_sorted(scores: torch.Tensor, k: int) -> list[int]:
    """Stable top-k (ties: lower index), returned in raster order."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


# ---------------------------------------------------------------- recency weights


def test_spec_example_2_positional_debiasing():
    """Hand-computed: s = [0.10, 0.12, 0.30, 0.48], w_i = 2^-i."""
    s = torch.tensor([0.10, 0.12, 0.30, 0.48])
    w = recency_weights(4, "exp", lam=math.log(2.0))
    torch.testing.assert_close(w, torch.tensor([1.0, 0.5, 0.25, 0.125]))
    debiased = recency_debias(s, w)
    torch.testing.assert_close(debiased, torch.tensor([0.100, 0.060, 0.075, 0.060]))
    assert topk_sorted(s, 2) == [2, 3]
    assert topk_sorted(debiased, 2) == [0, 2]
    # the same through the option object (one 2x2 image, raw indices)
    opt = Debias(recency=True, recency_kind="exp", recency_lambda=math.log(2.0), recency_ref_n=None)
    out = opt.apply(s[None], DebiasContext(grid=2))
    torch.testing.assert_close(out[0], debiased)


def test_fastv_cubic_weights():
    w = recency_weights(576, "cubic")
    assert w[0] == 1.0
    # 1/w_100 = 1 + 0.30152 - 0.14598 + 0.025691
    assert float(1 / w[100]) == pytest.approx(1.181231, rel=1e-5)
    assert float(w[575]) == pytest.approx(0.358, abs=1e-3)  # FastV's released weights
    assert bool((w[1:] < w[:-1]).all())  # monotone decreasing


def test_exp_weights_from_table():
    lam = RECENCY_LAMBDA["pdrop"]["gqa"]
    assert lam == pytest.approx(3.989e-3)
    w = recency_weights(576, "exp", method="PyramidDrop", benchmark="GQA")
    torch.testing.assert_close(w, torch.exp(-lam * torch.arange(576, dtype=torch.float64)).float())
    # σ ≈ 575 λ: the last token of PDrop-GQA is divided by ≈ 10
    assert float(1 / w[575]) == pytest.approx(math.exp(575 * 3.989e-3), rel=1e-5)


def test_lambda_table_lookup_and_defaults():
    assert recency_lambda("SparseVLM", "MMB-CN") == pytest.approx(2.599e-3)
    assert recency_lambda("himap", "mm-vet") == pytest.approx(1.703e-3)
    assert recency_lambda("TokenCarve", "ScienceQA") == pytest.approx(1.180e-3)
    assert set(RECENCY_LAMBDA) == {"pdrop", "sparsevlm", "himap", "tokencarve"}
    assert all(len(v) == 10 for v in RECENCY_LAMBDA.values())
    mean_pdrop = sum([3.989, 2.652, 2.597, 3.266, 4.134, 4.051, 2.698, 3.147, 2.519, 3.756]) / 10 * 1e-3
    assert RECENCY_LAMBDA_DEFAULT["pdrop"] == pytest.approx(mean_pdrop)
    assert recency_lambda("pdrop") == pytest.approx(mean_pdrop)
    with pytest.raises(KeyError):
        recency_lambda("fastv")
    with pytest.raises(KeyError):
        recency_lambda("pdrop", "imagenet")


def test_strength_interpolates_exponent():
    w1 = recency_weights(16, "exp", lam=0.1)
    wh = recency_weights(16, "exp", 0.5, lam=0.1)
    torch.testing.assert_close(wh, w1.sqrt())
    assert torch.equal(recency_weights(16, "cubic", 0.0), torch.ones(16))
    with pytest.raises(ValueError):
        recency_weights(16, "exp", -1.0, lam=0.1)


def test_ref_n_rescales_index():
    w = recency_weights(64, "exp", lam=0.01, ref_n=576)
    torch.testing.assert_close(w, torch.exp(-0.01 * 9.0 * torch.arange(64.0)))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0, allow_nan=False, width=32), min_size=1, max_size=12),
    st.sampled_from(["exp", "cubic", "fit"]),
)
def test_zero_strength_is_identity(values, kind):
    s = torch.tensor([values], dtype=torch.float32)
    n = s.shape[-1]
    w = recency_weights(n, kind, lam=0.3, sigma=2.0)
    assert torch.equal(recency_debias(s, w, strength=0.0), s)
    assert torch.equal(recency_debias(s, recency_weights(n, kind, 0.0, lam=0.3, sigma=2.0)), s)
    assert torch.equal(recency_debias(s, (1.0, 2.0), strength=0.0), s)
    assert torch.equal(Debias(recency=0.0).apply(s), s)
    assert torch.equal(Debias().apply(s), s)


def test_fit_recency_recovers_exponential_and_flattens():
    n = 576
    x = torch.arange(n, dtype=torch.float64) / n
    mean_scores = 2.0 * torch.exp(1.5 * x)
    mu, sigma = fit_recency(mean_scores)
    assert mu == pytest.approx(2.0, rel=1e-9)
    assert sigma == pytest.approx(1.5, rel=1e-9)
    # leading dims are averaged; zeros / invalid tokens are left out of the fit
    noisy = torch.stack([mean_scores * 0.5, mean_scores * 1.5])
    noisy[:, 3] = 0.0
    assert fit_recency(noisy) == pytest.approx((2.0, 1.5), rel=1e-9)
    # debiasing with the fit makes the calibration curve flat (= mu, since w_0 = 1)
    flat = recency_debias(mean_scores.float()[None], (mu, sigma))
    torch.testing.assert_close(flat, torch.full((1, n), 2.0), rtol=1e-5, atol=1e-5)
    # λ of the released files corresponds to σ = λ N
    lam = 3e-3
    _, s2 = fit_recency(torch.exp(lam * torch.arange(n, dtype=torch.float64)))
    assert s2 == pytest.approx(lam * n, rel=1e-9)


def test_weights_tile_over_images_and_head_resolved_scores():
    w = torch.tensor([1.0, 0.5])
    s = torch.ones(2, 3, 4)  # (B, H, N) with two 2-token images
    out = recency_debias(s, w)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.5, 1.0, 0.5]).expand(2, 3, 4))
    with pytest.raises(ValueError):
        recency_debias(torch.ones(1, 5), w)


# ---------------------------------------------------------------- padding


def test_padding_mask_2to1_wide_image():
    # w = 2h: valid band 168 px centred -> [84, 252) = rows 6..17; rows 0..5 and 18..23 are padding
    m = padding_patch_mask(torch.tensor([[672, 336]]), grid=24, image_size=336)
    assert m.shape == (1, 576)
    grid = m.view(24, 24)
    expected_rows = torch.tensor([r < 6 or r >= 18 for r in range(24)])
    assert torch.equal(grid, expected_rows[:, None].expand(24, 24))
    assert int((~m).sum()) == 12 * 24


def test_padding_mask_tall_square_and_threshold():
    tall = padding_patch_mask([[300, 600]]).view(24, 24)
    cols = torch.tensor([c < 6 or c >= 18 for c in range(24)])
    assert torch.equal(tall, cols[None, :].expand(24, 24))
    assert not padding_patch_mask([[500, 500]]).any()
    # 16:9: band 189 px, edges at 73.5 and 262.5 -> rows 5 and 18 are 25% padding
    m05 = padding_patch_mask([[1600, 900]], threshold=0.5).view(24, 24)[:, 0]
    m001 = padding_patch_mask([[1600, 900]], threshold=0.01).view(24, 24)[:, 0]
    assert m05.nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 19, 20, 21, 22, 23]
    assert m001.nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 18, 19, 20, 21, 22, 23]


def test_padding_mask_batched_and_multi_image():
    sizes = torch.tensor([[672, 336], [336, 336], [300, 600]])
    batched = padding_patch_mask(sizes)
    for i in range(3):
        assert torch.equal(batched[i], padding_patch_mask(sizes[i : i + 1])[0])
    multi = padding_patch_mask(sizes[None, :2])  # one sample with two images
    assert multi.shape == (1, 2 * 576)
    assert torch.equal(multi[0], torch.cat([batched[0], batched[1]]))
    small = padding_patch_mask([[40, 20]], grid=4, image_size=56).view(4, 4)
    assert small[:, 0].tolist() == [True, False, False, True]


# ---------------------------------------------------------------- sinks


def test_massive_activation_phi_rule():
    d = 1024
    hidden = torch.ones(2, 3, d)
    hidden[0, 1, 7] = 1000.0  # a visual sink in channel 7 of sample 0
    # φ = 1000 / sqrt((1000² + 1023) / 1024) ≈ 31.98 > 20; every other token has |RMSNorm(x)| = 1
    phi = float(rms_normalize(hidden)[0, 1, 7])
    assert phi == pytest.approx(1000 / math.sqrt((1000**2 + 1023) / 1024 + 1e-6), rel=1e-5)
    expected = torch.tensor([[False, True, False], [False, False, False]])
    assert torch.equal(massive_activation_sinks(hidden, dims=[7, 100]), expected)
    assert not massive_activation_sinks(hidden, dims=[3]).any()
    assert torch.equal(massive_activation_sinks(hidden, dims=None), expected)  # channel detected from data
    assert not massive_activation_sinks(hidden, dims=[7], tau=40.0).any()


def test_attention_mass_and_norm_sinks():
    cls = torch.tensor([[0.01, 0.03, 0.02, 0.5]])
    assert attention_mass_sinks(cls, 0.02).tolist() == [[False, True, False, True]]  # strictly above
    per_head = torch.tensor([[[0.0, 0.04, 0.0], [0.0, 0.0, 0.0]]])  # head mean = [0, 0.02, 0]
    assert not attention_mass_sinks(per_head, 0.02).any()
    feats = torch.zeros(1, 5, 2)
    feats[0, :, 0] = torch.tensor([1.0, 1.0, 1.0, 1.0, 9.0])  # norms 1,1,1,1,9
    assert norm_outlier_sinks(feats, ratio=0.2).tolist() == [[False, False, False, False, True]]
    # mean 2.6, population std 3.2: z of the outlier = 2.0
    assert norm_outlier_sinks(feats, ratio=None, z=1.9).tolist() == [[False, False, False, False, True]]
    assert not norm_outlier_sinks(feats, ratio=None, z=2.1).any()


def test_apply_sink_mask_modes():
    s = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    m = torch.tensor([[True, False, False, True]])
    excluded = apply_sink_mask(s, m, "exclude")
    assert excluded[0, 0] == EXCLUDED_SCORE and excluded[0, 3] == EXCLUDED_SCORE
    assert torch.isfinite(excluded).all() and torch.equal(excluded[0, 1:3], s[0, 1:3])
    assert topk_sorted(apply_sink_mask(s, m, "exclude")[0], 2) == [1, 2]
    torch.testing.assert_close(apply_sink_mask(s, m, "zero"), torch.tensor([[0.0, 0.3, 0.2, 0.0]]))
    torch.testing.assert_close(
        apply_sink_mask(s, m, "downweight", 0.5), torch.tensor([[0.2, 0.3, 0.2, 0.05]])
    )
    head_resolved = apply_sink_mask(s[:, None].expand(1, 2, 4), m, "zero")
    torch.testing.assert_close(head_resolved, torch.tensor([0.0, 0.3, 0.2, 0.0]).expand(1, 2, 4))
    with pytest.raises(ValueError):
        apply_sink_mask(s, m, "drop")  # type: ignore[arg-type]


# ---------------------------------------------------------------- the option object


def test_debias_composes_recency_then_padding():
    # one 4x4 image of aspect 2:1 -> rows 0 and 3 are padding; λ = ln 2 on raw indices
    scores = torch.arange(1, 17, dtype=torch.float32)[None] / 100
    ctx = DebiasContext(image_sizes=[[80, 40]], grid=4, image_size=56)
    opt = Debias(
        recency=True,
        recency_lambda=math.log(2.0),
        recency_ref_n=None,
        sink=True,
        sink_sources=("padding",),
        sink_mode="zero",
    )
    out, mask = opt.apply(scores, ctx, return_mask=True)
    expected = scores * 2.0 ** -torch.arange(16.0)
    pad = torch.tensor([r in (0, 3) for r in range(4) for _ in range(4)])
    expected[0, pad] = 0.0
    torch.testing.assert_close(out, expected)
    assert torch.equal(mask[0], pad)
    assert int((~mask).sum()) == 8  # what a FastV-style caller caps keep at


def test_debias_from_spec_and_auto_kind():
    fastv = Debias.from_spec(["recency", "sink"], method="fastv")
    # "sink" is the released patches' padding step only (issue 20; it used to enable all four sources)
    assert fastv.strength == 1.0 and fastv.sink and fastv.sink_sources == ("padding",)
    assert fastv.resolved_recency() == ("cubic", {})
    pdrop = Debias.from_spec("recency", method="pdrop", benchmark="pope")
    assert pdrop.resolved_recency() == ("exp", {"lam": pytest.approx(4.051e-3)})
    assert Debias.from_spec("recency", method="illava").resolved_recency()[0] == "cubic"
    assert Debias.from_spec(["padding"]).sink_sources == ("padding",)
    assert Debias.from_spec({"recency": 0.5}).strength == 0.5
    assert not Debias.from_spec(None).enabled
    # at 576 tokens the option's weights are exactly the released ones
    torch.testing.assert_close(pdrop.recency_weights(576), recency_weights(576, "exp", lam=4.051e-3))
    # a smaller grid maps onto the calibrated 576-token curve
    torch.testing.assert_close(fastv.recency_weights(64), recency_weights(64, "cubic", ref_n=576))


def test_debias_validation_and_missing_context():
    with pytest.raises(ValueError):
        Debias(recency=-0.5)
    with pytest.raises(ValueError):
        Debias(recency=True, recency_kind="exp")  # no λ and no method
    with pytest.raises(ValueError):
        Debias(recency_kind="fit")
    with pytest.raises(ValueError):
        Debias(sink_sources=("bogus",))
    with pytest.raises(ValueError):
        Debias.from_spec(["recency", "nope"])
    with pytest.raises(KeyError):
        Debias(benchmark="imagenet")
    with pytest.raises(ValueError, match="needs one of the context fields"):
        Debias(sink=True).apply(torch.ones(1, 576), DebiasContext())
    with pytest.raises(ValueError):
        DebiasContext.coerce({"hiddens": None})


def test_debias_multi_image_and_sources_union():
    n = 16
    scores = torch.full((1, 2 * n), 0.5)
    cls = torch.zeros(1, 2 * n)
    cls[0, 5] = 0.1  # a [CLS]-attention sink in image 0
    ctx = {"image_sizes": [[[40, 80], [40, 40]]], "cls_attention": cls, "grid": 4, "image_size": 56}
    opt = Debias(
        recency=True, recency_lambda=0.5, recency_ref_n=None, sink=True, sink_sources=("padding", "attention")
    )
    out, mask = opt.apply(scores, ctx, return_mask=True)
    w = torch.exp(-0.5 * torch.arange(float(n)))
    expected = 0.5 * torch.cat([w, w])
    pad = torch.tensor([c in (0, 3) for _ in range(4) for c in range(4)] + [False] * n)  # tall image: columns
    sink = pad.clone()
    sink[5] = True
    assert torch.equal(mask[0], sink)
    expected[sink] = EXCLUDED_SCORE
    torch.testing.assert_close(out[0], expected)


def test_debias_batched_equals_per_sample():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 576, generator=g)
    hidden = torch.randn(3, 576, 64, generator=g)
    sizes = torch.tensor([[640, 480], [480, 640], [500, 500]])
    opt = Debias.from_spec(["recency", "padding", "massive"], method="sparsevlm", benchmark="gqa")
    out = opt.apply(scores, {"image_sizes": sizes, "hidden": hidden})
    for i in range(3):
        one = opt.apply(scores[i : i + 1], {"image_sizes": sizes[i : i + 1], "hidden": hidden[i : i + 1]})
        assert torch.equal(out[i], one[0])
    json.dumps(repr(opt))  # the option prints (records store its repr)


# ---------------------------------------------------------------- what the released patches do (issue 20)


def test_sink_means_the_released_padding_step_only():
    """`debias=["recency", "sink"]` = the released patches of intcomp/attention-bias @ e75ebe7
    (patches/FastV.patch, PyramidDrop.patch, SparseVLMs.patch, HiMAP.patch, TokenCarve.patch): the sink
    step multiplies the score by the 0/1 padding mask and does nothing else. The other detectors stay
    reachable by name."""
    n = 16
    scores = torch.full((1, n), 0.5)
    hidden = torch.ones(1, n, 1024)
    hidden[0, 6, 3] = 1000.0  # a massive activation (Kang et al.'s φ rule): φ ≈ 32 > 20
    cls = torch.zeros(1, n)
    cls[0, 9] = 0.5  # a [CLS]-attention sink (vispruner_nosink's threshold)
    feats = torch.ones(1, n, 4)
    feats[0, 12] *= 10.0  # a high-norm vision feature
    ctx = DebiasContext(
        image_sizes=[[80, 40]], hidden=hidden, cls_attention=cls, vision_features=feats, grid=4, image_size=56
    )
    padding = torch.tensor([r in (0, 3) for r in range(4) for _ in range(4)])  # 2:1 image: rows 0 and 3
    _, mask = Debias.from_spec(["recency", "sink"], method="fastv").apply(scores, ctx, return_mask=True)
    assert torch.equal(mask[0], padding)
    assert torch.equal(Debias.from_spec("padding").apply(scores, ctx, return_mask=True)[1][0], padding)
    for name, token in (("massive", 6), ("attention", 9), ("norm", 12)):
        _, mask = Debias.from_spec(["sink", name]).apply(scores, ctx, return_mask=True)
        expected = padding.clone()
        expected[token] = True
        assert torch.equal(mask[0], expected), name
        assert Debias.from_spec([name]).sink_sources == (name,)
    assert Debias(sink=True).sink_sources == ("padding",)


def test_padding_threshold_of_each_released_patch():
    """intcomp/attention-bias @ e75ebe7: `generate_pad_mask(..., threshold=0.01)` in patches/PyramidDrop.patch,
    `threshold=0.5` in patches/FastV.patch, HiMAP.patch and TokenCarve.patch; SparseVLMs.patch keeps the
    bilinear-resized validity mask >= 0.5 (the 0.5 rule). A method without a patch takes 0.5."""
    assert PADDING_THRESHOLDS == {"fastv": 0.5, "himap": 0.5, "tokencarve": 0.5, "sparsevlm": 0.5, "pdrop": 0.01}
    assert padding_threshold("PyramidDrop") == 0.01 and padding_threshold("illava") == 0.5
    assert padding_threshold(None) == 0.5
    # 16:9 on 24x24 patches: the valid band is 189 px, its edges at 73.5 and 262.5 px, so patch rows 5 and
    # 18 are 25% padding: padding for PDrop's patch, not for FastV's
    sizes = [[1600, 900]]
    scores = torch.ones(1, 576)
    # the same geometry as a measured padding fraction: 1 on rows 0-4 and 19-23, 0.25 on rows 5 and 18
    fraction = padding_patch_mask(sizes, threshold=0.0).float()
    fraction[0, 5 * 24 : 6 * 24] = 0.25
    fraction[0, 18 * 24 : 19 * 24] = 0.25
    rows = {}
    for method in ("fastv", "pdrop", "himap", "tokencarve", "sparsevlm", "illava"):
        option = Debias.from_spec(["sink"], method=method)
        _, mask = option.apply(scores, {"image_sizes": sizes}, return_mask=True)
        rows[method] = mask[0].view(24, 24)[:, 0].nonzero().flatten().tolist()
        _, measured = option.apply(scores, {"padding_fraction": fraction}, return_mask=True)
        assert torch.equal(measured, mask), method
    assert rows["pdrop"] == [0, 1, 2, 3, 4, 5, 18, 19, 20, 21, 22, 23]
    for method in ("fastv", "himap", "tokencarve", "sparsevlm", "illava"):
        assert rows[method] == [0, 1, 2, 3, 4, 19, 20, 21, 22, 23], method
    # an explicit threshold wins over the method's
    assert Debias.from_spec({"sink": True, "padding_threshold": 0.3}, method="pdrop").padding_threshold == 0.3
