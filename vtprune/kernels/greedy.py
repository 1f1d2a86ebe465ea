"""Fused Triton kernels for the greedy selection loops: DPP greedy MAP (CDPruner), max–min diversity
(DivPrune), VisPruner's duplicate-removal rounds and SCOPE's saliency × coverage loop.

Why: the torch loops (:func:`vtprune.selection.dpp_greedy`, :func:`vtprune.selection.maxmin_diversity`,
:func:`vtprune.methods.vispruner.vispruner_select`, :func:`vtprune.methods.scope.scope_select`) run tens to
hundreds of steps of a few small kernels each. Replayed as CUDA graphs their launch cost is gone, but the
GPU still runs every kernel one after the other (~67 µs per DPP pick, ~36 µs per max–min pick,
~0.2–0.3 ms per SCOPE pick at B=16, N=576 on an H200). Here one Triton program per batch row runs the
**whole loop**, with the per-token state (residuals ``d²``, availability, running minima, SCOPE's coverage)
in registers. What does not fit on chip lives in small global scratch buffers read back by the same
program after a block barrier: the DPP's Cholesky rows ``c_t`` ``(B, k, N)``, VisPruner's residual lists
(two buffers, ping-pong), its B-membership flags and ``m(a)`` values, SCOPE's coverage, score and
availability rows ``(B, N)``. SCOPE is the one loop whose step depends on a whole
``(N, N)`` matrix (every gain ``Σ_i relu(S_ij − c_i)`` may change when the coverage ``c`` does): its
program streams the matrix from global memory in ``(ROWS, BLOCK_J)`` tiles (1.3 MB per image at N = 576,
which stays in L2), instead of the torch loop's several ``(B, N, N)`` elementwise and reduction kernels per
step, and it skips the column chunks that cannot hold the step's argmax (lazy greedy: a score never
increases from one step to the next, so the last computed one bounds it; exact, see ``scope_fused``).

Contract: the kernels are called by those torch functions after their own checks and prologue (float32
upcast, validity mask, the Gram / distance matrix, VisPruner's attention ranking, SCOPE's cosine matrix and
``saliency^alpha``) and return what the torch loops produce before :func:`vtprune.selection.picked_from`.
The callers decide "fused or not" outside their ``@cuda_graphed`` function and pass it in, so that it is
part of the graph's cache key: the fused kernel is captured into (and replayed from) the same CUDA graph as
the prologue, and a graph captured on one path is never replayed for the other (``VTPRUNE_TRITON`` is read
at each call). Dispatch (:func:`fused_enabled`): CUDA tensors, ``import triton`` works, ``VTPRUNE_TRITON``
is not ``"0"``, ``1 <= N <= MAX_FUSED_N`` (one block holds a row; LLaVA-NeXT's 2,928 tokens use a
4,096-wide block; wider inputs keep the torch loop) and ``k >= 1``. Anything else takes the torch path.
``triton`` is imported lazily, on the first fused call, so CPU installs need not have it. Under
``TRITON_INTERPRET=1`` (set before triton is imported) the kernels also run on CPU tensors through Triton's
interpreter; tests/test_greedy_kernels.py compares them with the torch path so.

Same selection as the torch loops:

* ties go to the **lower index** (the rule of :func:`vtprune.selection.argmax_first`, including its NaN
  rule: a NaN score anywhere makes the pick ``N - 1``, as ``amax`` then matches nothing and is clamped);
  VisPruner's stable sort of A is an all-pairs rank count on ``(-m, position in A)``;
* invalid / padded candidates are never picked and take no part in any score; when a row runs out of
  valid tokens the remaining slots repeat the torch loop's picks with ``ok = False``;
* max–min and VisPruner are pure compare / min / max arithmetic on the same matrix, so they are
  **bit-identical** (VisPruner with NaN features excepted: ``tl.max`` and ``torch.amax`` treat NaN
  differently there; max–min reproduces torch's NaN propagation);
* DPP: every elementwise step is the same IEEE float32 operation as in torch (``sqrt_rn``, ``div_rn``, and
  FMA contraction switched off with ``enable_fp_fusion=False``, as torch runs ``d² - e·e`` as two kernels).
  The one difference is the order of the float32 sum ``Σ_t c_t[j]·c_t`` (torch: a cuBLAS / CPU-BLAS ``bmm``
  with its own reduction order and FMAs; here: tiles of ``ROWS`` Cholesky rows, a tree sum inside a tile,
  tiles added in order; steps 1 and 2 involve at most one product and agree bit for bit). From step 3 on,
  residuals may differ in the last bits, so two candidates whose gains are equal to within float32 rounding
  (but not exactly equal) may be picked in the other order. Exact ties (the first step on a flat diagonal,
  duplicates, which the exhaustion guard scores as exactly 0) are decided identically. With TF32 matmuls
  switched on (``torch.backends.cuda.matmul.allow_tf32``) torch's ``bmm`` is TF32 while this sum stays
  float32, so there the kernel is the more accurate of the two and near-ties differ more often.
* SCOPE: both paths read the same cosine matrix and weights (the prologue is shared), and every
  elementwise operation is torch's (``S_ij − c_i``, ``relu`` and ``max`` propagating NaN, ``gain · w`` or
  ``gain + w``; FMA contraction off). The torch loop's ``· valid_i`` is a ``c_i = +inf`` for invalid rows
  here (``relu(S − inf) = 0``; NaN propagates as torch's ``NaN · 0`` does). The one difference is the order
  of the float32 sum over ``i`` (torch: its reduction kernel over dim 1 of ``(B, N, N)``; here: a
  ``(ROWS, BLOCK_J)`` accumulator summed over row tiles in order, then a tree over its ``ROWS`` rows). So
  gains may differ in the last bits (relative error up to about ``N · 2⁻²⁴``), and two candidates whose
  scores are equal to within that (but not exactly equal) may be picked in the other order, after which
  the row's later picks follow from a different coverage. Exact ties are decided identically, by the lower
  index: the kernel's sum has the same structure for every column, chunk and step, so bitwise-equal
  columns (duplicate tokens) with equal weights get bitwise-equal scores, and all-zero gains (a fully
  covered image, or a zero weight) score exactly 0 on both paths. The lazy chunk skipping changes no pick
  of the kernel (float32 rounding is monotone, so its computed scores never increase either; a NaN score
  or coverage switches it off). A row that runs out of valid tokens repeats pick 0 with
  ``ok = False`` (and its coverage update) exactly as the torch loop does.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "MAX_FUSED_N",
    "fused_enabled",
    "triton_available",
    "dpp_greedy_fused",
    "maxmin_fused",
    "vispruner_rounds_fused",
    "scope_fused",
]

MAX_FUSED_N = 8192
"""Largest candidate count the fused kernels take (one row per block); larger inputs use the torch path."""

_TILE_ELEMENTS = 16384  # register tile of the inner loops: ROWS x BLOCK_N float32

_failure: str | None = None
"""Why the kernels were switched off in this process (the first compile/launch error), or None."""


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works here (cached; imports triton on the first call)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing libcuda pieces, wrong ABI)
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_enabled(x: Tensor, n: int) -> bool:
    """Use the fused kernels for candidates of tensor ``x`` (``n`` per row)?

    CUDA tensors (or any tensor under ``TRITON_INTERPRET=1``), ``VTPRUNE_TRITON`` not ``"0"``,
    ``1 <= n <= MAX_FUSED_N``, triton importable, and no kernel has failed in this process yet (see
    :func:`_guarded`; ``VTPRUNE_TRITON=strict`` keeps trying, and raises).
    """
    mode = os.environ.get("VTPRUNE_TRITON", "1")
    if mode == "0":
        return False
    if _failure is not None and mode != "strict":
        return False
    if not (x.is_cuda or _interpreting()):
        return False
    if not 1 <= n <= MAX_FUSED_N:
        return False
    return triton_available()


def _guarded(fn: Callable) -> Callable:
    """A kernel wrapper that returns None instead of raising, so that its caller runs the torch loop.

    A GPU the installed triton cannot compile for, or a launch out of resources, should cost speed, not the
    run: the first failure is warned about once and switches the kernels off for the rest of the process.
    ``VTPRUNE_TRITON=strict`` (tests, benchmarks) raises instead.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _failure
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if os.environ.get("VTPRUNE_TRITON") == "strict":
                raise
            _failure = f"{fn.__name__}: {type(exc).__name__}: {exc}"
            warnings.warn(
                f"vtprune: fused Triton kernel failed ({_failure}); using the torch loops from now on "
                "(VTPRUNE_TRITON=0 skips the kernels, VTPRUNE_TRITON=strict raises)",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    return wrapper


def _on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch_shape(n: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) for rows of ``n`` candidates."""
    block = max(16, 1 << (n - 1).bit_length())
    rows = max(1, min(32, _TILE_ELEMENTS // block))
    warps = 4 if block <= 512 else 8 if block <= 2048 else 16
    return block, rows, warps


@functools.cache
def _kernels():
    """The jitted kernels (triton imported here, on first use)."""
    from vtprune.kernels import _greedy_triton as k

    return k.dpp_kernel, k.maxmin_kernel, k.vispruner_rounds_kernel, k.scope_kernel


@_guarded
def dpp_greedy_fused(
    kernel: Tensor, k: int, avail: Tensor, exhaustion_tol: float
) -> tuple[Tensor, Tensor] | None:
    """The greedy DPP MAP loop of :func:`vtprune.selection.dpp_greedy`, fused.

    Args:
        kernel: ``(B, N, N)`` float32 kernel (any strides).
        k: picks per row, ``1 <= k <= N``.
        avail: ``(B, N)`` bool, candidates.
        exhaustion_tol: relative residual below which a candidate scores 0 (see ``dpp_greedy``).

    Returns:
        ``(picks (B, k) long, ok (B, k) bool)`` in pick order, or None if the kernel failed (:func:`_guarded`).
    """
    dpp_kernel = _kernels()[0]
    b, n, _ = kernel.shape
    dev = kernel.device
    picks = torch.empty(b, k, dtype=torch.long, device=dev)
    ok = torch.empty(b, k, dtype=torch.int8, device=dev)
    if b == 0 or k == 0:
        return picks, ok.bool()
    cs = torch.empty(b, k, n, dtype=torch.float32, device=dev)
    valid8 = avail.to(torch.int8).contiguous()
    block, rows, warps = _launch_shape(n)
    with _on(kernel.device):  # triton launches on the current CUDA device
        dpp_kernel[(b,)](
            kernel,
            kernel.stride(0),
            kernel.stride(1),
            kernel.stride(2),
            valid8,
            cs,
            picks,
            ok,
            n,
            k,
            float(exhaustion_tol),
            BLOCK_N=block,
            ROWS=rows,
            num_warps=warps,
            enable_fp_fusion=False,
        )
    return picks, ok.bool()


@_guarded
def maxmin_fused(dist: Tensor, k: int, avail: Tensor) -> tuple[Tensor, Tensor] | None:
    """The greedy loop of :func:`vtprune.selection.maxmin_diversity`, fused.

    Args:
        dist: ``(B, N, N)`` float32 cosine distances, **exactly symmetric** (``cosine_matrix`` symmetrises):
            the kernel reads rows where the torch loop reads columns.
        k: picks per row, ``1 <= k <= N``.
        avail: ``(B, N)`` bool, candidates.

    Returns:
        ``(picks (B, k) long, ok (B, k) bool)`` in pick order, or None if the kernel failed (:func:`_guarded`).
    """
    maxmin_kernel = _kernels()[1]
    b, n, _ = dist.shape
    dev = dist.device
    picks = torch.empty(b, k, dtype=torch.long, device=dev)
    ok = torch.empty(b, k, dtype=torch.int8, device=dev)
    if b == 0 or k == 0:
        return picks, ok.bool()
    dist = dist.contiguous()
    valid8 = avail.to(torch.int8).contiguous()
    block, rows, warps = _launch_shape(n)
    with _on(dist.device):  # triton launches on the current CUDA device
        maxmin_kernel[(b,)](
            dist, valid8, picks, ok, n, k, BLOCK_N=block, ROWS=rows, num_warps=warps, enable_fp_fusion=False
        )
    return picks, ok.bool()


@_guarded
def vispruner_rounds_fused(
    gram: Tensor, res: Tensor, n_res: Tensor, t_div: int, removal_per_round: int
) -> tuple[Tensor, Tensor] | None:
    """VisPruner's duplicate-removal rounds (:func:`vtprune.methods.vispruner.vispruner_select`, step 3), fused.

    Each row runs its own rounds until ``|R| <= t_div`` (the torch loop runs the rounds of the largest
    residual and lets finished rows do no-op rounds: the same lists). Per round: B's tokens are flagged,
    ``m(a)`` is the max of a's Gram row over the flagged columns, A is ranked by ``(-m, position in A)``
    with an all-pairs count (the stable sort), and survivors then B are written to the other buffer.

    Args:
        gram: ``(B, N, N)`` float32 cosine matrix (``cosine_matrix``, snapped duplicates).
        res: ``(B, L)`` long, residual list, valid prefix of length ``n_res`` in descending attention.
        n_res: ``(B,)`` long, ``|R|`` per row.
        t_div: diverse tokens to keep, ``<= L``.
        removal_per_round: maximum deletions per round (>= 1).

    Returns:
        ``(div (B, t_div) long, n_res (B,) long)``: the first ``t_div`` slots of the final list (slots past
        ``n_res`` are unspecified, as in the torch loop) and the final ``|R|``; None if the kernel failed
        (:func:`_guarded`).
    """
    rounds_kernel = _kernels()[2]
    b, width = res.shape
    n = gram.shape[1]
    dev = gram.device
    out = torch.zeros(b, t_div, dtype=torch.int32, device=dev)
    counts = n_res.to(torch.int32).contiguous()
    if b == 0 or t_div == 0:
        return out.long(), counts.long()
    lists = torch.zeros(b, 2, width, dtype=torch.int32, device=dev)
    lists[:, 0] = res
    flag = torch.full((b, n), -1, dtype=torch.int32, device=dev)
    mbuf = torch.empty(b, width, dtype=torch.float32, device=dev)
    block, _, warps = _launch_shape(n)
    tile_a = max(1, min(64, _TILE_ELEMENTS // block))  # A members per (TILE_A, BLOCK_N) tile
    with _on(gram.device):  # triton launches on the current CUDA device
        rounds_kernel[(b,)](
            gram.contiguous(),
            lists,
            counts,
            out,
            flag,
            mbuf,
            n,
            width,
            t_div,
            removal_per_round,
            BLOCK_N=block,
            TILE_A=tile_a,
            num_warps=warps,
            enable_fp_fusion=False,
        )
    return out.long(), counts.long()


_SCOPE_LAZY = True
"""Skip SCOPE's column chunks that cannot hold the argmax (exact, see :func:`scope_fused`); False: compute all."""

_scope_chunks: tuple[Tensor, int] | None = None
"""Statistics of the last :func:`scope_fused` call: column chunks computed per row ``(B,)`` int32 (on the
device, not synchronised), and the number a non-lazy run computes (``ceil(N / BLOCK_J) * k``)."""

_SCOPE_TILE: tuple[int, int, int] | None = None
"""(BLOCK_J, ROWS, num_warps) override for :func:`scope_fused` (tests, tuning); None: :func:`_scope_shape`."""


def _scope_shape(n: int) -> tuple[int, int, int]:
    """(BLOCK_J, ROWS, num_warps) of SCOPE's gain tiles for ``n`` tokens.

    BLOCK_J: 32 columns per chunk where that pads ``n`` by at most 1/16 (576: 18 chunks, no padding), else
    16; narrow chunks let the lazy evaluation skip more (random 576-token inputs: ~10 % of the 32-wide
    chunks computed per step, ~15 % of 64-wide ones). ROWS: an 8,192-element tile (256 rows: 32 KiB of
    loads in flight per iteration of the row loop, which is latency-bound on one SM per image), fewer for
    tiny ``n``. Not tuned on a GPU yet: ``benchmarks/scope_kernel_gpu.py --sweep-tiles`` compares others.
    """
    if _SCOPE_TILE is not None:
        return _SCOPE_TILE
    block_j = 32 if -(-n // 32) * 32 * 16 <= n * 17 else 16
    pow2 = max(16, 1 << (n - 1).bit_length())
    block_j = min(block_j, pow2)
    rows = min(8192 // block_j, pow2)
    return block_j, rows, 8 if n > 256 else 4


@_guarded
def scope_fused(
    sim: Tensor, weight: Tensor, k: int, avail: Tensor, multiply: bool
) -> tuple[Tensor, Tensor] | None:
    """SCOPE's greedy saliency x coverage loop (:func:`vtprune.methods.scope.scope_select`), fused.

    Per step, ``gain_j = sum_i relu(S_ij - c_i)`` over the valid tokens ``i``, ``score = gain * weight``
    (``multiply``) or ``gain + weight``, argmax over the available tokens (ties: lower index), then
    ``c = max(c, S[best, :])``. The ``(N, N)`` matrix is read from global memory in ``(ROWS, BLOCK_J)`` tiles
    (on a GPU it stays in L2: 1.3 MB per image at N = 576); availability and ``c`` live in registers,
    mirrored to small scratch rows for the column chunks and row tiles, and the scores go through a scratch
    row before the argmax. Lazy evaluation (``_SCOPE_LAZY``, on by default) computes a column chunk only
    when one of its tokens' latest scores (an upper bound: scores never increase) reaches the best fresh
    score of the most promising chunk, computed first; the picks are exactly those of computing every
    chunk (tests/greedy_kernels_cases.py runs both).

    Args:
        sim: ``(B, N, N)`` float32 cosine similarities; row ``best`` updates the coverage, column ``j`` is
            summed into ``j``'s gain (no symmetry assumed).
        weight: ``(B, N)`` float32 ``saliency^alpha``.
        k: picks per row, ``1 <= k <= N``.
        avail: ``(B, N)`` bool, candidates (invalid tokens are neither picked nor counted in any gain).
        multiply: ``combine == "multi"``.

    Returns:
        ``(picks (B, k) long, ok (B, k) bool)`` in pick order, or None if the kernel failed (:func:`_guarded`).
    """
    scope_kernel = _kernels()[3]
    b, n, _ = sim.shape
    dev = sim.device
    picks = torch.empty(b, k, dtype=torch.long, device=dev)
    ok = torch.empty(b, k, dtype=torch.int8, device=dev)
    if b == 0 or k == 0:
        return picks, ok.bool()
    sim = sim.float().contiguous()
    weight = weight.float().contiguous()
    valid8 = avail.to(torch.int8).contiguous()
    cov = torch.empty(b, n, dtype=torch.float32, device=dev)
    scores = torch.empty(b, n, dtype=torch.float32, device=dev)
    avail8 = torch.empty(b, n, dtype=torch.int8, device=dev)
    block = max(16, 1 << (n - 1).bit_length())
    block_j, rows, warps = _scope_shape(n)
    bounds = torch.empty(b, block // block_j, dtype=torch.float32, device=dev)
    chunks = torch.zeros(b, dtype=torch.int32, device=dev)
    with _on(dev):  # triton launches on the current CUDA device
        scope_kernel[(b,)](
            sim,
            weight,
            valid8,
            cov,
            scores,
            avail8,
            bounds,
            picks,
            ok,
            chunks,
            n,
            k,
            MULTI=bool(multiply),
            LAZY=_SCOPE_LAZY,
            BLOCK_N=block,
            BLOCK_J=block_j,
            ROWS=rows,
            num_warps=warps,
            enable_fp_fusion=False,
        )
    global _scope_chunks
    _scope_chunks = (chunks, -(-n // block_j) * k)
    return picks, ok.bool()
