"""Tests of vtprune.selection against examples computed by hand from each method's definition and against
plain, slow, one-sample reference implementations written here straight from each method's definition (pure
Python loops, float64).

Test data comes in three flavours so that ties are exercised without depending on float rounding:
* ``gauss``: continuous random features (ties have probability ~0);
* ``dups``: rows copied from a few random rows (exact duplicates; the implementation must break those ties
  by the lower index exactly as the reference does);
* ``lattice``: scaled vertices of the 24-cell (±e_i and (±1/2)^4, times 1/2, 1, 2 or 4), whose normalised
  dot products are multiples of 1/2 and are computed exactly in any float format and summation order,
  so there are many exact ties in cosines and distances.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtprune.methods.cdpruner import cdpruner_kernel
from vtprune.methods.illava import illava_weighted_merge
from vtprune.methods.tokencarve import tokencarve_fuse_and_merge, tokencarve_information
from vtprune.methods.visionzip import visionzip_merge
from vtprune.methods.vispruner import _residual_bounds, vispruner_select
from vtprune.selection import (
    PAD_INDEX,
    Picked,
    dpc_knn_cluster,
    dpp_greedy,
    maxmin_diversity,
    topk_indices,
)


def vispruner_rounds(residual: int, diverse: int, removal_per_round: int = 8) -> int:
    """Number of duplicate-removal rounds VisPruner needs to shrink a residual list."""
    return len(_residual_bounds(residual, diverse, removal_per_round))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Derandomised so CI is reproducible; VTPRUNE_STRESS=<n> runs n fresh random examples per property instead.
_STRESS = int(os.environ.get("VTPRUNE_STRESS", "0"))
HSET = settings(
    max_examples=_STRESS or 50,
    deadline=None,
    derandomize=not _STRESS,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# ----------------------------------------------------------------------------------------------------------
# data generation
# ----------------------------------------------------------------------------------------------------------

LATTICE = [[float(s) if j == i else 0.0 for j in range(4)] for i in range(4) for s in (1, -1)] + [
    list(signs) for signs in itertools.product((0.5, -0.5), repeat=4)
]


def make_features(kind: str, b: int, n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "gauss":
        return torch.randn(b, n, d, generator=gen)
    if kind == "dups":
        distinct = int(torch.randint(1, n + 1, (1,), generator=gen))
        base = torch.randn(b, distinct, d, generator=gen)
        pick = torch.randint(0, distinct, (b, n), generator=gen)
        return base.gather(1, pick.unsqueeze(-1).expand(-1, -1, d))
    if kind == "lattice":
        table = torch.tensor(LATTICE)
        which = torch.randint(0, len(LATTICE), (b, n), generator=gen)
        scale = torch.tensor([0.5, 1.0, 2.0, 4.0])[torch.randint(0, 4, (b, n), generator=gen)]
        return table[which] * scale.unsqueeze(-1)
    raise ValueError(kind)


def make_scores(kind: str, b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "gauss":
        return torch.randn(b, n, generator=gen)
    return torch.randint(0, 3, (b, n), generator=gen).float()  # many exact ties


def make_valid(masked: bool, b: int, n: int, gen: torch.Generator) -> torch.Tensor | None:
    if not masked:
        return None
    return torch.rand(b, n, generator=gen) < 0.7


@st.composite
def cases(draw, max_n: int = 12, kinds=("gauss", "dups", "lattice")):
    kind = draw(st.sampled_from(kinds))
    b = draw(st.integers(1, 4))
    n = draw(st.integers(1, max_n))
    d = 4 if kind == "lattice" else draw(st.integers(1, 6))
    k = draw(st.integers(0, n))
    masked = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return kind, b, n, d, k, masked, seed


# ----------------------------------------------------------------------------------------------------------
# plain references (one sample, Python lists, float64, written from the spec text)
# ----------------------------------------------------------------------------------------------------------


def ref_order(scores: list[float], valid: list[bool] | None) -> list[int]:
    idx = [i for i in range(len(scores)) if valid is None or valid[i]]
    return sorted(idx, key=lambda i: (-scores[i], i))


def ref_cos(feats: list[list[float]], dup_tol: float) -> list[list[float]]:
    def unit(v):
        nrm = math.sqrt(sum(t * t for t in v))
        return [t / nrm for t in v] if nrm > 0 else [0.0] * len(v)

    u = [unit(v) for v in feats]
    out = []
    for a in u:
        row = []
        for c in u:
            cs = max(-1.0, min(1.0, sum(p * q for p, q in zip(a, c, strict=True))))
            row.append(1.0 if dup_tol > 0 and cs >= 1.0 - dup_tol else cs)
        out.append(row)
    return out


def ref_vispruner(attn, feats, valid, keep, ratio, cap, dup_tol=1e-6) -> list[int]:
    t_imp = int(keep * ratio)
    t_div = keep - t_imp
    order = ref_order(attn, valid)
    important, residual = order[:t_imp], order[t_imp:]
    if t_div == 0:
        return sorted(important)
    cos = ref_cos(feats, dup_tol)
    while len(residual) > t_div:
        a_list, b_list = residual[0::2], residual[1::2]
        r_step = min(cap, len(residual) - t_div, len(a_list))
        best = [max(cos[a][bb] for bb in b_list) for a in a_list]
        ranked = sorted(range(len(a_list)), key=lambda p: (-best[p], p))
        residual = [a_list[p] for p in ranked[r_step:]] + b_list
    return sorted(important + residual)


def ref_dpp(kernel: list[list[float]], k: int, valid, tol: float = 1e-5) -> list[int]:
    n = len(kernel)
    diag = [kernel[i][i] for i in range(n)]
    d2 = diag[:]
    cs: list[list[float]] = []
    avail = [True] * n if valid is None else list(valid)
    picks = []
    for _ in range(k):
        cand = [i for i in range(n) if avail[i]]
        if not cand:
            break
        gain = [0.0 if d2[i] <= tol * diag[i] else d2[i] for i in range(n)]
        j = max(cand, key=lambda i: (gain[i], -i))
        if d2[j] > tol * diag[j]:
            e = [(kernel[j][t] - sum(c[j] * c[t] for c in cs)) / math.sqrt(d2[j]) for t in range(n)]
        else:
            e = [0.0] * n
        cs.append(e)
        d2 = [d2[t] - e[t] * e[t] for t in range(n)]
        avail[j] = False
        picks.append(j)
    return picks


def ref_maxmin(feats, k: int, valid, dup_tol: float = 1e-6) -> list[int]:
    n = len(feats)
    cos = ref_cos(feats, dup_tol)
    dist = [[max(0.0, 1.0 - cos[i][j]) for j in range(n)] for i in range(n)]
    cand = [i for i in range(n) if valid is None or valid[i]]
    if k == 0 or not cand:
        return []
    nearest = {i: min([dist[i][j] for j in cand if j != i], default=math.inf) for i in cand}
    first = max(cand, key=lambda i: (nearest[i], -i))
    picks = [first]
    while len(picks) < k:
        rest = [i for i in cand if i not in picks]
        if not rest:
            break
        score = {i: min(dist[i][s] for s in picks) for i in rest}
        picks.append(max(rest, key=lambda i: (score[i], -i)))
    return picks


def ref_dpc(x, c: int, knn: int, valid):
    """Returns (centres in centre order, assignment list with -1 for invalid, merged rows)."""
    m, d = len(x), len(x[0])
    live = [i for i in range(m) if valid is None or valid[i]]
    dist = [
        [
            math.sqrt(sum((p - q) ** 2 for p, q in zip(x[i], x[j], strict=True))) / math.sqrt(d)
            for j in range(m)
        ]
        for i in range(m)
    ]
    density = {}
    for i in live:
        near = sorted(dist[i][j] for j in live)[: min(knn, m)]
        density[i] = math.exp(-sum(t * t for t in near) / len(near))
    dmax = max([dist[i][j] for i in live for j in live], default=0.0)
    score = {}
    for i in live:
        higher = [dist[i][j] for j in live if (density[j], -j) > (density[i], -i)]
        score[i] = density[i] * (min(higher) if higher else dmax)
    centres = sorted(live, key=lambda i: (-score[i], i))[:c]
    assign = [-1] * m
    for i in live:
        assign[i] = min(range(len(centres)), key=lambda q: (dist[centres[q]][i], q))
    for q, ci in enumerate(centres):
        assign[ci] = q
    merged = []
    for q in range(c):
        members = [i for i in live if assign[i] == q]
        merged.append([sum(x[i][t] for i in members) / max(1, len(members)) for t in range(d)])
    return centres, assign, merged


def check_picked(p: Picked, b: int, expected: list[int], k: int) -> None:
    got = p.indices[b].tolist()
    ok = p.valid[b].tolist()
    pad = k - len(expected)
    assert ok == [True] * len(expected) + [False] * pad, (ok, expected)
    assert got == expected + [PAD_INDEX] * pad, (got, expected)


def as_lists(t: torch.Tensor):
    return t.double().tolist()


# ----------------------------------------------------------------------------------------------------------
# hand-computed examples
# ----------------------------------------------------------------------------------------------------------


def unit2(angles_deg):
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles_deg])


def test_example1_fastv_topk_raster_order():
    s = torch.tensor([[0.10, 0.30, 0.05, 0.25, 0.20, 0.05]])
    check_picked(topk_indices(s, 3), 0, [1, 3, 4], 3)


def test_example2_positional_debiasing_changes_selection():
    s = torch.tensor([[0.10, 0.12, 0.30, 0.48]])
    w = torch.tensor([2.0**-i for i in range(4)])
    torch.testing.assert_close(s * w, torch.tensor([[0.100, 0.060, 0.075, 0.060]]))
    check_picked(topk_indices(s, 2), 0, [2, 3], 2)
    check_picked(topk_indices(s * w, 2), 0, [0, 2], 2)


EX3_ANGLES = [0, 1, 90, 91, 180, 45, 200, 300, 2, 135]
EX3_KEPT = {200, 1, 91, 45, 300, 135}


def test_example3_vispruner_duplicate_removal():
    feats = unit2(EX3_ANGLES)[None]
    attn = torch.arange(10, 0, -1, dtype=torch.float32)[None]  # residual order = list order
    got = vispruner_select(attn, feats, keep=6, important_ratio=0.0)
    expected = sorted(i for i, a in enumerate(EX3_ANGLES) if a in EX3_KEPT)
    check_picked(got, 0, expected, 6)
    # the round's best-match cosines, computed by hand
    cos = ref_cos(unit2(EX3_ANGLES).double().tolist(), 0.0)
    a_list, b_list = list(range(10))[0::2], list(range(10))[1::2]
    best = [max(cos[a][b] for b in b_list) for a in a_list]
    assert [round(v, 4) for v in best] == [0.9998, 0.9998, 0.7071, 0.4226, 0.9998]


def test_example3_vispruner_with_shuffled_raster_and_important_tokens():
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(12, generator=gen)
    angles = EX3_ANGLES + [60, 250]  # two extra tokens with the highest attention -> important
    attn = torch.tensor([10 - i for i in range(10)] + [50, 40], dtype=torch.float32)
    feats = unit2(angles)
    # place token t at raster position perm[t]
    attn_r = torch.empty(12).index_copy_(0, perm, attn)
    feats_r = torch.empty(12, 2).index_copy_(0, perm, feats)
    got = vispruner_select(attn_r[None], feats_r[None], keep=8, important_ratio=0.25)  # T_imp = 2
    expected = sorted(int(perm[t]) for t, a in enumerate(angles) if a in EX3_KEPT or t >= 10)
    check_picked(got, 0, expected, 8)


def test_example4_cdpruner_dpp_greedy():
    kernel = torch.tensor([[[1.0, 0.81, 0.0], [0.81, 0.81, 0.0], [0.0, 0.0, 0.25]]])
    check_picked(dpp_greedy(kernel, 2, sort=False), 0, [0, 2], 2)
    check_picked(dpp_greedy(kernel, 2), 0, [0, 2], 2)
    # the kernel is diag(ρ̃)·S·diag(ρ̃) of the example
    s = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
    rho = torch.tensor([1.0, 0.9, 0.5])
    torch.testing.assert_close(rho[:, None] * s * rho[None, :], kernel[0])
    # the residual after the first pick is 0.81 - 0.81**2 = 0.1539 for token 1
    assert ref_dpp(kernel[0].double().tolist(), 2, None) == [0, 2]
    assert abs((0.81 - 0.81**2) - 0.1539) < 1e-4


def test_example5_divprune_maxmin():
    feats = unit2([0, 10, 90, 180])[None]
    check_picked(maxmin_diversity(feats, 2, sort=False), 0, [3, 0], 2)
    check_picked(maxmin_diversity(feats, 2), 0, [0, 3], 2)
    d = 1 - unit2([0, 10, 90, 180]) @ unit2([0, 10, 90, 180]).T
    nearest = (d + torch.eye(4) * 9).amin(dim=1)
    torch.testing.assert_close(nearest, torch.tensor([0.0152, 0.0152, 0.8264, 1.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(d[:, 3], torch.tensor([2.0, 1.9848, 1.0, 0.0]), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# top-k
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@HSET
@given(case=cases(max_n=16, kinds=("gauss", "ties")))
def test_topk_matches_reference(device, case):
    kind, b, n, _, k, masked, seed = case
    gen = torch.Generator().manual_seed(seed)
    scores = make_scores(kind, b, n, gen)
    valid = make_valid(masked, b, n, gen)
    got = topk_indices(scores.to(device), k, None if valid is None else valid.to(device))
    for i in range(b):
        v = None if valid is None else valid[i].tolist()
        check_picked(got, i, sorted(ref_order(scores[i].tolist(), v)[:k]), k)


def test_topk_ties_lower_index_first_and_nan_last():
    s = torch.tensor([[1.0, 2.0, 2.0, float("nan"), 2.0, 1.0]])
    check_picked(topk_indices(s, 2), 0, [1, 2], 2)
    check_picked(topk_indices(s, 5), 0, [0, 1, 2, 4, 5], 5)
    check_picked(topk_indices(s, 6), 0, [0, 1, 2, 3, 4, 5], 6)


def test_topk_invalid_never_selected_even_with_minus_inf_scores():
    s = torch.tensor([[float("-inf"), 5.0, float("-inf"), 7.0]])
    v = torch.tensor([[True, False, True, False]])
    check_picked(topk_indices(s, 3, v), 0, [0, 2], 3)
    check_picked(topk_indices(s, 1, torch.zeros(1, 4, dtype=torch.bool)), 0, [], 1)


def test_topk_argument_checks():
    with pytest.raises(ValueError):
        topk_indices(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError):
        topk_indices(torch.zeros(3), 1)
    with pytest.raises(ValueError):
        topk_indices(torch.zeros(2, 3), 1, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError):
        topk_indices(torch.zeros(2, 3), 1, torch.ones(2, 3))
    assert topk_indices(torch.zeros(2, 3), 0).indices.shape == (2, 0)


# ----------------------------------------------------------------------------------------------------------
# VisPruner
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@HSET
@given(
    case=cases(max_n=20),
    ratio=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    cap=st.integers(1, 9),
    tied_attn=st.booleans(),
)
def test_vispruner_matches_reference(device, case, ratio, cap, tied_attn):
    kind, b, n, d, keep, masked, seed = case
    gen = torch.Generator().manual_seed(seed)
    feats = make_features(kind, b, n, d, gen)
    attn = make_scores("ties" if tied_attn else "gauss", b, n, gen)
    valid = make_valid(masked, b, n, gen)
    got = vispruner_select(
        attn.to(device), feats.to(device), keep, ratio, cap, None if valid is None else valid.to(device)
    )
    for i in range(b):
        v = None if valid is None else valid[i].tolist()
        expected = ref_vispruner(attn[i].tolist(), as_lists(feats[i]), v, keep, ratio, cap)
        check_picked(got, i, expected, keep)


def test_vispruner_exact_ties_are_broken_by_index():
    """Issue 20 point 5. Theia-4869/VisPruner `llava/model/llava_arch.py` @ aefa01a ranks with
    `image_attentions.argsort(descending=True)` and `scores.argsort(descending=True)`, unstable sorts that
    leave exactly tied scores to the backend. vtprune's rule: a stable sort on (−score, index) — equal
    [CLS] attention ranks the lower index first; equal best-match cosines keep their order in A (the
    residual order), so the earlier member is deleted first.

    8 tokens, all with the same attention; unit features at 270°, 0°, 0°, 90°, 90°, 180°, 180°, 45°;
    keep 4 = 1 important + 3 diverse, at most 2 deletions per round.
    * important: all tied → token 0; R = [1, 2, 3, 4, 5, 6, 7].
    * round 1 (|R| = 7, r = 2): A = [1, 3, 5, 7], B = [2, 4, 6]; m = 1, 1, 1, cos 45°; the three tied
      duplicates keep A's order → delete 1 and 3; R = [5, 7, 2, 4, 6].
    * round 2 (|R| = 5, r = 2): A = [5, 2, 6], B = [7, 4]; m = 0, cos 45°, 0 → order 2, 5, 6 (5 before 6
      by A's order) → delete 2 and 5; R = [6, 7, 4] = 3 tokens.
    Kept: {0, 4, 6, 7}. A backend that ordered the ties otherwise could keep 5 for 6, 1 for 2, ...
    (5 and 6 are the same vector: their m are bit-identical, a true tie.)
    """
    angles = [270, 0, 0, 90, 90, 180, 180, 45]
    feats = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])[None]
    attn = torch.full((1, 8), 0.125)
    got = vispruner_select(attn, feats, 4, important_ratio=0.25, removal_per_round=2)
    assert got.indices.tolist() == [[0, 4, 6, 7]]
    assert got.indices.tolist() == [ref_vispruner(attn[0].tolist(), as_lists(feats[0]), None, 4, 0.25, 2)]
    # the tie follows the residual order, not the vector: token 6 ranked first by attention (token 0 still
    # the important one) leads A, so 6 is the 180° duplicate deleted and 5 the one kept.
    # R = [6, 1, 2, 3, 4, 5, 7]; round 1 deletes 6, 2 (A = [6, 2, 4, 7], m = 1, 1, 1, cos 45°);
    # R = [4, 7, 1, 3, 5]; round 2 (A = [4, 1, 5], m = 1, cos 45°, 0) deletes 4, 1 → R = [5, 7, 3]
    attn_6_first = attn.clone()
    attn_6_first[0, 0] = 0.2
    attn_6_first[0, 6] = 0.13
    picked = vispruner_select(attn_6_first, feats, 4, important_ratio=0.25, removal_per_round=2)
    assert picked.indices.tolist() == [[0, 3, 5, 7]]
    # tied attention at the important boundary: the lower indices are important
    attn2 = torch.tensor([[0.3, 0.2, 0.2, 0.2, 0.05, 0.05]])
    assert vispruner_select(attn2, torch.eye(6)[None], 2, important_ratio=1.0).indices.tolist() == [[0, 1]]


def test_vispruner_odd_residual_length():
    # |R| = 7 is odd: |A| = 4, |B| = 3 (the official code would mis-size the deletion)
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(1, 7, 3, generator=gen)
    attn = torch.randn(1, 7, generator=gen)
    for keep in range(1, 8):
        got = vispruner_select(attn, feats, keep, important_ratio=0.0, removal_per_round=8)
        check_picked(got, 0, ref_vispruner(attn[0].tolist(), as_lists(feats[0]), None, keep, 0.0, 8), keep)


def test_vispruner_rounds_count():
    assert vispruner_rounds(544, 32, 8) == 64  # 576 -> 64 with r = 0.5
    assert vispruner_rounds(10, 6, 8) == 1
    assert vispruner_rounds(6, 6, 8) == 0
    assert vispruner_rounds(10, 1, 8) == 3  # 10 -> 5 -> 2 -> 1, each step capped by ceil(n/2)
    # monotone in the residual size, which is what lets a batch run one round count
    counts = [vispruner_rounds(r, 5, 3) for r in range(0, 60)]
    assert counts == sorted(counts)


# ----------------------------------------------------------------------------------------------------------
# CDPruner: kernel and DPP
# ----------------------------------------------------------------------------------------------------------


def lattice_kernel(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Kernel with S in {0, ±1} (axis vectors) and ρ in {1/4, 1/2, 1, 2}: every greedy step is exact."""
    axes = torch.cat([torch.eye(3), -torch.eye(3)])
    rows = axes[torch.randint(0, 6, (b, n), generator=gen)]
    rho = torch.tensor([0.25, 0.5, 1.0, 2.0])[torch.randint(0, 4, (b, n), generator=gen)]
    return rho[..., :, None] * (rows @ rows.transpose(1, 2)) * rho[..., None, :]


@pytest.mark.parametrize("device", DEVICES)
@HSET
@given(case=cases(max_n=14), sort=st.booleans())
def test_dpp_matches_reference(device, case, sort):
    kind, b, n, d, k, masked, seed = case
    gen = torch.Generator().manual_seed(seed)
    if kind == "lattice":
        kernel = lattice_kernel(b, n, gen)
    else:
        feats = make_features(kind, b, n, d, gen)
        kernel = cdpruner_kernel(feats, torch.randn(b, n, generator=gen))
    valid = make_valid(masked, b, n, gen)
    got = dpp_greedy(kernel.to(device), k, None if valid is None else valid.to(device), sort=sort)
    for i in range(b):
        v = None if valid is None else valid[i].tolist()
        picks = ref_dpp(as_lists(kernel[i]), k, v)
        check_picked(got, i, picks if not sort else sorted(picks), k)


def test_dpp_rank_exhaustion_is_finite_and_deterministic():
    # 3 distinct directions, 8 tokens: after 3 picks every residual is 0; no NaN, lower index fills
    feats = torch.tensor(
        [[1.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]]
    )
    rel = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.5, 0.3, 0.8, 0.4])
    kernel = cdpruner_kernel(feats[None], rel[None])
    got = dpp_greedy(kernel, 8, sort=False)
    assert got.valid.all()
    assert got.indices[0].tolist() == ref_dpp(as_lists(kernel[0]), 8, None)
    assert got.indices[0].tolist()[:3] == [1, 6, 2]  # most relevant of each direction, in gain order
    assert sorted(got.indices[0].tolist()) == list(range(8))


def test_cdpruner_kernel_per_sample_minmax():
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 5, 4, generator=gen)
    rel = torch.randn(2, 5, generator=gen)
    rel[1] = rel[1] * 100 + 50  # a very different scale must not affect sample 0
    kernel = cdpruner_kernel(feats, rel)
    for i in range(2):
        torch.testing.assert_close(kernel[i : i + 1], cdpruner_kernel(feats[i : i + 1], rel[i : i + 1]))
    r = rel[0]
    rho = (r - r.min() + 1e-6) / (r.max() - r.min())
    s = torch.nn.functional.normalize(feats[0], dim=-1)
    s = s @ s.T
    torch.testing.assert_close(kernel[0], rho[:, None] * s * rho[None, :], atol=1e-6, rtol=1e-5)
    assert torch.equal(kernel[0], kernel[0].T)


def test_cdpruner_kernel_constant_relevance_and_mask():
    feats = torch.randn(1, 4, 3)
    kernel = cdpruner_kernel(feats, torch.full((1, 4), 0.3))
    s = torch.nn.functional.normalize(feats[0], dim=-1)
    torch.testing.assert_close(kernel[0], s @ s.T, atol=1e-6, rtol=1e-5)
    # min/max over valid tokens only: the invalid outlier does not squash the others
    rel = torch.tensor([[0.0, 1.0, 2.0, 1000.0]])
    valid = torch.tensor([[True, True, True, False]])
    diag = cdpruner_kernel(feats, rel, valid).diagonal(dim1=1, dim2=2)[0]
    torch.testing.assert_close(
        diag[:3].sqrt(), torch.tensor([5e-7, 0.5 + 5e-7, 1.0 + 5e-7]), atol=1e-6, rtol=1e-5
    )


# ----------------------------------------------------------------------------------------------------------
# DivPrune
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@HSET
@given(case=cases(max_n=14), sort=st.booleans())
def test_maxmin_matches_reference(device, case, sort):
    kind, b, n, d, k, masked, seed = case
    gen = torch.Generator().manual_seed(seed)
    feats = make_features(kind, b, n, d, gen)
    valid = make_valid(masked, b, n, gen)
    got = maxmin_diversity(feats.to(device), k, None if valid is None else valid.to(device), sort=sort)
    for i in range(b):
        v = None if valid is None else valid[i].tolist()
        picks = ref_maxmin(as_lists(feats[i]), k, v)
        check_picked(got, i, picks if not sort else sorted(picks), k)


def test_maxmin_never_repicks_when_only_duplicates_remain():
    feats = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    got = maxmin_diversity(feats, 4, sort=False)
    assert got.indices[0].tolist() == [0, 2, 1, 3]


# ----------------------------------------------------------------------------------------------------------
# SparseVLM DPC-kNN recycling
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@HSET
@given(case=cases(max_n=14, kinds=("gauss", "dups")), data=st.data())
def test_dpc_matches_reference(device, case, data):
    kind, b, m, d, _, masked, seed = case
    c = data.draw(st.integers(1, m))
    knn = data.draw(st.integers(1, m + 2))
    gen = torch.Generator().manual_seed(seed)
    x = make_features(kind, b, m, d, gen)
    valid = make_valid(masked, b, m, gen)
    got = dpc_knn_cluster(x.to(device), c, knn, None if valid is None else valid.to(device))
    for i in range(b):
        v = None if valid is None else valid[i].tolist()
        centres, assign, merged = ref_dpc(as_lists(x[i]), c, knn, v)
        check_picked(Picked(got.centers, got.valid), i, centres, c)
        assert got.assignment[i].tolist() == assign
        torch.testing.assert_close(
            got.merged[i].cpu().double(), torch.tensor(merged, dtype=torch.float64), atol=1e-5, rtol=1e-5
        )


def test_dpc_two_blobs():
    gen = torch.Generator().manual_seed(0)
    blob_a = torch.randn(6, 8, generator=gen) * 0.01 + 5
    blob_b = torch.randn(4, 8, generator=gen) * 0.01 - 5
    x = torch.cat([blob_a, blob_b])[None]
    out = dpc_knn_cluster(x, 2, 2)
    assert out.valid.all()
    groups = {tuple(sorted(i for i in range(10) if out.assignment[0, i] == q)) for q in range(2)}
    assert groups == {tuple(range(6)), tuple(range(6, 10))}
    for q in range(2):
        members = out.assignment[0] == q
        torch.testing.assert_close(out.merged[0, q], x[0][members].mean(0))


def test_dpc_jitter_is_seeded_and_off_by_default():
    x = torch.randn(2, 9, 5)
    a = dpc_knn_cluster(x, 3, 3)
    b = dpc_knn_cluster(x, 3, 3)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.merged, b.merged)
    j1 = dpc_knn_cluster(x, 3, 3, jitter=1e-6, generator=torch.Generator().manual_seed(5))
    j2 = dpc_knn_cluster(x, 3, 3, jitter=1e-6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(j1.centers, j2.centers) and torch.equal(j1.assignment, j2.assignment)


def test_dpc_fewer_valid_than_clusters():
    x = torch.randn(1, 5, 3)
    valid = torch.tensor([[False, True, False, True, False]])
    out = dpc_knn_cluster(x, 3, 3, valid)
    assert out.valid[0].tolist() == [True, True, False]
    assert out.centers[0, 2].item() == PAD_INDEX
    assert out.assignment[0].tolist()[0::2] == [-1, -1, -1]
    assert torch.equal(out.merged[0, 2], torch.zeros(3))


# ----------------------------------------------------------------------------------------------------------
# VisionZip
# ----------------------------------------------------------------------------------------------------------


def ref_visionzip(hidden, keys, c):
    n = len(hidden)
    step = max(1, n // c)
    targets = list(range(0, n, step))[:c]
    cos = ref_cos(keys, 0.0)
    members = {t: [] for t in targets}
    for i in range(n):
        if i not in targets:
            best = max(range(c), key=lambda q: (cos[i][targets[q]], -q))
            members[targets[best]].append(i)
    out = []
    for t in targets:
        mem = members[t]
        agg = [sum(hidden[i][j] for i in mem) / max(1, len(mem)) for j in range(len(hidden[0]))]
        out.append([hidden[t][j] + agg[j] for j in range(len(agg))])
    return targets, out


def test_visionzip_hand_example():
    hidden = torch.tensor([[1.0], [10.0], [100.0], [1000.0], [10000.0]])[None]
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [1.0, 0.2]])[None]
    out = visionzip_merge(hidden, keys, 2)  # step 2, targets 0 and 2
    assert out.targets[0].tolist() == [0, 2]
    assert out.assignment[0].tolist() == [0, 0, 1, 1, 0]
    torch.testing.assert_close(out.tokens[0], torch.tensor([[1.0 + (10 + 10000) / 2], [100.0 + 1000.0]]))
    # a target nobody joins stays itself
    keys2 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])[None]
    out2 = visionzip_merge(hidden, keys2, 2)
    torch.testing.assert_close(out2.tokens[0, 1], torch.tensor([100.0]))


@HSET
@given(case=cases(max_n=14, kinds=("gauss", "dups")), data=st.data())
def test_visionzip_matches_reference(case, data):
    kind, b, n, d, _, _, seed = case
    c = data.draw(st.integers(1, n))
    gen = torch.Generator().manual_seed(seed)
    keys = make_features(kind, b, n, d, gen)
    hidden = torch.randn(b, n, 3, generator=gen)
    out = visionzip_merge(hidden, keys, c)
    for i in range(b):
        targets, tokens = ref_visionzip(as_lists(hidden[i]), as_lists(keys[i]), c)
        assert out.targets[i].tolist() == targets
        torch.testing.assert_close(
            out.tokens[i].double(), torch.tensor(tokens, dtype=torch.float64), atol=1e-5, rtol=1e-5
        )


# ----------------------------------------------------------------------------------------------------------
# TokenCarve
# ----------------------------------------------------------------------------------------------------------


def ref_tokencarve(attn, hidden: torch.Tensor, keep: int, w: float):
    n = len(attn)
    h = hidden.double()
    _, _, vh = torch.linalg.svd(h, full_matrices=False)
    sv = (h @ vh.T).abs().sum(-1).tolist()  # row i of U·S equals h_i·V
    rank_av = {t: r for r, t in enumerate(ref_order(attn, None))}
    rank_sv = {t: r for r, t in enumerate(ref_order(sv, None))}
    fused = [(n - rank_av[t]) * w + (n - rank_sv[t]) * (1 - w) for t in range(n)]
    n1 = min(n, math.floor(1.5 * keep))
    top = ref_order(fused, None)[:n1]
    a_list, b_list = top[: n1 // 2], top[n1 // 2 :]
    m = n1 - keep
    rows = {t: h[t] for t in top}
    if m:
        hn = torch.nn.functional.normalize(h, dim=-1)
        best, partner = [], []
        for t in b_list:
            sims = [float(hn[t] @ hn[a]) for a in a_list]
            q = max(range(len(a_list)), key=lambda p: (sims[p], -p))
            best.append(sims[q])
            partner.append(a_list[q])
        merged = sorted(range(len(b_list)), key=lambda p: (-best[p], p))[:m]
        for a in a_list:
            group = [h[b_list[p]] for p in merged if partner[p] == a]
            rows[a] = (h[a] + sum(group)) / (1 + len(group)) if group else h[a]
        for p in merged:
            del rows[b_list[p]]
    kept = sorted(rows)
    return kept, torch.stack([rows[t] for t in kept])


def test_tokencarve_hand_example_attention_only():
    attn = torch.tensor([[0.4, 0.1, 0.3, 0.2, 0.05, 0.6]])
    hidden = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.1], [0.5, 0.5], [0.0, -1.0], [1.0, 0.0]])[None]
    # w = 1: pure AV ranking -> top N1 = 3 are 5, 0, 2; A = [5], B = [0, 2]; M = 1; 2 is closest to 5
    out = tokencarve_fuse_and_merge(attn, hidden, keep=2, weight=1.0)
    assert out.indices[0].tolist() == [0, 5]
    torch.testing.assert_close(out.hidden[0], torch.tensor([[1.0, 1.0], [1.0, 0.05]]))


def test_tokencarve_sv_score_is_l1_of_us_and_l2_is_the_norm():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(h, full_matrices=False)
    us = u * s
    torch.testing.assert_close(us.norm(dim=-1), h.norm(dim=-1))
    torch.testing.assert_close(us.abs().sum(-1), (h @ vh.T).abs().sum(-1))
    # w = 0: pure SV ranking; with orthogonal rows SV = |row scale|
    scales = torch.tensor([3.0, 1.0, 5.0, 2.0, 4.0, 0.5])
    hid = torch.diag(scales)[None]
    out = tokencarve_fuse_and_merge(torch.zeros(1, 6), hid, keep=4, weight=0.0)
    # N1 = 6: fused order 2, 4, 0 | 3, 1, 5; all cosines are 0, so the partner is A's first (token 2) and
    # the M = 2 merged B tokens are B's first two (3 and 1)
    assert out.indices[0].tolist() == [0, 2, 4, 5]
    torch.testing.assert_close(out.hidden[0, 1], (hid[0, 2] + hid[0, 3] + hid[0, 1]) / 3)


def _massive_hidden(b: int, n: int, d: int, seed: int) -> torch.Tensor:
    """Random hidden states with what real layer-1 outputs have: a high-norm row and a massive activation."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(b, n, d, generator=gen)
    h[:, 5] *= 100.0
    h[:, 17, 7] = 1000.0
    return h


def _sv_float64(h: torch.Tensor) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(h.double(), full_matrices=False)
    return (u * s.unsqueeze(-2)).abs().sum(-1)


def test_tokencarve_information_hand_example():
    """The official score, ShawnTan86/TokenCarve `TokenCarve/modeling_llama.py` @ a57bd59: `U, S, Vt =
    torch.linalg.svd(H)`, score = row sums of |U·diag(S)|.

    H = M·Wᵀ with W (8×2) orthonormal columns and M's columns orthogonal ((2, 1.5, 1)·(0, 1.2, −1.8) = 0),
    so U·S = M up to column signs: scores = L1 norms of M's rows = 2, 2.7, 2.8. The L2 norms (2, 1.92,
    2.06) would rank token 0 above token 1: the score is not the row norm.
    """
    m = torch.tensor([[2.0, 0.0], [1.5, 1.2], [1.0, -1.8]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    w = torch.linalg.qr(torch.randn(8, 2, generator=gen, dtype=torch.float64)).Q
    h = (m @ w.T).float()[None]
    expected = torch.tensor([[2.0, 2.7, 2.8]])
    torch.testing.assert_close(tokencarve_information(h), expected, rtol=1e-5, atol=1e-5)
    assert torch.argsort(h[0].norm(dim=-1), descending=True).tolist() == [2, 0, 1]
    # SV only (w = 0), keep 1 of 3: N1 = 1, so the kept token is the top of the SV ranking
    out = tokencarve_fuse_and_merge(torch.zeros(1, 3), h, keep=1, weight=0.0)
    assert out.indices.tolist() == [[2]]
    # a tall H (more tokens than width) takes the direct SVD: the same definition
    tall = torch.cat([h, torch.zeros(1, 7, 8)], dim=1)
    torch.testing.assert_close(tokencarve_information(tall)[:, :3], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_tokencarve_information_accuracy_against_float64_svd(device):
    """Issue 20 point 1: the score to the accuracy of the official fp32 SVD of H (ShawnTan86/TokenCarve
    `TokenCarve/modeling_llama.py` @ a57bd59), checked against a float64 SVD, on hidden states with a
    high-norm row and a massive activation (what LLaVA's layer-1 outputs have). The fp32 eigendecomposition
    of H·Hᵀ that vtprune used before squares the condition number and is off by several per cent here.
    CUDA takes its own route (cuSOLVER's gesvda driver): the same accuracy."""
    h = _massive_hidden(2, 144, 512, seed=0)
    reference = _sv_float64(h)
    got = tokencarve_information(h.to(device)).cpu()
    assert float(((got.double() - reference).abs() / reference).max()) < 1e-3
    evals, evecs = torch.linalg.eigh(h @ h.mT)  # the former fp32 Gram route, kept here as the contrast
    gram = (evecs * evals.clamp_min(0).sqrt().unsqueeze(1)).abs().sum(dim=-1)
    assert float(((gram.double() - reference).abs() / reference).max()) > 1e-2
    # the kept set is the one the float64 definition gives
    attn = torch.rand(2, 144, generator=torch.Generator().manual_seed(1))
    out = tokencarve_fuse_and_merge(attn, h, keep=32, weight=0.5)
    for i in range(2):
        kept, _ = ref_tokencarve(attn[i].tolist(), h[i], 32, 0.5)
        assert out.indices[i].tolist() == kept


@HSET
@given(
    b=st.integers(1, 3),
    n=st.integers(1, 14),
    d=st.integers(1, 20),
    w=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_tokencarve_matches_reference(b, n, d, w, seed, data):
    keep = data.draw(st.integers(1, n))
    gen = torch.Generator().manual_seed(seed)
    attn = torch.rand(b, n, generator=gen)
    hidden = torch.randn(b, n, d, generator=gen)
    out = tokencarve_fuse_and_merge(attn, hidden, keep, w)
    assert out.indices.shape == (b, keep) and out.hidden.shape == (b, keep, d)
    for i in range(b):
        kept, rows = ref_tokencarve(attn[i].tolist(), hidden[i], keep, w)
        assert out.indices[i].tolist() == kept
        torch.testing.assert_close(out.hidden[i].double(), rows, atol=1e-5, rtol=1e-5)


def test_tokencarve_keep_all_is_identity():
    h = torch.randn(2, 7, 5)
    out = tokencarve_fuse_and_merge(torch.rand(2, 7), h, 7)
    assert out.indices.tolist() == [list(range(7))] * 2
    torch.testing.assert_close(out.hidden, h)


# ----------------------------------------------------------------------------------------------------------
# iLLaVA
# ----------------------------------------------------------------------------------------------------------


def test_illava_hand_example():
    scores = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    hidden = torch.tensor([[1.0], [2.0], [4.0], [8.0]])[None]
    out = illava_weighted_merge(scores, hidden, 1)
    # ranking 0, 2, 3, 1: token 1 is removed and folded into token 3 with weights 1 (token 3) and 2 (token 1)
    assert out.indices[0].tolist() == [0, 2, 3]
    torch.testing.assert_close(out.hidden[0], torch.tensor([[1.0], [4.0], [(8.0 + 2 * 2.0) / 3]]))
    same = illava_weighted_merge(scores, hidden, 0)
    torch.testing.assert_close(same.hidden, hidden)


@HSET
@given(
    b=st.integers(1, 3),
    n=st.integers(1, 12),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_illava_matches_reference(b, n, ties, seed, data):
    r = data.draw(st.integers(0, n - 1))
    gen = torch.Generator().manual_seed(seed)
    scores = make_scores("ties" if ties else "gauss", b, n, gen)
    hidden = torch.randn(b, n, 3, generator=gen)
    out = illava_weighted_merge(scores, hidden, r)
    for i in range(b):
        order = ref_order(scores[i].tolist(), None)
        tail = order[n - r - 1 :]
        merged = sum((q + 1) * hidden[i, t].double() for q, t in enumerate(tail)) / ((r + 1) * (r + 2) / 2)
        rows = {t: hidden[i, t].double() for t in order[: n - r]}
        rows[tail[0]] = merged
        assert out.indices[i].tolist() == sorted(rows)
        torch.testing.assert_close(
            out.hidden[i].double(), torch.stack([rows[t] for t in sorted(rows)]), atol=1e-5, rtol=1e-5
        )


# ----------------------------------------------------------------------------------------------------------
# batch invariance and dtypes (all selectors)
# ----------------------------------------------------------------------------------------------------------


def _run_all(feats, scores, valid, k):
    n = feats.shape[1]
    kernel = cdpruner_kernel(feats, scores, valid)
    return {
        "topk": topk_indices(scores, k, valid),
        "vispruner": vispruner_select(scores, feats, k, 0.5, 3, valid),
        "dpp": dpp_greedy(kernel, k, valid, sort=False),
        "maxmin": maxmin_diversity(feats, k, valid, sort=False),
        "dpc": dpc_knn_cluster(feats, max(1, k), 3, valid)[:3],
        "visionzip": visionzip_merge(feats, feats, max(1, k)),
        "tokencarve": tokencarve_fuse_and_merge(scores, feats, max(1, k)),
        "illava": illava_weighted_merge(scores, feats, min(k, n - 1)),
    }


def _same(a, b, exact: bool):
    for x, y in zip(a, b, strict=True):
        if x.is_floating_point() and not exact:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
        else:
            assert torch.equal(x, y)


@HSET
@given(case=cases(max_n=12), data=st.data())
def test_batch_invariance(case, data):
    kind, b, n, d, k, masked, seed = case
    gen = torch.Generator().manual_seed(seed)
    feats = make_features(kind, b, n, d, gen)
    scores = make_scores(data.draw(st.sampled_from(["gauss", "ties"])), b, n, gen)
    valid = make_valid(masked, b, n, gen)
    whole = _run_all(feats, scores, valid, k)
    for i in range(b):
        one = _run_all(feats[i : i + 1], scores[i : i + 1], None if valid is None else valid[i : i + 1], k)
        for name in whole:
            _same([t[i : i + 1] for t in whole[name]], one[name], exact=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@HSET
@given(case=cases(max_n=12, kinds=("gauss", "lattice")))
def test_half_precision_inputs_select_like_float32(dtype, case):
    kind, b, n, d, k, masked, seed = case
    gen = torch.Generator().manual_seed(seed)
    feats = make_features(kind, b, n, d, gen).to(dtype)
    scores = make_scores("gauss", b, n, gen).to(dtype)
    valid = make_valid(masked, b, n, gen)
    low = _run_all(feats, scores, valid, k)
    ref = _run_all(feats.float(), scores.float(), valid, k)
    for name in low:
        for x, y in zip(low[name], ref[name], strict=True):
            if x.is_floating_point():  # merged hidden states come back in the input dtype
                assert x.dtype == dtype
                torch.testing.assert_close(x.float(), y.to(dtype).float())
            else:
                assert torch.equal(x, y), name


def test_all_invalid_rows_give_padding_only():
    feats = torch.randn(2, 5, 3)
    scores = torch.randn(2, 5)
    valid = torch.zeros(2, 5, dtype=torch.bool)
    valid[1, 2] = True
    for name, out in _run_all(feats, scores, valid, 3).items():
        if name in ("topk", "vispruner", "dpp", "maxmin"):
            assert out.valid[0].tolist() == [False] * 3, name
            assert out.indices[0].tolist() == [PAD_INDEX] * 3, name
            assert out.valid[1].tolist() == [True, False, False], name
            assert out.indices[1].tolist() == [2, PAD_INDEX, PAD_INDEX], name


# ----------------------------------------------------------------------------------------------------------
# CUDA: no host sync inside the greedy loops
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_greedy_selectors_do_not_sync_on_cuda():
    dev = "cuda"
    feats = torch.randn(4, 64, 32, device=dev)
    scores = torch.randn(4, 64, device=dev)
    valid = torch.rand(4, 64, device=dev) < 0.8
    kernel = cdpruner_kernel(feats, scores, valid)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        topk_indices(scores, 16, valid)
        cdpruner_kernel(feats, scores, valid)
        vispruner_select(scores, feats, 16, 0.5, 8, valid)
        dpp_greedy(kernel, 16, valid)
        maxmin_diversity(feats, 16, valid)
        dpc_knn_cluster(feats, 4, 4, valid)
        visionzip_merge(feats, feats, 8)
        illava_weighted_merge(scores, feats, 10)
    finally:
        torch.cuda.set_sync_debug_mode("default")
