"""Run the fused greedy kernels under Triton's interpreter on CPU and compare them with the torch loops.

Run by tests/test_greedy_kernels.py in a subprocess with ``TRITON_INTERPRET=1`` in its environment (the
interpreter must be chosen before triton is imported, and must not leak into other tests). Prints one JSON
object: ``{"probe": ...}`` when this triton's interpreter cannot run a loop with a runtime bound here
(triton < 3.9 with numpy >= 2.4), else ``{"cases": {name: {"torch": [...], "fused": [...]}}}`` with, per
case, the indices and validity of both paths in pick order and in raster order.
"""

from __future__ import annotations

import json
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
os.environ["VTPRUNE_TRITON"] = "strict"  # a kernel error must fail, not fall back to torch

from vtprune import selection  # noqa: E402
from vtprune.kernels import greedy  # noqa: E402
from vtprune.methods import scope, vispruner  # noqa: E402
from vtprune.methods.cdpruner import cdpruner_kernel  # noqa: E402


def probe() -> str | None:
    """None if the interpreter runs a kernel with a runtime loop bound, else the error."""
    import triton
    import triton.language as tl

    @triton.jit
    def count(out_ptr, n):
        acc = 0
        for _ in range(0, n):
            acc += 1
        tl.store(out_ptr, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](out, 3)
    except Exception as exc:  # the interpreter wraps numpy's TypeError in its own error type
        return f"triton {triton.__version__}: {exc!r}"
    return None if int(out) == 3 else f"triton {triton.__version__}: wrong loop count {int(out)}"


def lattice_kernel(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """S in {0, ±1}, ρ in {1/4, 1/2, 1, 2}: exact arithmetic, many exact ties and exhausted candidates."""
    axes = torch.cat([torch.eye(3), -torch.eye(3)])
    rows = axes[torch.randint(0, 6, (b, n), generator=gen)]
    rho = torch.tensor([0.25, 0.5, 1.0, 2.0])[torch.randint(0, 4, (b, n), generator=gen)]
    return rho[..., :, None] * (rows @ rows.transpose(1, 2)) * rho[..., None, :]


def dup_features(b: int, n: int, d: int, distinct: int, gen: torch.Generator) -> torch.Tensor:
    base = torch.randn(b, distinct, d, generator=gen)
    pick = torch.randint(0, distinct, (b, n), generator=gen)
    return base.gather(1, pick.unsqueeze(-1).expand(-1, -1, d))


def masks(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Random mask, plus one row with a single valid token and (if b > 2) one row with none."""
    valid = torch.rand(b, n, generator=gen) < 0.6
    valid[1] = False
    valid[1, n // 2] = True
    if b > 2:
        valid[2] = False
    return valid


def both(fn, *args, **kwargs) -> dict:
    """Torch and fused results of a private selector (``fused`` is its cache-key flag), pick and raster order."""
    out = {}
    for name, fused in (("torch", False), ("fused", True)):
        rows = []
        for sort in (False, True):
            p = fn(*args, sort=sort, fused=fused, **kwargs)
            rows.append([p.indices.tolist(), p.valid.tolist()])
        out[name] = rows
    return out


def dpp(kernel, k, valid=None, tol=1e-5):
    return both(selection._dpp_greedy, kernel, k, valid, exhaustion_tol=tol)


def maxmin(feats, k, valid=None, dup_tol=1e-6):
    return both(selection._maxmin_diversity, feats, k, valid, dup_tol=dup_tol)


def scope_case(feats, sal, k, alpha=1.0, combine="multi", valid=None, raster=False):
    """Pick order only (the interpreter is slow; the raster order is picked_from's), unless ``raster``."""
    if raster:
        return both(scope._scope_select, feats, sal, k, alpha, combine, valid)
    out = {}
    for name, fused in (("torch", False), ("fused", True)):
        p = scope._scope_select(feats, sal, k, alpha, combine, valid, sort=False, fused=fused)
        out[name] = [p.indices.tolist(), p.valid.tolist()]
    return out


def graded_masks(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Row r keeps about (r + 1) / (b + 1) of the tokens: a different valid count per row."""
    keep = torch.arange(1, b + 1, dtype=torch.float32)[:, None] / (b + 1)
    return torch.rand(b, n, generator=gen) < keep


def vis(attn, feats, keep, ratio, removal, valid=None):
    out = {}
    for name, fused in (("torch", False), ("fused", True)):
        p = vispruner._vispruner_select(attn, feats, keep, ratio, removal, valid, dup_tol=1e-6, fused=fused)
        out[name] = [p.indices.tolist(), p.valid.tolist()]
    return out


def main() -> None:
    problem = probe()
    if problem is not None:
        print(json.dumps({"probe": problem}))
        return
    gen = torch.Generator().manual_seed(0)
    cases = {}
    lazy_fraction = {}
    # --- DPP greedy MAP ---
    n = 37  # not a power of two; k = N crosses a ROWS tile of Cholesky rows (32 at this N)
    feats = torch.randn(3, n, 8, generator=gen)
    kernel = cdpruner_kernel(feats, torch.randn(3, n, generator=gen))
    for k in (1, 7, n):
        cases[f"dpp_gauss_k{k}"] = dpp(kernel, k)
        cases[f"dpp_gauss_masked_k{k}"] = dpp(kernel, k, masks(3, n, gen))
    cases["dpp_fp16_noncontiguous"] = dpp(kernel.half().transpose(1, 2), 12)
    cases["dpp_lattice_ties"] = dpp(lattice_kernel(3, 24, gen), 24)
    cases["dpp_lattice_ties_masked"] = dpp(lattice_kernel(3, 24, gen), 24, masks(3, 24, gen))
    dups = dup_features(2, 30, 6, 5, gen)  # rank 5: exhaustion guard after 5 picks, exact-0 ties
    cases["dpp_duplicates"] = dpp(cdpruner_kernel(dups, torch.randn(2, 30, generator=gen)), 30)
    cases["dpp_flat_diag"] = dpp(torch.eye(20).expand(2, 20, 20).contiguous(), 20)  # all gains tie, always
    nan_kernel = kernel.clone()
    nan_kernel[0, 5, 5] = float("nan")
    cases["dpp_nan"] = dpp(nan_kernel, 6)
    # --- max–min diversity ---
    feats = torch.randn(3, n, 16, generator=gen)
    for k in (1, 9, n):
        cases[f"maxmin_gauss_k{k}"] = maxmin(feats, k)
        cases[f"maxmin_gauss_masked_k{k}"] = maxmin(feats, k, masks(3, n, gen))
    cases["maxmin_duplicates"] = maxmin(dup_features(3, 30, 6, 4, gen), 30)
    cases["maxmin_duplicates_masked"] = maxmin(dup_features(3, 30, 6, 4, gen), 30, masks(3, 30, gen))
    cases["maxmin_axes_ties"] = maxmin(
        torch.eye(4).repeat(1, 5, 1) * torch.rand(1, 20, 1, generator=gen) + 0.0, 20
    )
    nan_feats = feats.clone()
    nan_feats[1, 3, 0] = float("nan")
    cases["maxmin_nan"] = maxmin(nan_feats, 5)
    # --- VisPruner duplicate-removal rounds ---
    n = 41
    attn = torch.rand(3, n, generator=gen)
    tied = torch.randint(0, 3, (3, n), generator=gen).float()  # many exact attention ties
    feats = torch.randn(3, n, 8, generator=gen)
    dups = dup_features(3, n, 8, 6, gen)  # exact-1 cosine ties in m(a)
    for keep, ratio, removal in (
        (1, 0.0, 8),
        (12, 0.5, 8),
        (12, 0.0, 3),
        (30, 0.25, 1),
        (n, 0.5, 8),
        (n - 1, 0.0, 2),
    ):
        tag = f"k{keep}_r{ratio}_m{removal}"
        cases[f"vis_gauss_{tag}"] = vis(attn, feats, keep, ratio, removal)
        cases[f"vis_ties_masked_{tag}"] = vis(tied, dups, keep, ratio, removal, masks(3, n, gen))
    cases["vis_dups_ties"] = vis(tied, dups, 20, 0.5, 4)
    # small register tile: many ROWS tiles per step (ROWS = 4 at N = 37)
    greedy._TILE_ELEMENTS = 256
    cases["dpp_small_tiles"] = dpp(kernel, n)
    cases["maxmin_small_tiles"] = maxmin(feats, n, masks(3, n, gen))
    cases["vis_small_tiles"] = vis(tied, dups, 16, 0.25, 3, masks(3, 41, gen))
    # --- SCOPE (its own generator: the cases above keep their inputs) ---
    gen = torch.Generator().manual_seed(1)
    s_n = 37
    s_feats = torch.randn(3, s_n, 8, generator=gen)
    s_sal = torch.rand(3, s_n, generator=gen)
    for k in (1, 7, s_n):
        cases[f"scope_gauss_k{k}"] = scope_case(s_feats, s_sal, k)
        cases[f"scope_gauss_masked_k{k}"] = scope_case(
            s_feats, s_sal, k, valid=masks(3, s_n, gen), raster=True
        )
    cases["scope_graded_masks_k35"] = scope_case(s_feats, s_sal, s_n - 2, valid=graded_masks(3, s_n, gen))
    for alpha, combine in ((0.0, "multi"), (0.5, "multi"), (2.0, "multi"), (1.0, "add"), (0.5, "add")):
        cases[f"scope_{combine}_a{alpha}"] = scope_case(
            s_feats, s_sal, 12, alpha, combine, masks(3, s_n, gen)
        )
    # duplicates (identical columns: exact gain ties, then exact-0 gains) with tied saliency
    s_dups = dup_features(3, 30, 6, 5, gen)
    s_tied = torch.randint(0, 3, (3, 30), generator=gen).float()  # 0 makes every multi score 0
    cases["scope_duplicates"] = scope_case(s_dups, s_tied, 30)
    cases["scope_duplicates_masked"] = scope_case(s_dups, s_tied, 29, valid=graded_masks(3, 30, gen))
    cases["scope_duplicates_add"] = scope_case(s_dups, s_tied, 30, 1.0, "add")
    cases["scope_zero_saliency"] = scope_case(s_feats, torch.zeros(3, s_n), 9)  # all scores 0: lower index
    # ±axes: similarities exactly 0 / ±1, gains exact integers, saliency on a few exact values
    axes = torch.cat([torch.eye(4), -torch.eye(4)])[torch.randint(0, 8, (2, 24), generator=gen)]
    rho = torch.tensor([0.25, 0.5, 1.0, 2.0])[torch.randint(0, 4, (2, 24), generator=gen)]
    cases["scope_axes_ties"] = scope_case(axes, rho, 24)
    cases["scope_axes_ties_add"] = scope_case(axes, rho, 24, 0.5, "add", masks(2, 24, gen))
    nan_feats = s_feats.clone()
    nan_feats[0, 4, 1] = float("nan")
    nan_sal = s_sal.clone()
    nan_sal[2, 6] = float("nan")
    cases["scope_nan"] = scope_case(nan_feats, nan_sal, 5)
    wide = torch.randn(2, 80, 16, generator=gen)  # several BLOCK_J column chunks at the default tile
    cases["scope_n80"] = scope_case(
        wide, torch.rand(2, 80, generator=gen), 24, valid=graded_masks(2, 80, gen)
    )
    # features around a common direction and peaked saliency, as in a real image: the lazy evaluation skips
    # most column chunks here (the fraction it computed is reported)
    common = dup_features(2, 96, 16, 96, gen) + 3.0 * torch.randn(1, 1, 16, generator=gen)
    peaked = torch.softmax(4.0 * torch.randn(2, 96, generator=gen), dim=-1)
    greedy._SCOPE_TILE = (16, 32, 4)  # 6 column chunks, 3 row tiles
    for combine in ("multi", "add"):
        cases[f"scope_lazy_{combine}"] = scope_case(
            common, peaked, 40, 1.0, combine, graded_masks(2, 96, gen)
        )
        computed, total = greedy._scope_chunks
        lazy_fraction[combine] = computed.float().mean().item() / total
    greedy._SCOPE_TILE = (16, 8, 4)  # 3 column chunks and 5 row tiles at N = 37, both with a partial last one
    cases["scope_small_tiles"] = scope_case(s_feats, s_sal, s_n, 1.0, "multi", masks(3, s_n, gen))
    cases["scope_small_tiles_add"] = scope_case(dup_features(3, s_n, 6, 7, gen), s_sal, 20, 2.0, "add")
    greedy._SCOPE_TILE = None
    greedy._SCOPE_LAZY = False  # every chunk at every step
    cases["scope_full_masked_k37"] = scope_case(s_feats, s_sal, s_n, valid=masks(3, s_n, gen))
    cases["scope_full_duplicates_add"] = scope_case(s_dups, s_tied, 30, 0.5, "add")
    greedy._SCOPE_LAZY = True
    # public entry points dispatch to the fused path under the interpreter
    used = []
    real = selection.dpp_greedy_fused
    selection.dpp_greedy_fused = lambda *a, **kw: used.append("dpp") or real(*a, **kw)
    real_mm = selection.maxmin_fused
    selection.maxmin_fused = lambda *a, **kw: used.append("maxmin") or real_mm(*a, **kw)
    selection.dpp_greedy(kernel, 3)
    selection.maxmin_diversity(feats, 3)
    selection.dpp_greedy(kernel, 0)  # k = 0 stays on the torch path
    real_vis = vispruner.vispruner_rounds_fused
    vispruner.vispruner_rounds_fused = lambda *a, **kw: used.append("vispruner") or real_vis(*a, **kw)
    vispruner.vispruner_select(attn, feats, 12)
    real_scope = scope.scope_fused
    scope.scope_fused = lambda *a, **kw: used.append("scope") or real_scope(*a, **kw)
    scope.scope_select(s_feats, s_sal, 4)
    scope.scope_select(s_feats, s_sal, 0)  # k = 0 stays on the torch path
    print(json.dumps({"cases": cases, "dispatched": used, "scope_lazy_fraction": lazy_fraction}))


if __name__ == "__main__":
    sys.exit(main())
