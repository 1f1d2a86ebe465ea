"""Graph-replayed greedy selectors give exactly the plain results (CUDA only; skipped on CPU)."""

from __future__ import annotations

import pytest
import torch

from vtprune import selection
from vtprune.methods.cdpruner import cdpruner_kernel
from vtprune.methods.dart import dart_select
from vtprune.methods.scope import scope_select
from vtprune.methods.vispruner import vispruner_select

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@cuda
@pytest.mark.parametrize("batch", [1, 4])
def test_graphed_selectors_equal_plain(monkeypatch, batch):
    g = torch.Generator(device="cuda").manual_seed(0)
    feats = torch.randn(batch, 576, 64, device="cuda", generator=g)
    attn = torch.rand(batch, 576, device="cuda", generator=g)
    kernel = cdpruner_kernel(feats, attn)
    calls = [
        lambda: vispruner_select(attn, feats, 64),
        lambda: selection.dpp_greedy(kernel, 64),
        lambda: selection.maxmin_diversity(feats, 64),
        lambda: scope_select(feats, attn, 64),
        lambda: dart_select(feats, attn, 64, 4, text_features=feats[:, :8], text_scores=attn[:, :8],
                            num_text_pivots=4)[0],
    ]
    graphed = [[c() for _ in range(3)] for c in calls]  # capture, then two replays
    monkeypatch.setenv("VTPRUNE_CUDA_GRAPHS", "0")
    plain = [c() for c in calls]
    for runs, expected in zip(graphed, plain, strict=True):
        for picked in runs:
            assert torch.equal(picked.indices, expected.indices)
            assert torch.equal(picked.valid, expected.valid)


def test_cpu_calls_are_plain():
    feats = torch.randn(2, 30, 8)
    assert selection.maxmin_diversity(feats, 5).indices.shape == (2, 5)
