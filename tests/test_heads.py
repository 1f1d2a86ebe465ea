"""Head-scoring strategies, dynamic head count and resource-aware selection (docs/methods/attention_options.md)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vtprune.signals.heads import (
    HEAD_STRATEGIES,
    HeadPolicy,
    attention_range,
    combination_quality,
    combine_heads,
    dynamic_head_count,
    graph_based,
    head_count_estimates,
    hierarchical,
    image_mass,
    max_attention,
    multi_objective,
    resource_candidates,
    scale_head_range,
    select_heads,
    sparsity,
    strategy_scores,
    top_heads_mask,
    top_k_sum,
)

# Three heads over four image tokens (one query row already averaged):
#   h0 one-hot (mass 0.4), h1 uniform (mass 0.4), h2 split over two tokens (mass 0.6).
# Cosines: cos(h0,h1) = 0.5, cos(h0,h2) = cos(h1,h2) = 1/sqrt(2).
TOY = torch.tensor([[[0.4, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1], [0.3, 0.3, 0.0, 0.0]]])
R2 = 1 / math.sqrt(2)


def close(a: torch.Tensor, b: list[float], tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, torch.tensor([b], dtype=a.dtype), rtol=tol, atol=tol)


def random_attention(b: int, h: int, q: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, h, q, n + 8, generator=g) * 2.0
    return logits.softmax(-1)[..., :n]  # rows also attend to 8 non-visual keys, as in the LLM


# ---------------------------------------------------------------- strategies, hand-computed


def test_sparsity_extremes_and_half():
    close(sparsity(TOY), [1.0, 0.0, 1 - math.log(2) / math.log(4)])  # one-hot 1, uniform 0, two-of-four 0.5
    # scale does not matter, zero-mass heads count as uniform
    close(sparsity(torch.tensor([[[0.9, 0.0, 0.0], [0.0, 0.0, 0.0]]])), [1.0, 0.0])


def test_mass_based_strategies():
    close(max_attention(TOY), [0.4, 0.1, 0.3])
    close(attention_range(TOY), [0.4, 0.0, 0.3])
    close(top_k_sum(TOY, k=1), [0.4, 0.1, 0.3])
    close(top_k_sum(TOY, k=2), [0.4, 0.2, 0.6])
    close(top_k_sum(TOY, k=99), [0.4, 0.4, 0.6])  # k clipped to N
    close(top_k_sum(TOY), [0.4, 0.4, 0.6])  # default k = 10 >= N here
    close(image_mass(TOY), [0.4, 0.4, 0.6])


def test_graph_based_pagerank_by_hand():
    # symmetric graph: r0 = r1 = a, r2 = b, 2a + b = 1, b = 0.05 + 0.85 * 2a * (R2 / (0.5 + R2))
    c = 0.85 * 2 * R2 / (0.5 + R2)
    a = 0.95 / (2 + c)  # from b = 0.05 + c a and 2a + b = 1
    b = 1 - 2 * a
    close(graph_based(TOY), [a, a, b])
    assert b == pytest.approx(0.05 + c * a)
    # two identical heads and one orthogonal head (dangling node -> uniform jump):
    # r2 = 0.05 + 0.85 r2 / 3  ->  r2 = 0.15 / 2.15; r0 = r1 = (1 - r2) / 2
    dang = torch.tensor([[[0.5, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.2, 0.2]]])
    r2 = 0.15 / 2.15
    close(graph_based(dang), [(1 - r2) / 2, (1 - r2) / 2, r2])


def test_hierarchical_mass_group_then_sparsity():
    # group = ceil(3/2) = 2 heads by mass: h2 (0.6) and h0 (0.4, beats h1 on the tie by index);
    # inside the group by sparsity: h0 (1.0) before h2 (0.5); h1 outside: 0.5 * 0.4 / 0.6
    close(hierarchical(TOY), [2.0, 0.5 * 0.4 / 0.6, 1.5])
    order = torch.sort(hierarchical(TOY), descending=True, stable=True).indices[0].tolist()
    assert order == [0, 2, 1]
    # group_frac = 1: every head in the group, pure sparsity order
    close(hierarchical(TOY, group_frac=1.0), [2.0, 1.0, 1.5])


def test_multi_objective_blend_by_hand():
    # n(sparsity) = [1, 0, .5]; n(mass) = [0, 0, 1];
    # diversity = [1-(.5+R2)/2, same, 1-R2] -> n = [1, 1, 0]
    close(multi_objective(TOY), [0.4 + 0.3, 0.3, 0.2 + 0.3])


def test_strategies_accept_query_rows_and_mask():
    attn = torch.stack([TOY, TOY * 0.5], dim=2)  # (1, 3, Q=2, 4): mean over rows = 0.75 * TOY
    close(max_attention(attn), [0.3, 0.075, 0.225])
    close(sparsity(attn), [1.0, 0.0, 0.5])
    qmask = torch.tensor([[True, False]])
    close(max_attention(attn, qmask), [0.4, 0.1, 0.3])
    for name in HEAD_STRATEGIES:
        torch.testing.assert_close(
            strategy_scores(attn, name), strategy_scores(attn.mean(2), name), rtol=1e-6, atol=1e-6
        )


def test_registry_has_the_seed_strategies():
    seven = {
        "sparsity",
        "graph_based",
        "hierarchical",
        "top_k_sum",
        "max_attention",
        "multi_objective",
        "attention_range",
    }
    assert seven <= set(HEAD_STRATEGIES)
    with pytest.raises(ValueError):
        strategy_scores(TOY, "entropy")


# ---------------------------------------------------------------- head count


def test_dynamic_count_on_constructed_scores():
    s = torch.tensor([[0.9, 0.85, 0.8, 0.3, 0.25, 0.2, 0.15, 0.1]])
    # gaps [.05,.05,.5,.05,.05,.05,.05]: mean .1143, std .1701 -> threshold .2504 -> first at i=3
    # quality: mean .44375, std .3427 -> threshold .3409 -> 3 heads above
    # contribution: cum [.254,.493,.718,.803,.873,...] -> 4 entries <= .85, +1 = 5
    assert head_count_estimates(s).tolist() == [[3, 3, 5]]
    assert dynamic_head_count(s).tolist() == [3]
    assert dynamic_head_count(s, (4, 6)).tolist() == [4]  # clipped up
    assert dynamic_head_count(s, (1, 2)).tolist() == [2]  # clipped down
    # all three estimates distinct: equal scores -> no gap (H=8), nobody strictly above mean (0),
    # contribution cum = i/8 -> 6 entries <= .85, +1 = 7; median = 7
    eq = torch.full((1, 8), 0.25)
    assert head_count_estimates(eq).tolist() == [[8, 0, 7]]
    assert dynamic_head_count(eq).tolist() == [7]
    # batched = per sample
    both = torch.cat([s, eq])
    assert dynamic_head_count(both).tolist() == [3, 7]


def test_head_range_scaling_and_resource_candidates():
    assert resource_candidates(200) == (("sparsity", "hierarchical"), (14, 26))
    assert resource_candidates(166) == (("sparsity", "hierarchical"), (14, 26))
    assert resource_candidates(165) == (("sparsity", "hierarchical", "top_k_sum", "max_attention"), (8, 26))
    assert resource_candidates(98)[1] == (8, 26)
    assert resource_candidates(97) == (("graph_based", "multi_objective", "attention_range"), (6, 18))
    assert resource_candidates(30)[0][0] == "graph_based"
    # fewer heads: proportional scaling, round half up
    assert resource_candidates(200, num_heads=16)[1] == (7, 13)
    assert resource_candidates(128, num_heads=16)[1] == (4, 13)
    assert resource_candidates(64, num_heads=8)[1] == (2, 5)  # 1.5 -> 2, 4.5 -> 5
    assert scale_head_range((14, 26), 40) == (14, 26)  # more heads: unchanged
    assert scale_head_range((6, 18), 4) == (1, 2)  # 0.75 -> 1, 2.25 -> 2
    with pytest.raises(ValueError):
        resource_candidates(0)


def test_top_heads_mask_ties_lower_index():
    s = torch.tensor([[0.5, 0.7, 0.5, 0.5, 0.1]])
    assert top_heads_mask(s, 2).tolist() == [[True, True, False, False, False]]
    assert top_heads_mask(s, torch.tensor([3])).tolist() == [[True, True, True, False, False]]


# ---------------------------------------------------------------- quality and selection


def test_combination_quality_by_hand():
    mask = torch.tensor([[True, False, True]])
    scores = torch.tensor([[1.0, 0.0, 0.5]])  # sparsity of TOY, already in [0, 1]
    diversity = 1 - R2
    score_quality = (math.sqrt(0.125) + 0.5) / 2  # sample std of {1, .5} and range .5
    # combined attention = [.35, .15, 0, 0]: sample variance .0275, max .35
    attention_quality = 0.0275 * 0.35
    expected = 0.3 * diversity + 0.3 * score_quality + 0.4 * attention_quality
    assert float(combination_quality(TOY, mask, scores)) == pytest.approx(expected, rel=1e-5)
    # a single head: diversity 1, std 0, range 0
    one = torch.tensor([[True, False, False]])
    comb = torch.tensor([0.4, 0.0, 0.0, 0.0])
    assert float(combination_quality(TOY, one, scores)) == pytest.approx(
        0.3 * 1 + 0.4 * float(comb.var() * 0.4), rel=1e-5
    )


def test_combine_heads_mean_over_selected():
    attn = torch.stack([TOY, 2 * TOY], dim=2)  # (1, 3, 2, 4)
    mask = torch.tensor([[True, False, True]])
    out = combine_heads(attn, mask)
    assert out.shape == (1, 2, 4)
    torch.testing.assert_close(out[0, 0], (TOY[0, 0] + TOY[0, 2]) / 2)
    torch.testing.assert_close(combine_heads(TOY, mask)[0], (TOY[0, 0] + TOY[0, 2]) / 2)
    # no head selected -> mean over all heads
    torch.testing.assert_close(combine_heads(TOY, torch.zeros(1, 3, dtype=torch.bool)), TOY.mean(1))


def test_select_fixed_and_dynamic():
    sel = select_heads(TOY, "sparsity", num_heads=2)
    assert sel.indices() == [[0, 2]] and sel.strategy == ["sparsity"] and sel.counts.tolist() == [2]
    assert select_heads(TOY, "max_attention", num_heads=99).counts.tolist() == [3]  # clipped to H
    attn = random_attention(2, 32, 3, 64, seed=1)
    sel = select_heads(attn, "graph_based", num_heads="dynamic", budget=64)
    assert sel.head_range == (6, 18)
    assert all(6 <= c <= 18 for c in sel.counts.tolist())
    assert sel.mask.sum(-1).tolist() == sel.counts.tolist()
    expected = dynamic_head_count(graph_based(attn), (6, 18))
    assert torch.equal(sel.counts, expected)
    json.dumps(sel.to_dict())


@pytest.mark.parametrize("budget", [192, 166, 128, 98, 64, 30])
def test_auto_picks_best_candidate_per_budget(budget):
    attn = random_attention(4, 32, 2, 96, seed=budget)
    sel = select_heads(attn, "auto", budget=budget)
    cands, rng = resource_candidates(budget)
    assert sel.head_range == rng
    for b in range(4):
        one = attn[b : b + 1]
        qualities = []
        for name in cands:
            sc = strategy_scores(one, name)
            mask = top_heads_mask(sc, dynamic_head_count(sc, rng))
            qualities.append(float(combination_quality(one, mask, sc)))
        best = max(range(len(cands)), key=lambda i: (qualities[i], -i))
        assert sel.strategy[b] == cands[best]
        assert float(sel.quality[b]) == pytest.approx(qualities[best], rel=1e-5)
        assert rng[0] <= int(sel.counts[b]) <= rng[1]


def test_auto_chooses_by_quality_on_a_constructed_case():
    # 32 heads: 16 concentrated heads on distinct tokens (sparse, diverse), 16 near-uniform heads with more mass.
    n = 64
    attn = torch.full((1, 32, n), 0.6 / n)
    for h in range(16):
        attn[0, h] = 0.001
        attn[0, h, h] = 0.3
    sel = select_heads(attn, "auto", budget=192)  # candidates sparsity / hierarchical
    assert sel.strategy == ["sparsity"]
    assert set(sel.indices()[0]) == set(range(16))


def test_batched_equals_per_sample():
    attn = random_attention(3, 32, 4, 80, seed=7)
    qmask = torch.tensor([[True] * 4, [False, True, True, True], [False, False, True, True]])
    for strategy, budget in [
        ("auto", 192),
        ("auto", 128),
        ("auto", 64),
        ("hierarchical", None),
        ("mean", None),
    ]:
        batched = select_heads(attn, strategy, budget=budget, query_mask=qmask)
        for b in range(3):
            one = select_heads(attn[b : b + 1], strategy, budget=budget, query_mask=qmask[b : b + 1])
            assert torch.equal(batched.mask[b], one.mask[0])
            assert batched.strategy[b] == one.strategy[0]
            if one.scores is not None:
                torch.testing.assert_close(batched.scores[b], one.scores[0], rtol=1e-6, atol=1e-7)


def test_head_policy():
    assert HeadPolicy.from_spec(None).is_mean
    mean = HeadPolicy().apply(TOY)
    assert mean.indices() == [[0, 1, 2]] and mean.strategy == ["mean"]
    combined, sel = HeadPolicy().combine(TOY)
    torch.testing.assert_close(combined, TOY.mean(1))
    pol = HeadPolicy.from_spec({"strategy": "top_k_sum", "num_heads": 1, "options": {"k": 2}})
    assert pol.apply(TOY).indices() == [[2]]
    assert HeadPolicy.from_spec("sparsity").strategy == "sparsity"
    with pytest.raises(ValueError):
        HeadPolicy("entropy")
    with pytest.raises(ValueError):
        HeadPolicy("mean", num_heads=8)
    with pytest.raises(ValueError):
        HeadPolicy("sparsity", num_heads=0)
    with pytest.raises(ValueError):
        HeadPolicy("sparsity", options={"kk": 3})
    with pytest.raises(ValueError):
        HeadPolicy("auto").apply(TOY)  # needs a budget
    with pytest.raises(ValueError):
        HeadPolicy("sparsity", head_range=(5, 2))
    custom = HeadPolicy("sparsity", head_range=(2, 2)).apply(random_attention(1, 8, 1, 16, seed=3))
    assert custom.counts.tolist() == [2]
