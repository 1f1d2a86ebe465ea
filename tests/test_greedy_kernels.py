"""Fused Triton greedy kernels (vtprune/kernels/greedy.py) pick exactly what the torch loops pick.

The kernels run on CPU tensors under Triton's interpreter, in a subprocess with ``TRITON_INTERPRET=1``
(tests/greedy_kernels_cases.py): the variable must be set before triton is imported and must not reach the
other tests. Skipped when triton is not installed; the dispatch tests below need no triton.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vtprune import selection
from vtprune.kernels import greedy
from vtprune.methods.cdpruner import cdpruner_kernel
from vtprune.methods.scope import scope_select
from vtprune.methods.vispruner import vispruner_select

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "VTPRUNE_TRITON_VISPRUNER": "1",  # VisPruner's kernel is opt-in
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "greedy_kernels_cases.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "probe" in out:
        pytest.skip(
            f"this triton's interpreter cannot run here (needs triton >= 3.9 with numpy >= 2.4): {out['probe']}"
        )
    return out


CASES = [
    *(f"dpp_gauss_k{k}" for k in (1, 7, 37)),
    *(f"dpp_gauss_masked_k{k}" for k in (1, 7, 37)),
    "dpp_fp16_noncontiguous",
    "dpp_lattice_ties",
    "dpp_lattice_ties_masked",
    "dpp_duplicates",
    "dpp_flat_diag",
    "dpp_nan",
    "dpp_small_tiles",
    *(f"maxmin_gauss_k{k}" for k in (1, 9, 37)),
    *(f"maxmin_gauss_masked_k{k}" for k in (1, 9, 37)),
    "maxmin_duplicates",
    "maxmin_duplicates_masked",
    "maxmin_axes_ties",
    "maxmin_nan",
    "maxmin_small_tiles",
    *(
        f"vis_{kind}_k{keep}_r{ratio}_m{removal}"
        for kind in ("gauss", "ties_masked")
        for keep, ratio, removal in (
            (1, 0.0, 8),
            (12, 0.5, 8),
            (12, 0.0, 3),
            (30, 0.25, 1),
            (41, 0.5, 8),
            (40, 0.0, 2),
        )
    ),
    "vis_dups_ties",
    "vis_small_tiles",
    *(f"scope_gauss_k{k}" for k in (1, 7, 37)),
    *(f"scope_gauss_masked_k{k}" for k in (1, 7, 37)),
    "scope_graded_masks_k35",
    *(f"scope_multi_a{a}" for a in (0.0, 0.5, 2.0)),
    *(f"scope_add_a{a}" for a in (1.0, 0.5)),
    "scope_duplicates",
    "scope_duplicates_masked",
    "scope_duplicates_add",
    "scope_zero_saliency",
    "scope_axes_ties",
    "scope_axes_ties_add",
    "scope_nan",
    "scope_n80",
    "scope_small_tiles",
    "scope_small_tiles_add",
    "scope_full_masked_k37",
    "scope_full_duplicates_add",
    "scope_lazy_multi",
    "scope_lazy_add",
]


@pytest.mark.parametrize("case", CASES)
def test_fused_equals_torch(interpreted, case):
    result = interpreted["cases"][case]
    assert result["fused"] == result["torch"]


def test_cases_cover_all_runs(interpreted):
    assert sorted(interpreted["cases"]) == sorted(CASES)


def test_public_functions_dispatch_to_fused(interpreted):
    assert interpreted["dispatched"] == ["dpp", "maxmin", "vispruner", "scope"]


def test_scope_lazy_evaluation_skips_chunks(interpreted):
    # scope_lazy_*: the same picks as the torch loop (test_fused_equals_torch) while computing only part of
    # the column chunks (the lazy path is exercised, not only the first step's full pass)
    fractions = interpreted["scope_lazy_fraction"]
    assert set(fractions) == {"multi", "add"}
    assert all(0 < f < 0.7 for f in fractions.values()), fractions


def test_cpu_stays_on_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("VTPRUNE_TRITON", raising=False)
    assert not greedy.fused_enabled(torch.zeros(2, 3), 3)


def test_switch_off(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VTPRUNE_TRITON", "0")
    assert not greedy.fused_enabled(torch.zeros(2, 3), 3)
    monkeypatch.setenv("VTPRUNE_TRITON", "1")
    assert not greedy.fused_enabled(torch.zeros(2, 3), greedy.MAX_FUSED_N + 1)  # too wide for one block


def test_kernel_failure_falls_back_to_torch(monkeypatch):
    # a GPU the installed triton cannot compile for: warn once, run the torch loop, stop trying
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets CPU tensors dispatch; triton itself is never imported
    monkeypatch.setenv("VTPRUNE_TRITON", "1")
    monkeypatch.setenv("VTPRUNE_TRITON_VISPRUNER", "1")
    monkeypatch.setattr(greedy, "triton_available", lambda: True)
    monkeypatch.setattr(greedy, "_failure", None)

    def no_compiler():
        raise RuntimeError("no compiler for this GPU")

    monkeypatch.setattr(greedy, "_kernels", no_compiler)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 12, 4, generator=gen)
    kernel = cdpruner_kernel(feats, torch.randn(2, 12, generator=gen))
    attn = torch.rand(2, 12, generator=gen)
    with pytest.warns(RuntimeWarning, match="no compiler for this GPU"):
        got = selection.dpp_greedy(kernel, 5)
    assert greedy._failure is not None and not greedy.fused_enabled(kernel, 12)
    monkeypatch.setenv("VTPRUNE_TRITON", "0")
    assert torch.equal(got.indices, selection.dpp_greedy(kernel, 5).indices)
    monkeypatch.setenv("VTPRUNE_TRITON", "strict")
    with pytest.raises(RuntimeError, match="no compiler"):
        selection.maxmin_diversity(feats, 3)
    with pytest.raises(RuntimeError, match="no compiler"):
        vispruner_select(attn, feats, 4)
    with pytest.raises(RuntimeError, match="no compiler"):
        scope_select(feats, attn, 4)
    monkeypatch.setattr(greedy, "_failure", None)
    monkeypatch.setenv("VTPRUNE_TRITON", "1")
    calls = (
        lambda: selection.maxmin_diversity(feats, 3),
        lambda: vispruner_select(attn, feats, 4),
        lambda: scope_select(feats, attn, 4, valid=attn > 0.3),
    )
    for call in calls:
        with pytest.warns(RuntimeWarning):
            fallback = call()
        monkeypatch.setattr(greedy, "_failure", None)
        monkeypatch.setenv("VTPRUNE_TRITON", "0")
        assert torch.equal(fallback.indices, call().indices)
        monkeypatch.setenv("VTPRUNE_TRITON", "1")


def test_works_without_triton():
    # a CPU install without triton: the selectors import and run, the kernels module is never loaded
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from vtprune import selection\n"
        "from vtprune.kernels import greedy\n"
        "assert not greedy.triton_available()\n"
        "assert selection.maxmin_diversity(torch.randn(2, 9, 4), 3).indices.shape == (2, 3)\n"
        "from vtprune.methods.scope import scope_select\n"
        "assert scope_select(torch.randn(2, 9, 4), torch.rand(2, 9), 3).indices.shape == (2, 3)\n"
        "assert 'vtprune.kernels._greedy_triton' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env=env)


def test_gpu_benchmark_smoke_run(interpreted, tmp_path):
    # benchmarks/greedy_kernels_gpu.py at toy sizes on CPU under the interpreter: the script itself runs,
    # compares both paths and writes its JSON (its real use is on a GPU)
    out = tmp_path / "greedy.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "greedy_kernels_gpu.py"),
        "--output",
        str(out),
        "--device",
        "cpu",
    ]
    cmd += [
        "--batch",
        "2",
        "--tokens",
        "24",
        "--keeps",
        "3,8",
        "--dim",
        "8",
        "--clip-dim",
        "8",
        "--warmup",
        "0",
    ]
    cmd += ["--repeats", "1"]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["problems"] == []
    assert len(report["rows"]) == 6 and all(row["equal"] for row in report["rows"])


def test_scope_gpu_benchmark_smoke_run(interpreted, tmp_path):
    # benchmarks/scope_kernel_gpu.py at toy sizes on CPU under the interpreter (its real use is on a GPU)
    out = tmp_path / "scope.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scope_kernel_gpu.py"), "--output", str(out)]
    cmd += ["--device", "cpu", "--batch", "2", "--tokens", "20", "--dim", "8", "--keeps", "3,7"]
    cmd += ["--warmup", "0", "--repeats", "1"]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["problems"] == []
    assert len(report["rows"]) == 4 and all(row["equal"] for row in report["rows"])


def test_scope_benchmark_refuses_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "scope_kernel_gpu.py"),
            "--output",
            str(tmp_path / "x.json"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "needs a GPU" in proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("tokens,keep", [(576, 64), (576, 192), (2928, 320)])
def test_cuda_fused_equals_torch(monkeypatch, tokens, keep):
    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(tokens + keep)
    feats = torch.randn(3, tokens, 256, device="cuda", generator=g)
    attn = torch.rand(3, tokens, device="cuda", generator=g)
    valid = torch.rand(3, tokens, device="cuda", generator=g) < 0.9
    kernel = cdpruner_kernel(feats, attn)
    calls = [
        lambda: selection.dpp_greedy(kernel, keep, valid),
        lambda: selection.maxmin_diversity(feats, keep, valid),
        lambda: vispruner_select(attn, feats, keep, valid=valid),
    ]
    monkeypatch.setenv("VTPRUNE_TRITON", "strict")
    fused = [c() for c in calls]
    monkeypatch.setenv("VTPRUNE_TRITON", "0")
    for got, call in zip(fused, calls, strict=True):
        expected = call()
        assert torch.equal(got.indices, expected.indices)
        assert torch.equal(got.valid, expected.valid)


def _scope_divergence_is_near_tie(feats, sal, valid, alpha, combine, torch_order, fused_order) -> list[str]:
    """Rows whose pick orders differ at a slot where the two picks' scores (float64, same coverage) are
    not equal to within float32 summation error (N * 2^-23 relative): the kernel's documented contract."""
    import torch.nn.functional as F

    problems = []
    n = feats.shape[1]
    tol = n * 2.0**-23
    for row in range(feats.shape[0]):
        a, b = torch_order[row].tolist(), fused_order[row].tolist()
        if a == b:
            continue
        slot = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        if a[slot] < 0 or b[slot] < 0:
            problems.append(f"row {row} slot {slot}: {a[slot]} vs {b[slot]} (validity differs)")
            continue
        x = F.normalize(feats[row].double(), dim=-1)
        sim = x @ x.T
        w = sal[row].double().clamp(min=0) ** alpha
        cov = torch.zeros(n, dtype=torch.float64, device=feats.device)
        for p in a[:slot]:
            cov = torch.maximum(cov, sim[p])
        gain = (torch.relu(sim - cov[:, None]) * valid[row].double()[:, None]).sum(0)
        score = gain * w if combine == "multi" else gain + w
        sa, sb = float(score[a[slot]]), float(score[b[slot]])
        if abs(sa - sb) > tol * max(abs(sa), abs(sb)):
            problems.append(f"row {row} slot {slot}: {a[slot]} ({sa}) vs {b[slot]} ({sb})")
    return problems


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("tokens,keep,combine", [(576, 64, "multi"), (576, 192, "add"), (2928, 320, "multi")])
def test_cuda_scope_fused_equals_torch(monkeypatch, tokens, keep, combine):
    # the gains are float32 sums in another order than torch's reduction: picks agree up to near-ties
    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(tokens + keep)
    feats = torch.randn(3, tokens, 256, device="cuda", generator=g)
    sal = torch.rand(3, tokens, device="cuda", generator=g)
    valid = torch.rand(3, tokens, device="cuda", generator=g) < 0.9
    monkeypatch.setenv("VTPRUNE_TRITON", "strict")
    fused = scope_select(feats, sal, keep, 0.5, combine, valid, sort=False)
    monkeypatch.setenv("VTPRUNE_TRITON", "0")
    expected = scope_select(feats, sal, keep, 0.5, combine, valid, sort=False)
    assert torch.equal(fused.valid, expected.valid)
    assert (
        _scope_divergence_is_near_tie(feats, sal, valid, 0.5, combine, expected.indices, fused.indices) == []
    )
    dups = feats[:, torch.arange(tokens, device="cuda") % 40]  # 40 distinct tokens: exact ties
    tied = sal.round(decimals=1)
    monkeypatch.setenv("VTPRUNE_TRITON", "strict")
    fused = scope_select(dups, tied, keep, 1.0, combine, sort=False)
    monkeypatch.setenv("VTPRUNE_TRITON", "0")
    expected = scope_select(dups, tied, keep, 1.0, combine, sort=False)
    everyone = torch.ones_like(valid)
    assert (
        _scope_divergence_is_near_tie(dups, tied, everyone, 1.0, combine, expected.indices, fused.indices)
        == []
    )
