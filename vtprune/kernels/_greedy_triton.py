"""The Triton kernels of :mod:`vtprune.kernels.greedy` (imports triton at import time: import this module
only through ``vtprune.kernels.greedy``, which does it lazily). Documentation and contract: that module."""

import triton
import triton.language as tl


@triton.jit
def argmax_first(score, cols, n):
    # lowest index among the maxima; a NaN anywhere -> n - 1 (vtprune.selection.argmax_first)
    best = tl.max(score, axis=0)
    idx = tl.min(tl.where((score == best) & (cols < n), cols, n), axis=0)
    nans = tl.sum(tl.where(score != score, 1, 0), axis=0)
    idx = tl.where(nans > 0, n, idx)
    return tl.minimum(idx, n - 1)


@triton.jit
def dpp_kernel(
    l_ptr,
    stride_lb,
    stride_lr,
    stride_lc,
    valid_ptr,
    cs_ptr,
    picks_ptr,
    ok_ptr,
    n,
    k,
    tol,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    inb = cols < n
    rows = tl.arange(0, ROWS)
    l_row0 = l_ptr + b * stride_lb
    diag = tl.load(l_row0 + cols * (stride_lr + stride_lc), mask=inb, other=0.0).to(tl.float32)
    d2 = diag
    avail = tl.load(valid_ptr + b * n + cols, mask=inb, other=0) != 0
    cs = cs_ptr + b * k * n
    tiny = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny
    for i in range(0, k):
        exhausted = d2 <= tol * diag
        score = tl.where(avail, tl.where(exhausted, 0.0, d2), float("-inf"))
        j = argmax_first(score, cols, n)
        at_j = cols == j
        ok = tl.sum(tl.where(at_j & avail, 1, 0), axis=0) > 0
        live = ok & (tl.sum(tl.where(at_j & exhausted, 1, 0), axis=0) == 0)
        d2_j = tl.sum(tl.where(at_j, d2, 0.0), axis=0)
        row = tl.load(l_row0 + j * stride_lr + cols * stride_lc, mask=inb, other=0.0).to(tl.float32)
        # Σ_{t<i} c_t[j] · c_t, ROWS Cholesky rows per tile (written by earlier steps of this program)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for t0 in range(0, i, ROWS):
            t = t0 + rows
            t_ok = t < i
            c_j = tl.load(cs + t * n + j, mask=t_ok, other=0.0)
            c_t = tl.load(cs + t[:, None] * n + cols[None, :], mask=t_ok[:, None] & inb[None, :], other=0.0)
            acc += tl.sum(c_j[:, None] * c_t, axis=0)
        row = row - acc
        scale = tl.sqrt_rn(tl.maximum(d2_j, tiny, propagate_nan=tl.PropagateNan.ALL))
        e = tl.div_rn(row, tl.zeros([BLOCK_N], dtype=tl.float32) + scale)
        e = tl.where(live, e, 0.0)
        tl.store(cs + i * n + cols, e, mask=inb)
        d2 = d2 - e * e
        avail = avail & (cols != j)
        tl.store(picks_ptr + b * k + i, j.to(tl.int64))
        tl.store(ok_ptr + b * k + i, ok.to(tl.int8))
        # the next step reads row i of the scratch written by other threads of this block
        tl.debug_barrier()


@triton.jit
def maxmin_kernel(
    dist_ptr,
    valid_ptr,
    picks_ptr,
    ok_ptr,
    n,
    k,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    inb = cols < n
    rows = tl.arange(0, ROWS)
    dist = dist_ptr + b * n * n
    valid_row = valid_ptr + b * n
    avail = tl.load(valid_row + cols, mask=inb, other=0) != 0
    # first pick: distance to the nearest *other* valid token. Column-wise minima over row tiles; the
    # matrix is exactly symmetric (see maxmin_fused), so this is the torch path's row-wise amin.
    near = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    nans = tl.zeros([BLOCK_N], dtype=tl.int32)
    for r0 in range(0, n, ROWS):
        r = r0 + rows
        r_in = r < n
        r_ok = tl.load(valid_row + r, mask=r_in, other=0) != 0
        use = (r_ok & r_in)[:, None] & inb[None, :] & (r[:, None] != cols[None, :])
        tile = tl.load(dist + r[:, None] * n + cols[None, :], mask=use, other=float("inf"))
        tile = tl.where(use, tile, float("inf"))
        near = tl.minimum(near, tl.min(tile, axis=0))
        nans += tl.sum(tl.where(tile != tile, 1, 0), axis=0)
    near = tl.where(nans > 0, float("nan"), near)  # torch's amin propagates NaN
    score = tl.where(avail, near, float("-inf"))
    run_min = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    for i in range(0, k):
        j = argmax_first(score, cols, n)
        ok = tl.sum(tl.where((cols == j) & avail, 1, 0), axis=0) > 0
        tl.store(picks_ptr + b * k + i, j.to(tl.int64))
        tl.store(ok_ptr + b * k + i, ok.to(tl.int8))
        avail = avail & (cols != j)
        col = tl.load(dist + j * n + cols, mask=inb, other=float("inf"))  # row j == column j
        run_min = tl.minimum(run_min, col, propagate_nan=tl.PropagateNan.ALL)
        score = tl.where(avail, run_min, float("-inf"))


@triton.jit
def vispruner_rounds_kernel(
    gram_ptr,
    res_ptr,
    n_res_ptr,
    out_ptr,
    flag_ptr,
    m_ptr,
    n,
    width,
    t_div,
    removal,
    BLOCK_N: tl.constexpr,
    TILE_A: tl.constexpr,
):
    # width = |R| before the first round <= n <= BLOCK_N, so one BLOCK_N vector spans any list position
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    inb = cols < n
    ta = tl.arange(0, TILE_A)
    gram = gram_ptr + b * n * n
    lists = res_ptr + b * 2 * width  # two buffers of `width` slots: R of this round, R of the next
    flag = flag_ptr + b * n  # flag[token] == round  <=>  token is in B this round (no clearing needed)
    mbuf = m_ptr + b * width
    n_res = tl.load(n_res_ptr + b)
    rnd = 0
    while n_res > t_div:
        src = lists + (rnd % 2) * width
        dst = lists + ((rnd + 1) % 2) * width
        n_a = (n_res + 1) // 2
        n_b = n_res // 2
        r_step = tl.minimum(tl.minimum(n_res - t_div, n_a), removal)
        in_b_pos = cols < n_b
        b_tok = tl.load(src + 2 * cols + 1, mask=in_b_pos, other=0)
        tl.store(flag + b_tok, tl.zeros([BLOCK_N], dtype=tl.int32) + rnd, mask=in_b_pos)
        tl.debug_barrier()
        in_b = tl.load(flag + cols, mask=inb, other=-1) == rnd
        # m(a) = max over B of cos(a, b), from full Gram rows masked to B's tokens
        for a0 in range(0, n_a, TILE_A):
            a = a0 + ta
            a_ok = a < n_a
            tok = tl.load(src + 2 * a, mask=a_ok, other=0)
            use = a_ok[:, None] & in_b[None, :]
            sim = tl.load(gram + tok[:, None] * n + cols[None, :], mask=use, other=float("-inf"))
            sim = tl.where(use, sim, float("-inf"))
            tl.store(mbuf + a, tl.max(sim, axis=1), mask=a_ok)
        tl.debug_barrier()
        # stable descending rank of m over A: members ahead = larger m, or equal m and earlier in A
        in_a_pos = cols < n_a
        m_all = tl.load(mbuf + cols, mask=in_a_pos, other=float("-inf"))
        for a0 in range(0, n_a, TILE_A):
            a = a0 + ta
            a_ok = a < n_a
            m_a = tl.load(mbuf + a, mask=a_ok, other=float("-inf"))
            ahead = (m_all[None, :] > m_a[:, None]) | (
                (m_all[None, :] == m_a[:, None]) & (cols[None, :] < a[:, None])
            )
            rank = tl.sum((ahead & in_a_pos[None, :]).to(tl.int32), axis=1)
            tok = tl.load(src + 2 * a, mask=a_ok, other=0)
            survives = a_ok & (rank >= r_step)  # the first r_step of the sorted A are deleted
            tl.store(dst + rank - r_step, tok, mask=survives)
        tl.store(dst + (n_a - r_step) + cols, b_tok, mask=in_b_pos)  # then B, in its previous order
        tl.debug_barrier()
        n_res = n_res - r_step
        rnd += 1
    final = lists + (rnd % 2) * width
    keep = cols < t_div
    tl.store(out_ptr + b * t_div + cols, tl.load(final + cols, mask=keep, other=0), mask=keep)
    tl.store(n_res_ptr + b, n_res)


@triton.jit
def scope_kernel(
    sim_ptr,
    weight_ptr,
    valid_ptr,
    cov_ptr,
    score_ptr,
    avail_ptr,
    bound_ptr,
    picks_ptr,
    ok_ptr,
    chunks_ptr,
    n,
    k,
    MULTI: tl.constexpr,
    LAZY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
    ROWS: tl.constexpr,
):
    # one program per image; the (n, n) matrix is streamed from global memory (L2) at every step
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    inb = cols < n
    jj = tl.arange(0, BLOCK_J)
    rr = tl.arange(0, ROWS)
    NCH: tl.constexpr = BLOCK_N // BLOCK_J
    sim = sim_ptr + b * n * n
    cov_row = cov_ptr + b * n  # coverage by token, re-read by row tiles (registers cannot be indexed)
    score_row = score_ptr + b * n  # latest computed score of every token
    avail_row = avail_ptr + b * n  # availability, read by column chunks
    bound_row = bound_ptr + b * NCH  # per column chunk: max latest score over its available tokens
    weight_row = weight_ptr + b * n
    avail = tl.load(valid_ptr + b * n + cols, mask=inb, other=0) != 0
    # c_i, with +inf for invalid tokens: relu(S_ij - inf) = 0 is the torch loop's `* valid_i` (NaN included)
    cov = tl.where(avail, 0.0, float("inf"))
    tl.store(cov_row + cols, cov, mask=inb)
    tl.store(avail_row + cols, avail.to(tl.int8), mask=inb)
    tl.store(score_row + cols, tl.zeros([BLOCK_N], dtype=tl.float32), mask=inb)  # chunks never computed
    score = tl.full([BLOCK_N], float("inf"), tl.float32)  # no score computed yet: unbounded
    nan_seen = cols < 0  # per-lane NaN flags (all False)
    n_chunks = tl.cdiv(n, BLOCK_J)
    computed = 0  # column chunks computed, all steps (statistics)
    tl.debug_barrier()
    for i in range(0, k):
        # Lazy evaluation (LAZY, exact): a token's score never increases from one step to the next (c only
        # grows, and S - c, relu, the fixed-order float32 sum and * w or + w with w >= 0 are all monotone),
        # so its latest computed score bounds the current one. The chunk holding the best bound is computed
        # first; another chunk whose bounds are all below that chunk's best fresh score cannot hold the
        # argmax and is skipped: its stored scores stay below that score, so the argmax over the stored
        # row is the argmax over fresh scores. A NaN anywhere (scores, coverage) computes every chunk.
        if LAZY:
            full = tl.sum(nan_seen.to(tl.int32), axis=0) > 0
            masked = tl.where(avail, score, float("-inf"))
            first = (argmax_first(masked, cols, n) // BLOCK_J) * BLOCK_J
            tl.store(bound_row + tl.arange(0, NCH), tl.max(tl.reshape(masked, [NCH, BLOCK_J]), axis=1))
            lo = 0  # c = 0 is the chunk `first`, then c = 1.. every chunk but that one
        else:
            full = True
            first = 0
            lo = 1  # every chunk, in order
        best = tl.max(tl.full([BLOCK_J], float("-inf"), tl.float32), axis=0)
        tl.debug_barrier()
        for c in range(lo, n_chunks + 1):
            j0 = tl.where(c == 0, first, (c - 1) * BLOCK_J)
            ub = tl.load(bound_row + tl.maximum(c - 1, 0))  # c = 0 reads chunk 0's bound, unused
            need = (c == 0) | (full | (((c - 1) * BLOCK_J != first) & (ub >= best)))
            if need:
                computed += 1
                cj = j0 + jj
                cj_in = cj < n
                # gain_j = sum_i relu(S_ij - c_i), a (ROWS, BLOCK_J) accumulator over row tiles, then one
                # tree sum over its rows (the same order for every column, whatever the step or chunk)
                acc = tl.zeros([ROWS, BLOCK_J], dtype=tl.float32)
                for r0 in range(0, n, ROWS):
                    r = r0 + rr
                    r_in = r < n
                    c_r = tl.load(cov_row + r, mask=r_in, other=float("inf"))
                    tile = tl.load(
                        sim + r[:, None] * n + cj[None, :], mask=r_in[:, None] & cj_in[None, :], other=0.0
                    )
                    acc += tl.maximum(tile - c_r[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL)
                gain = tl.sum(acc, axis=0)
                w_c = tl.load(weight_row + cj, mask=cj_in, other=0.0)
                if MULTI:
                    fresh = gain * w_c
                else:
                    fresh = gain + w_c
                tl.store(score_row + cj, fresh, mask=cj_in)
                if LAZY:
                    if c == 0:
                        av_c = tl.load(avail_row + cj, mask=cj_in, other=0) != 0
                        best = tl.max(tl.where(av_c, fresh, float("-inf")), axis=0)
        tl.debug_barrier()
        score = tl.load(score_row + cols, mask=inb, other=0.0)
        nan_seen = nan_seen | ((score != score) & avail)
        j = argmax_first(tl.where(avail, score, float("-inf")), cols, n)
        ok = tl.sum(tl.where((cols == j) & avail, 1, 0), axis=0) > 0
        tl.store(picks_ptr + b * k + i, j.to(tl.int64))
        tl.store(ok_ptr + b * k + i, ok.to(tl.int8))
        avail = avail & (cols != j)
        tl.store(avail_row + cols, avail.to(tl.int8), mask=inb)
        row = tl.load(sim + j * n + cols, mask=inb, other=0.0)  # c_i = max(c_i, S[j, i])
        cov = tl.maximum(cov, row, propagate_nan=tl.PropagateNan.ALL)
        nan_seen = nan_seen | (cov != cov)
        tl.store(cov_row + cols, cov, mask=inb)
        # the next step's chunks read the coverage and availability written by other threads
        tl.debug_barrier()
    tl.store(chunks_ptr + b, computed)
