"""Score modifiers for attention-based token rankings: positional (recency) debiasing and sink masking.

Attention debiasing after Zhao et al., "Attention Debiasing for Token Pruning in Vision-Language Models"
(arXiv 2508.17807, repo ``intcomp/attention-bias``); the options are documented in
docs/methods/attention_options.md. Every function here is pure and batched: it takes a
score tensor whose last dimension runs over the N visual tokens of a sample (in raster order of a ``grid``,
several images = N a multiple of the grid size) and returns a new tensor or a boolean mask over those tokens.
Scores are handled in float32 (float64 is kept); nothing synchronises with the host except the offline
calibration helper :func:`fit_recency`.

Two corrections, composed in the paper's order (positional first, then sinks / padding):

* **recency** — text→image attention grows roughly exponentially with the image-token index. The debiased
  score is ``w_i ** strength * a_i`` with ``w`` from the released per-method λ (``w_i = exp(-λ i)``),
  FastV's cubic (``1 / w_i = 1 + 3.0152e-3 i - 1.4598e-5 i² + 2.5691e-8 i³``) or a fit
  ``f(x) = μ e^{σx}`` of calibration scores (``w_i = e^{-σ x_i}``, ``x_i = i / N``).
* **sinks** — tokens whose score is inflated independently of content. ``"sink"`` means what the released
  patches of ``intcomp/attention-bias`` (@ e75ebe7, ``patches/*.patch``) do: the padding patches of
  pad-to-square images are masked out of the score, with the patch's own padding threshold
  (:data:`PADDING_THRESHOLDS`). Other sources are vtprune additions, opt-in by name: visual attention sinks
  with massive activations (``"massive"``; Kang et al., "See What You Are Told: Visual Attention Sink in
  Large Multimodal Models", arXiv 2503.03321), [CLS]-attention outliers (``"attention"``, the threshold of
  ``vispruner_nosink``) and high-norm vision features (``"norm"``; Darcet et al., "Vision Transformers Need
  Registers", arXiv 2309.16588). Each detector returns a ``(B, N)`` bool mask
  (True = sink); :func:`apply_sink_mask` excludes, zeroes or down-weights them.

:class:`Debias` bundles both as one validated option that any attention-based method can apply.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import torch

__all__ = [
    "BENCHMARKS",
    "EXCLUDED_SCORE",
    "FASTV_CUBIC",
    "LLAMA2_SINK_DIMS",
    "PADDING_THRESHOLDS",
    "RECENCY_LAMBDA",
    "RECENCY_LAMBDA_DEFAULT",
    "Debias",
    "DebiasContext",
    "apply_sink_mask",
    "attention_mass_sinks",
    "fit_recency",
    "massive_activation_sinks",
    "norm_outlier_sinks",
    "padding_patch_mask",
    "padding_threshold",
    "recency_debias",
    "recency_lambda",
    "recency_weights",
    "rms_normalize",
]

# --------------------------------------------------------------------------------------------------------
# Positional (recency) debiasing
# --------------------------------------------------------------------------------------------------------

#: Benchmarks of the released weight files (intcomp/attention-bias @ e75ebe7).
BENCHMARKS: tuple[str, ...] = (
    "gqa",
    "mmb",
    "mmb_cn",
    "mme",
    "mm_vet",
    "pope",
    "sqa",
    "textvqa",
    "vizwiz",
    "vqav2",
)

_LAMBDA_E3: dict[str, tuple[float, ...]] = {
    # λ·10³ per benchmark (order of BENCHMARKS), read from the released .npy files (@ e75ebe7).
    "pdrop": (3.989, 2.652, 2.597, 3.266, 4.134, 4.051, 2.698, 3.147, 2.519, 3.756),
    "sparsevlm": (2.301, 3.196, 2.599, 3.803, 4.225, 4.637, 2.992, 3.148, 2.742, 4.121),
    "himap": (2.172, 1.609, 1.480, 2.041, 1.703, 2.253, 1.707, 1.479, 1.971, 2.214),
    "tokencarve": (1.668, 1.295, 1.113, 1.470, 1.697, 1.715, 1.180, 1.180, 1.431, 1.697),
}

#: ``RECENCY_LAMBDA[method][benchmark]`` = λ of the released exponential weights ``w_i = exp(-λ i)``.
RECENCY_LAMBDA: dict[str, dict[str, float]] = {
    method: {b: v * 1e-3 for b, v in zip(BENCHMARKS, values, strict=True)}
    for method, values in _LAMBDA_E3.items()
}

#: Per-method default when the benchmark is unknown: the mean λ over the ten benchmarks (a vtprune choice;
#: the released code always loads a benchmark-specific file).
RECENCY_LAMBDA_DEFAULT: dict[str, float] = {
    method: sum(table.values()) / len(table) for method, table in RECENCY_LAMBDA.items()
}

#: Coefficients (c1, c2, c3) of FastV's released multiplier: 1 / w_i = 1 + c1 i + c2 i² + c3 i³ ("spline_weight").
FASTV_CUBIC: tuple[float, float, float] = (3.0152e-3, -1.4598e-5, 2.5691e-8)

#: Number of visual tokens per image the released weights were calibrated on (LLaVA-1.5, 24×24).
CALIBRATION_TOKENS = 576

_METHOD_ALIASES = {
    "pdrop": "pdrop",
    "pyramiddrop": "pdrop",
    "sparsevlm": "sparsevlm",
    "sparsevlmv15": "sparsevlm",
    "sparsevlmv1": "sparsevlm",
    "himap": "himap",
    "tokencarve": "tokencarve",
    "fastv": "fastv",
}

_BENCHMARK_ALIASES = {
    "gqa": "gqa",
    "mmb": "mmb",
    "mmbench": "mmb",
    "mmben": "mmb",
    "mmbenchen": "mmb",
    "mmbcn": "mmb_cn",
    "mmbenchcn": "mmb_cn",
    "mme": "mme",
    "mmvet": "mm_vet",
    "pope": "pope",
    "sqa": "sqa",
    "scienceqa": "sqa",
    "scienceqaimg": "sqa",
    "sqaimg": "sqa",
    "textvqa": "textvqa",
    "vizwiz": "vizwiz",
    "vqav2": "vqav2",
}


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _canonical_method(method: str) -> str:
    return _METHOD_ALIASES.get(_key(method), _key(method))


def _canonical_benchmark(benchmark: str) -> str:
    key = _key(benchmark)
    if key not in _BENCHMARK_ALIASES:
        raise KeyError(f"unknown benchmark {benchmark!r} for recency λ; known: {', '.join(BENCHMARKS)}")
    return _BENCHMARK_ALIASES[key]


def recency_lambda(method: str, benchmark: str | None = None) -> float:
    """λ of the released exponential weights for ``method``; mean over benchmarks if ``None``.

    Method names are matched loosely (``"PyramidDrop"``, ``"pdrop"``; ``"SparseVLM"``), as are benchmark
    names (``"MMB-CN"``, ``"mmbench_cn"``, ``"ScienceQA"``). FastV has no λ (its weights are a cubic).
    """
    key = _canonical_method(method)
    if key not in RECENCY_LAMBDA:
        raise KeyError(
            f"no released exponential recency weights for method {method!r}; "
            f"known: {', '.join(RECENCY_LAMBDA)} (FastV uses kind='cubic')"
        )
    if benchmark is None:
        return RECENCY_LAMBDA_DEFAULT[key]
    return RECENCY_LAMBDA[key][_canonical_benchmark(benchmark)]


RecencyKind = Literal["exp", "cubic", "fit"]


def recency_weights(
    n: int,
    kind: RecencyKind = "exp",
    strength: float = 1.0,
    *,
    lam: float | None = None,
    sigma: float | None = None,
    method: str | None = None,
    benchmark: str | None = None,
    ref_n: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-token recency multipliers ``w ** strength`` of shape ``(n,)`` (float32).

    ``kind``:

    * ``"exp"``: ``w_i = exp(-λ t_i)``; λ is ``lam`` or, if ``None``, :func:`recency_lambda(method, benchmark)`.
    * ``"cubic"``: FastV's released file, ``1 / w_i = 1 + 3.0152e-3 t_i - 1.4598e-5 t_i² + 2.5691e-8 t_i³``
      (monotone; ``w_575 ≈ 0.358``).
    * ``"fit"``: ``w_i = exp(-σ x_i)`` with ``x_i = t_i / n`` and σ from :func:`fit_recency` (the μ of the fit
      only rescales all scores and is dropped, so ``w_0 = 1`` as in the released files).

    ``t_i = i`` by default. With ``ref_n`` set, indices are rescaled to the calibration length,
    ``t_i = i · ref_n / n``, so that a curve fitted on ``ref_n`` tokens (576 for the released λ and cubic)
    spans the same image rows on a model with another token count. ``strength`` interpolates between no
    correction (0: all ones) and the full correction (1); values above 1 over-correct.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    t = torch.arange(n, dtype=torch.float64, device=device)
    if ref_n is not None:
        if ref_n < 1:
            raise ValueError(f"ref_n must be >= 1, got {ref_n}")
        t = t * (ref_n / n)
    if kind == "exp":
        if lam is None:
            if method is None:
                raise ValueError("kind='exp' needs lam= or method= (to look up the released λ)")
            lam = recency_lambda(method, benchmark)
        log_w = -lam * t
    elif kind == "cubic":
        c1, c2, c3 = FASTV_CUBIC
        log_w = -torch.log(1.0 + c1 * t + c2 * t**2 + c3 * t**3)
    elif kind == "fit":
        if sigma is None:
            raise ValueError("kind='fit' needs sigma= (from fit_recency)")
        log_w = -sigma * (t / (ref_n if ref_n is not None else n))
    else:
        raise ValueError(f"unknown recency kind {kind!r}; expected 'exp', 'cubic' or 'fit'")
    return torch.exp(strength * log_w).to(torch.float32)


def fit_recency(mean_scores: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[float, float]:
    """Least-squares fit of ``f(x) = μ e^{σx}``, ``x = i / N``, to calibration scores (the paper's fit).

    ``mean_scores``: ``(N,)`` mean score per token position over a calibration set (leading dimensions, if
    any, are averaged first). The fit is linear least squares on ``log ā_i = log μ + σ x_i`` over the tokens
    with a positive score (and ``valid``, if given, e.g. excluding padding patches). Returns Python floats
    ``(mu, sigma)``; σ > 0 means later tokens are favoured. ``σ = λ·N`` relates it to the released λ.
    This is an offline calibration step, so it returns host values.
    """
    s = mean_scores.detach().to(torch.float64)
    if s.dim() == 0:
        raise ValueError("mean_scores must have a token dimension")
    if s.dim() > 1:
        s = s.reshape(-1, s.shape[-1]).mean(0)
    n = s.shape[-1]
    ok = s > 0
    if valid is not None:
        ok = ok & valid.reshape(-1, n).all(0).to(ok.device)
    if int(ok.sum()) < 2:
        raise ValueError("fit_recency needs at least two positive scores")
    x = (torch.arange(n, dtype=torch.float64, device=s.device) / n)[ok]
    y = torch.log(s[ok])
    xm, ym = x.mean(), y.mean()
    sigma = ((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum()
    log_mu = ym - sigma * xm
    return float(torch.exp(log_mu)), float(sigma)


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t.float()


def recency_debias(
    scores: torch.Tensor,
    weights: torch.Tensor | tuple[float, float],
    strength: float = 1.0,
) -> torch.Tensor:
    """Debiased scores ``scores · w ** strength``; tests/test_debias.py has a hand-computed case.

    ``scores``: ``(..., N)``. ``weights``: a ``(n,)`` tensor of multipliers with ``N`` a multiple of ``n``
    (one image's weights are tiled over the images of a multi-image sample), or a fitted ``(mu, sigma)``
    pair, which means ``w_i = e^{-σ i / N}`` (μ dropped, see :func:`recency_weights`). ``strength = 0``
    returns the scores unchanged.
    """
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    out = _float(scores)
    if strength == 0:
        return out.clone()
    n_tok = out.shape[-1]
    if isinstance(weights, tuple):
        _, sigma = weights
        w = recency_weights(n_tok, "fit", sigma=float(sigma), device=out.device)
    else:
        w = weights.to(device=out.device, dtype=out.dtype)
        if w.dim() != 1 or n_tok % w.shape[0] != 0:
            raise ValueError(f"weights of shape {tuple(w.shape)} do not tile {n_tok} tokens")
        if w.shape[0] != n_tok:
            w = w.repeat(n_tok // w.shape[0])
    if strength != 1:
        w = w**strength
    return out * w.to(out.dtype)


# --------------------------------------------------------------------------------------------------------
# Sink detectors. Each returns a bool mask, True = sink / padding.
# --------------------------------------------------------------------------------------------------------


def _grid_shape(grid: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(grid, int):
        rows, cols = grid, grid
    else:
        rows, cols = (int(g) for g in grid)
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    return rows, cols


#: Padding threshold of each released patch (intcomp/attention-bias @ e75ebe7): a patch whose padding
#: fraction is strictly above it is padding. ``generate_pad_mask(..., threshold=0.5)`` in
#: ``patches/FastV.patch``, ``patches/HiMAP.patch`` and ``patches/TokenCarve.patch``;
#: ``generate_pad_mask(..., threshold=0.01)`` in ``patches/PyramidDrop.patch`` (a patch touched by padding
#: at all is padding); ``patches/SparseVLMs.patch`` resizes the 0/1 validity mask of the padded image to
#: 24×24 with PIL's bilinear filter and keeps values >= 0.5, i.e. about the 0.5 rule.
#: Methods without a released patch (iLLaVA, FinePruner heads, any new method) use 0.5.
PADDING_THRESHOLDS: dict[str, float] = {
    "fastv": 0.5,
    "himap": 0.5,
    "tokencarve": 0.5,
    "sparsevlm": 0.5,
    "pdrop": 0.01,
}

#: Threshold for a method without a released patch.
DEFAULT_PADDING_THRESHOLD = 0.5


def padding_threshold(method: str | None) -> float:
    """The padding threshold of ``method``'s released patch (:data:`PADDING_THRESHOLDS`); 0.5 otherwise."""
    if method is None:
        return DEFAULT_PADDING_THRESHOLD
    return PADDING_THRESHOLDS.get(_canonical_method(method), DEFAULT_PADDING_THRESHOLD)


def padding_patch_mask(
    image_sizes: torch.Tensor | Sequence[Sequence[int]],
    grid: int | Sequence[int] = 24,
    image_size: int = 336,
    threshold: float = 0.5,
) -> torch.Tensor:
    """Patches that are padding under LLaVA's pad-to-square preprocessing (LLaVA-1.5's ``pad``).

    ``image_sizes``: original ``(w, h)`` per image, shape ``(B, 2)`` or ``(B, I, 2)`` for ``I`` images per
    sample. Returns ``(B, I·rows·cols)`` bool in raster order per image, True = padding patch.

    The short side is padded symmetrically to a square and resized to ``image_size``, so the valid image is
    the centred band ``[(S - b)/2, (S + b)/2)`` with ``b = S·min(w,h)/max(w,h)`` along the padded axis
    (rows if ``w > h``, columns if ``h > w``). Patch (r, c) covers pixels ``[c·p, (c+1)·p) × [r·p, (r+1)·p)``
    with ``p = S / grid``; it is padding when its padding fraction (the part of it outside the band) is
    strictly greater than ``threshold`` (:data:`PADDING_THRESHOLDS`: 0.5 in the FastV, HiMAP and TokenCarve
    patches, 0.01 in PDrop's). This is ``generate_pad_mask`` of ``intcomp/attention-bias``
    ``patches/FastV.patch`` (and the identical copies in the HiMAP, PyramidDrop and TokenCarve patches)
    @ e75ebe7. The band is the continuous centred band of the patch; ``expand2square``'s integer paste
    offset moves the edge by less than one 336-px pixel. Square images have no padding.
    """
    sizes = torch.as_tensor(image_sizes, dtype=torch.float64)
    if sizes.dim() == 2:
        sizes = sizes.unsqueeze(1)
    if sizes.dim() != 3 or sizes.shape[-1] != 2:
        raise ValueError(f"image_sizes must be (B, 2) or (B, I, 2), got {tuple(sizes.shape)}")
    if bool((sizes <= 0).any()):
        raise ValueError("image sizes must be positive")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    rows, cols = _grid_shape(grid)
    w, h = sizes[..., 0], sizes[..., 1]
    band = image_size * torch.minimum(w, h) / torch.maximum(w, h)  # (B, I)
    lo = (image_size - band) / 2
    hi = lo + band

    def pad_fraction(n_cells: int) -> torch.Tensor:  # (B, I, n_cells)
        step = image_size / n_cells
        start = torch.arange(n_cells, dtype=torch.float64, device=sizes.device) * step
        end = start + step
        overlap = (torch.minimum(hi[..., None], end) - torch.maximum(lo[..., None], start)).clamp(min=0)
        return 1.0 - overlap / step

    pad_rows = pad_fraction(rows) > threshold  # used when w > h (top/bottom padding)
    pad_cols = pad_fraction(cols) > threshold  # used when h > w (left/right padding)
    wide = (w > h)[..., None, None]
    tall = (h > w)[..., None, None]
    mask = (wide & pad_rows[..., :, None]) | (tall & pad_cols[..., None, :])  # (B, I, rows, cols)
    return mask.reshape(mask.shape[0], -1)


#: Sink dimensions of the LLM hidden states (Kang et al., MICV-yonsei/VisAttnSink).
LLAMA2_SINK_DIMS: dict[str, tuple[int, ...]] = {
    "llama-2-7b": (2533, 1415),  # LLaVA-1.5-7B / Vicuna-7B
    "llama-2-13b": (2100, 4743),  # LLaVA-1.5-13B / Vicuna-13B
}


def rms_normalize(hidden: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps)`` over the last dimension, without a learned weight (Kang et al.)."""
    x = _float(hidden)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def massive_activation_sinks(
    hidden: torch.Tensor,
    dims: Sequence[int] | None = None,
    tau: float = 20.0,
    num_dims: int = 2,
) -> torch.Tensor:
    """Visual attention sinks by Kang et al.'s φ rule: ``φ(x) = max_{d∈D} |RMSNorm(x)_d| > τ``.

    ``hidden``: ``(B, N, D)`` hidden states of the visual tokens entering the scoring layer. ``dims``: the
    sink dimensions D (e.g. ``LLAMA2_SINK_DIMS["llama-2-7b"]``). If ``None``, D is detected per sample as the
    ``num_dims`` channels with the largest peak ``max_n |RMSNorm(x)_{n,d}|`` over that sample's visual
    tokens (LLaMA-2 has two sink channels, hence the default 2). The τ test is unchanged, so a sample without
    massive activations flags nothing: a non-sink channel of an RMS-normalised vector rarely exceeds a few
    units (and never ``sqrt(D)``). Returns ``(B, N)`` bool.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, N, D), got {tuple(hidden.shape)}")
    xn = rms_normalize(hidden).abs()
    d_model = xn.shape[-1]
    if dims is None:
        if not 1 <= num_dims <= d_model:
            raise ValueError(f"num_dims must be in [1, {d_model}], got {num_dims}")
        peak = xn.amax(dim=1)  # (B, D)
        idx = torch.topk(peak, num_dims, dim=-1).indices  # (B, k)
        sel = torch.gather(xn, 2, idx[:, None, :].expand(-1, xn.shape[1], -1))
    else:
        dims = list(dims)
        if not dims or min(dims) < -d_model or max(dims) >= d_model:
            raise ValueError(f"sink dims {dims} out of range for hidden size {d_model}")
        sel = xn[..., dims]
    return sel.amax(-1) > tau


def attention_mass_sinks(scores: torch.Tensor, threshold: float = 0.02) -> torch.Tensor:
    """Tokens whose attention exceeds ``threshold`` (``vispruner_nosink``: head-mean [CLS] attention > 0.02).

    ``scores``: ``(B, N)``, or ``(B, H, N)`` which is averaged over heads first. Returns ``(B, N)`` bool.
    """
    s = _float(scores)
    if s.dim() == 3:
        s = s.mean(1)
    if s.dim() != 2:
        raise ValueError(f"scores must be (B, N) or (B, H, N), got {tuple(scores.shape)}")
    return s > threshold


def norm_outlier_sinks(
    features: torch.Tensor, ratio: float | None = 0.01, z: float | None = None
) -> torch.Tensor:
    """High-norm "register" outliers among vision features, ``(B, N, D) -> (B, N)`` bool.

    Exactly one rule: ``ratio`` flags the ``max(1, round(ratio·N))`` tokens of largest ``‖x‖₂`` per sample
    (ties: lower index first); ``z`` flags tokens whose norm z-score (per sample, population std) exceeds
    ``z``. Pass ``ratio=None`` to use ``z``.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (B, N, D), got {tuple(features.shape)}")
    if (ratio is None) == (z is None):
        raise ValueError("give exactly one of ratio= or z=")
    norms = torch.linalg.vector_norm(_float(features), dim=-1)  # (B, N)
    n = norms.shape[-1]
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        k = max(1, int(math.floor(ratio * n + 0.5)))
        order = torch.sort(norms, dim=-1, descending=True, stable=True).indices[:, :k]
        return torch.zeros_like(norms, dtype=torch.bool).scatter_(1, order, True)
    mu = norms.mean(-1, keepdim=True)
    sd = norms.std(-1, keepdim=True, correction=0)
    return (norms - mu) > z * sd.clamp_min(torch.finfo(norms.dtype).tiny)


#: Score given to excluded tokens: the most negative finite float32, so top-k never prefers them to a real
#: score and arithmetic on the scores stays finite.
EXCLUDED_SCORE: float = float(torch.finfo(torch.float32).min)

SinkMode = Literal["exclude", "zero", "downweight"]


def _broadcast_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    mask = mask.to(device=like.device, dtype=torch.bool)
    while mask.dim() < like.dim():
        mask = mask.unsqueeze(1)  # (B, N) -> (B, 1, N) for head-resolved scores
    return mask


def apply_sink_mask(
    scores: torch.Tensor, sink_mask: torch.Tensor, mode: SinkMode = "exclude", factor: float = 0.1
) -> torch.Tensor:
    """Suppress sink tokens in a score tensor.

    ``scores``: ``(B, N)`` or ``(B, H, N)``; ``sink_mask``: ``(B, N)`` bool (True = sink). ``mode``:

    * ``"exclude"``: set to :data:`EXCLUDED_SCORE` (never selected while a real token is left);
    * ``"zero"``: set to 0, what the released padding patches do (for non-negative attention scores a
      zeroed token is selected only once every other token is);
    * ``"downweight"``: multiply by ``factor``.
    """
    out = _float(scores)
    mask = _broadcast_mask(sink_mask, out)
    if mode == "exclude":
        return out.masked_fill(mask, EXCLUDED_SCORE)
    if mode == "zero":
        return out.masked_fill(mask, 0.0)
    if mode == "downweight":
        if factor < 0:
            raise ValueError(f"factor must be >= 0, got {factor}")
        return torch.where(mask, out * factor, out)
    raise ValueError(f"unknown sink mode {mode!r}; expected 'exclude', 'zero' or 'downweight'")


# --------------------------------------------------------------------------------------------------------
# The composable option
# --------------------------------------------------------------------------------------------------------


@dataclass
class DebiasContext:
    """What the caller can offer :meth:`Debias.apply`; every field is optional.

    * ``image_sizes``: original ``(w, h)`` per image, ``(B, 2)`` or ``(B, I, 2)`` → padding mask.
    * ``padding_mask``: ``(B, N)`` bool, precomputed padding patches (wins over the two others).
    * ``padding_fraction``: ``(B, N)`` float, the part of each patch that is padding (e.g. measured on the
      pixels); thresholded with the option's ``padding_threshold`` (wins over ``image_sizes``).
    * ``hidden``: ``(B, N, D)`` LLM hidden states of the visual tokens at the scoring layer → φ sinks.
    * ``cls_attention``: ``(B, N)`` (or ``(B, H, N)``) [CLS] attention of the vision tower → mass sinks
      (Qwen-VL, no [CLS]: the attention each token receives in the tower's last full-attention block).
    * ``vision_features``: ``(B, N, D)`` vision-tower patch features → high-norm outliers.
    * ``grid`` / ``image_size``: patch grid per image and the square input size (LLaVA-1.5: 24, 336).
    """

    image_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None
    padding_mask: torch.Tensor | None = None
    padding_fraction: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None
    vision_features: torch.Tensor | None = None
    grid: int | tuple[int, int] = 24
    image_size: int = 336

    @classmethod
    def coerce(cls, context: DebiasContext | Mapping[str, object] | None) -> DebiasContext:
        if context is None:
            return cls()
        if isinstance(context, cls):
            return context
        if isinstance(context, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = set(context) - known
            if unknown:
                raise ValueError(f"unknown debias context keys {sorted(unknown)}; known: {sorted(known)}")
            return cls(**context)  # type: ignore[arg-type]
        raise TypeError(f"context must be a DebiasContext, a mapping or None, not {type(context).__name__}")


SINK_SOURCES: tuple[str, ...] = ("padding", "massive", "attention", "norm")
#: What ``"sink"`` means: the released patches mask padding tokens only (intcomp/attention-bias @ e75ebe7,
#: ``patches/FastV.patch``, ``PyramidDrop.patch``, ``SparseVLMs.patch``, ``HiMAP.patch``,
#: ``TokenCarve.patch``). The other sources are vtprune additions and are enabled by their own names.
DEFAULT_SINK_SOURCES: tuple[str, ...] = ("padding",)
_SOURCE_NEEDS = {
    "padding": ("padding_mask", "padding_fraction", "image_sizes"),
    "massive": ("hidden",),
    "attention": ("cls_attention",),
    "norm": ("vision_features",),
}


@dataclass
class Debias:
    """Attention-debiasing option for any attention-based pruner (docs/methods/attention_options.md).

    Fields (validated in ``__post_init__``):

    * ``recency``: ``False`` / ``True`` (= strength 1) / a strength ``>= 0``.
    * ``recency_kind``: ``"auto"`` (FastV → ``"cubic"``; PDrop/SparseVLM/HiMAP/TokenCarve → ``"exp"`` with the
      released λ of ``method``/``benchmark``; any other method → FastV's cubic, the released curve of the
      plain last-token score), ``"exp"`` (needs ``recency_lambda`` or a known ``method``), ``"cubic"`` or
      ``"fit"`` (needs ``recency_fit = (mu, sigma)``).
    * ``recency_ref_n``: calibration length per image (576); with another number of tokens per image the
      index is rescaled, see :func:`recency_weights`. ``None`` = raw indices.
    * ``sink``: enable sink suppression from the detectors in ``sink_sources`` — ``"padding"`` (the
      only one the released patches have, and the default), ``"massive"`` (φ rule), ``"attention"``
      ([CLS]-attention threshold), ``"norm"`` (high feature norm) — each used when its input is in the
      context (at least one must be).
    * thresholds: ``padding_threshold`` (None = the released patch's of ``method``, 0.5 for a method without
      one, see :data:`PADDING_THRESHOLDS`), ``massive_tau`` (20) and ``massive_dims`` (None = detect),
      ``attention_threshold`` (0.02), ``norm_ratio`` (0.01).
    * ``sink_mode`` / ``sink_factor``: see :func:`apply_sink_mask` (default ``"exclude"``). The patches
      multiply the score by the 0/1 validity mask; softmax attention is positive, so a zeroed token ranks
      below every real token exactly as an excluded one does — "exclude" only differs for a real score that
      underflows to 0, which it keeps above padding.

    Order (the paper's): positional first, then sinks. Sink detection never reads the debiased scores.
    """

    recency: bool | float = False
    recency_kind: Literal["auto", "exp", "cubic", "fit"] = "auto"
    recency_lambda: float | None = None
    recency_fit: tuple[float, float] | None = None
    recency_ref_n: int | None = CALIBRATION_TOKENS
    method: str | None = None
    benchmark: str | None = None
    sink: bool = False
    sink_sources: tuple[str, ...] = DEFAULT_SINK_SOURCES
    padding_threshold: float | None = None
    massive_tau: float = 20.0
    massive_dims: tuple[int, ...] | None = None
    attention_threshold: float = 0.02
    norm_ratio: float = 0.01
    sink_mode: SinkMode = "exclude"
    sink_factor: float = 0.1
    _strength: float = field(init=False, repr=False, default=0.0)

    def __post_init__(self) -> None:
        if isinstance(self.recency, bool):
            self._strength = 1.0 if self.recency else 0.0
        elif isinstance(self.recency, (int, float)) and math.isfinite(self.recency) and self.recency >= 0:
            self._strength = float(self.recency)
        else:
            raise ValueError(f"recency must be a bool or a finite strength >= 0, got {self.recency!r}")
        if self.recency_kind not in ("auto", "exp", "cubic", "fit"):
            raise ValueError(
                f"recency_kind must be 'auto', 'exp', 'cubic' or 'fit', got {self.recency_kind!r}"
            )
        if self.recency_lambda is not None and not (math.isfinite(self.recency_lambda)):
            raise ValueError("recency_lambda must be finite")
        if self.recency_kind == "fit" and self.recency_fit is None:
            raise ValueError("recency_kind='fit' needs recency_fit=(mu, sigma)")
        if self.recency_fit is not None:
            self.recency_fit = tuple(float(v) for v in self.recency_fit)  # type: ignore[assignment]
            if len(self.recency_fit) != 2:
                raise ValueError("recency_fit must be (mu, sigma)")
        if self.recency_ref_n is not None and self.recency_ref_n < 1:
            raise ValueError("recency_ref_n must be >= 1 or None")
        if self.benchmark is not None:
            _canonical_benchmark(self.benchmark)
        if self._strength > 0 and self.recency_kind == "exp" and self.recency_lambda is None:
            if self.method is None or _canonical_method(self.method) not in RECENCY_LAMBDA:
                raise ValueError(
                    f"recency_kind='exp' needs recency_lambda or a method with released λ ({', '.join(RECENCY_LAMBDA)})"
                )
        self.sink_sources = tuple(self.sink_sources)
        bad = [s for s in self.sink_sources if s not in SINK_SOURCES]
        if bad or not self.sink_sources:
            raise ValueError(
                f"sink_sources must be a non-empty subset of {SINK_SOURCES}, got {self.sink_sources}"
            )
        if self.padding_threshold is None:
            self.padding_threshold = padding_threshold(self.method)
        if not 0 <= self.padding_threshold < 1:
            raise ValueError("padding_threshold must be in [0, 1)")
        if self.massive_tau <= 0:
            raise ValueError("massive_tau must be > 0")
        if self.massive_dims is not None:
            self.massive_dims = tuple(int(d) for d in self.massive_dims)
        if self.attention_threshold < 0:
            raise ValueError("attention_threshold must be >= 0")
        if not 0 < self.norm_ratio <= 1:
            raise ValueError("norm_ratio must be in (0, 1]")
        if self.sink_mode not in ("exclude", "zero", "downweight"):
            raise ValueError(f"sink_mode must be 'exclude', 'zero' or 'downweight', got {self.sink_mode!r}")
        if self.sink_factor < 0:
            raise ValueError("sink_factor must be >= 0")

    # ---- construction from the user-facing option -------------------------------------------------------
    @classmethod
    def from_spec(
        cls,
        spec: Debias | str | Iterable[str] | Mapping[str, object] | None,
        **defaults: object,
    ) -> Debias:
        """Build from ``prune(..., debias=...)``: ``None``, a name, a list of names, a dict or a :class:`Debias`.

        Names: ``"recency"``, ``"sink"`` (the released patches' sink step: padding tokens only,
        intcomp/attention-bias ``patches/*.patch`` @ e75ebe7), or one source (``"padding"`` — the same as
        ``"sink"`` —, ``"massive"``, ``"attention"``, ``"norm"``: vtprune additions, opt-in). ``defaults``
        (e.g. ``method="fastv"``, ``benchmark="pope"``) fill fields the spec does not set; ``method`` also
        picks the patch's padding threshold. ``["recency", "sink"]`` with the padding of the images in the
        context reproduces the released patches.
        """
        if isinstance(spec, Debias):
            return spec
        if spec is None:
            return cls(**defaults)  # type: ignore[arg-type]
        if isinstance(spec, Mapping):
            return cls(**{**defaults, **spec})  # type: ignore[arg-type]
        names = [spec] if isinstance(spec, str) else list(spec)
        kwargs: dict[str, object] = dict(defaults)
        sources: list[str] = []
        for name in names:
            if name == "recency":
                kwargs["recency"] = True
            elif name == "sink":
                sources.extend(DEFAULT_SINK_SOURCES)
            elif name in SINK_SOURCES:
                sources.append(name)
            else:
                raise ValueError(
                    f"unknown debias option {name!r}; expected 'recency', 'sink' or one of {SINK_SOURCES}"
                )
        if sources:
            kwargs["sink"] = True
            kwargs["sink_sources"] = tuple(dict.fromkeys(sources))
        return cls(**kwargs)  # type: ignore[arg-type]

    @property
    def strength(self) -> float:
        """Recency strength in ``[0, ∞)``; 0 = off."""
        return self._strength

    @property
    def enabled(self) -> bool:
        return self._strength > 0 or self.sink

    @property
    def requires(self) -> frozenset[str]:
        """Context fields this option can use (any one per sink source is enough)."""
        if not self.sink:
            return frozenset()
        return frozenset(f for s in self.sink_sources for f in _SOURCE_NEEDS[s])

    # ---- application -----------------------------------------------------------------------------------
    def resolved_recency(self) -> tuple[str, dict[str, float]]:
        """The recency curve used: ``(kind, params)``, after resolving ``"auto"`` and the λ table."""
        kind = self.recency_kind
        if kind == "auto":
            if self.recency_fit is not None:
                kind = "fit"
            elif self.recency_lambda is not None:
                kind = "exp"
            elif self.method is not None and _canonical_method(self.method) in RECENCY_LAMBDA:
                kind = "exp"
            else:
                kind = "cubic"
        if kind == "exp":
            lam = self.recency_lambda
            if lam is None:
                lam = recency_lambda(self.method or "", self.benchmark)
            return "exp", {"lam": lam}
        if kind == "fit":
            assert self.recency_fit is not None
            return "fit", {"sigma": self.recency_fit[1]}
        return "cubic", {}

    def recency_weights(self, n_per_image: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``(n_per_image,)`` multipliers with this option's strength."""
        kind, params = self.resolved_recency()
        ref = self.recency_ref_n if self.recency_ref_n != n_per_image else None
        return recency_weights(n_per_image, kind, self._strength, ref_n=ref, device=device, **params)  # type: ignore[arg-type]

    def sink_mask(
        self, context: DebiasContext | Mapping[str, object] | None, n_tokens: int
    ) -> torch.Tensor | None:
        """``(B, N)`` bool union of the enabled detectors, or ``None`` when sinks are off."""
        if not self.sink:
            return None
        ctx = DebiasContext.coerce(context)
        masks: list[torch.Tensor] = []
        for source in self.sink_sources:
            if source == "padding":
                if ctx.padding_mask is not None:
                    masks.append(ctx.padding_mask.to(torch.bool))
                elif ctx.padding_fraction is not None:
                    masks.append(ctx.padding_fraction > self.padding_threshold)
                elif ctx.image_sizes is not None:
                    masks.append(
                        padding_patch_mask(ctx.image_sizes, ctx.grid, ctx.image_size, self.padding_threshold)
                    )
            elif source == "massive" and ctx.hidden is not None:
                masks.append(massive_activation_sinks(ctx.hidden, self.massive_dims, self.massive_tau))
            elif source == "attention" and ctx.cls_attention is not None:
                masks.append(attention_mass_sinks(ctx.cls_attention, self.attention_threshold))
            elif source == "norm" and ctx.vision_features is not None:
                masks.append(norm_outlier_sinks(ctx.vision_features, ratio=self.norm_ratio))
        if not masks:
            needs = sorted(self.requires)
            raise ValueError(
                f"sink debiasing ({', '.join(self.sink_sources)}) needs one of the context fields {needs}; none was given"
            )
        for m in masks:
            if m.shape[-1] != n_tokens:
                raise ValueError(f"sink mask covers {m.shape[-1]} tokens but the scores have {n_tokens}")
        out = masks[0]
        for m in masks[1:]:
            out = out | m.to(out.device)
        return out

    def apply(
        self,
        scores: torch.Tensor,
        context: DebiasContext | Mapping[str, object] | None = None,
        return_mask: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Debias ``scores`` (``(B, N)`` or ``(B, H, N)``): recency first, then sinks.

        With ``return_mask=True`` also returns the ``(B, N)`` bool mask of suppressed tokens (all False
        when sinks are off), so a caller can cap its keep count at the number of valid tokens as FastV's
        patch does.
        """
        out = _float(scores)
        n_tokens = out.shape[-1]
        if self._strength > 0:
            ctx = DebiasContext.coerce(context)
            rows, cols = _grid_shape(ctx.grid)
            per_image = rows * cols if n_tokens % (rows * cols) == 0 else n_tokens
            out = recency_debias(out, self.recency_weights(per_image, device=out.device))
        mask = self.sink_mask(context, n_tokens)
        if mask is not None:
            out = apply_sink_mask(out, mask, self.sink_mode, self.sink_factor)
        if return_mask:
            if mask is None:
                mask = torch.zeros(out.shape[0], n_tokens, dtype=torch.bool, device=out.device)
            return out, mask.to(out.device)
        return out
