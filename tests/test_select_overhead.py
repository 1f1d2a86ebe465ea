"""HiPrune's and VisPruner's selection cost: same results as the formulas they replaced, fewer ops, no syncs.

* `received_attention` (HiPrune's "global attention", a few heads at a time) equals the plain formula —
  every query row's softmax probabilities, mean over heads, then mean over rows — on random q/k (GQA heads,
  several chunk sizes, bf16 input), and `VisionSignals.received_attention` is that function;
* `vispruner_select`'s rounds (one indexing op, a max, a sort and one or two copies per round) select exactly
  what the previous loop (per-round masks, kept below as the reference) selected, with and without valid
  masks, ties and duplicates included;
* upper bounds on the ops they dispatch (the previous code fails them) and no host syncs: on CPU nothing waits,
  so the calls that would block on a GPU are counted (`tolist`, `item`, `bool()`, `int()`, `float()`,
  `__index__`, `nonzero`, and `torch.tensor(<host data>)`, a blocking host-to-device copy on a GPU).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vtprune.methods.base import Stage
from vtprune.methods.hiprune import HiPrune
from vtprune.methods.vispruner import VisPrunerNoSink, _residual_bounds, vispruner_select
from vtprune.selection import check_valid, cosine_matrix, picked_from, rank_tokens
from vtprune.signals import attention as signals_attention
from vtprune.signals.attention import attention_rows, received_attention
from vtprune.signals.context import Captured, VisionSignals


# --- references: the formulas before this change ----------------------------------------------------------
def reference_received(query, key, scaling):
    """Every query row's softmax probabilities (B, H, L, L), then the mean over heads and over rows."""
    b, _, length, _ = query.shape
    rows = torch.arange(length, device=query.device).expand(b, -1)
    return attention_rows(query, key, scaling, rows, None, causal=False).mean(dim=1).mean(dim=1)


def reference_vispruner(
    cls_attn, features, keep, important_ratio=0.5, removal_per_round=8, valid=None, dup_tol=1e-6
):
    """The previous batched loop of `vispruner_select` (per-round validity masks and scatters)."""
    b, n = cls_attn.shape
    dev = cls_attn.device
    v = None if valid is None else check_valid(valid, b, n, dev)
    t_imp = int(keep * important_ratio)
    t_div = keep - t_imp
    order, order_ok = rank_tokens(cls_attn, v)
    imp, imp_ok = order[:, :t_imp], order_ok[:, :t_imp]
    if t_div == 0:
        return picked_from(imp, imp_ok)
    res = order[:, t_imp:]
    n_res = order_ok[:, t_imp:].sum(dim=-1)
    bounds = _residual_bounds(res.shape[1], t_div, removal_per_round)
    if bounds:
        gram = cosine_matrix(features, dup_tol)
        gram = torch.cat([gram, gram.new_full((b, n, 1), float("-inf"))], dim=2).reshape(b, n * (n + 1))
        neg_inf = torch.full((), float("-inf"), device=dev)
        for cur in bounds:
            res = res[:, :cur]
            pos = torch.arange(cur, device=dev)
            ja, jb = pos[: (cur + 1) // 2], pos[: cur // 2]
            n_a, n_b = (n_res + 1) // 2, n_res // 2
            r_step = torch.minimum(
                torch.minimum(n_res - t_div, n_a), torch.full_like(n_res, removal_per_round)
            )
            r_step = r_step.clamp_min(0)
            a_idx, b_idx = res[:, 0::2], res[:, 1::2]
            a_ok = ja.unsqueeze(0) < n_a.unsqueeze(1)
            b_ok = jb.unsqueeze(0) < n_b.unsqueeze(1)
            flat = (a_idx * (n + 1)).unsqueeze(2) + torch.where(b_ok, b_idx, n).unsqueeze(1)
            sim = gram.gather(1, flat.reshape(b, -1)).reshape(b, ja.numel(), jb.numel())
            m = torch.where(a_ok, sim.amax(dim=-1), neg_inf)
            perm = torch.sort(m, dim=-1, descending=True, stable=True).indices
            a_sorted = a_idx.gather(1, perm)
            new_pos_a = ja.unsqueeze(0) - r_step.unsqueeze(1)
            keep_a = (ja.unsqueeze(0) >= r_step.unsqueeze(1)) & a_ok
            new_pos_b = (n_a - r_step).unsqueeze(1) + jb.unsqueeze(0)
            new_res = torch.zeros(b, cur + 1, dtype=res.dtype, device=dev)
            new_res.scatter_(1, torch.where(keep_a, new_pos_a, cur), a_sorted)
            new_res.scatter_(1, torch.where(b_ok, new_pos_b, cur), b_idx)
            res = torch.where((r_step > 0).unsqueeze(1), new_res[:, :cur], res)
            n_res = n_res - r_step
    div = res[:, :t_div]
    div_ok = torch.arange(t_div, device=dev).unsqueeze(0) < n_res.unsqueeze(1)
    return picked_from(torch.cat([imp, div], dim=1), torch.cat([imp_ok, div_ok], dim=1))


# --- counting --------------------------------------------------------------------------------------------
class _Ops(TorchDispatchMode):
    """Ops that launch work (outputs not aliasing an input, or in place), host reads, largest output."""

    def __init__(self):
        super().__init__()
        self.kernels = self.syncs = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("nonzero", "masked_select", "_local_scalar_dense", "lift_fresh"):
            self.syncs += 1
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {a.untyped_storage().data_ptr() for a in leaves if isinstance(a, torch.Tensor)}
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        fresh = [o for o in outs if name.endswith("_") or o.untyped_storage().data_ptr() not in inputs]
        if fresh:
            self.kernels += 1
            self.largest = max(self.largest, *(o.numel() * o.element_size() for o in fresh))
        return out


@contextlib.contextmanager
def counted(monkeypatch):
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def call(tensor, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, call)
    with _Ops() as ops:
        yield ops, reads
    monkeypatch.undo()


def _signals(b, heads=4, patches=576, head_dim=8, width=16, feature_layer=22, object_layer=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = patches + 1

    def qk():
        q, k = (torch.randn(b, heads, t, head_dim, generator=g) * 2 for _ in range(2))
        return Captured(q, k, head_dim**-0.5)

    side = int(patches**0.5)
    info = SimpleNamespace(vision_layers=24)
    adapter = SimpleNamespace(
        feature_layer=feature_layer,
        grid=(side, side),
        select_strategy="default",
        has_cls=True,
        info=lambda: info,
    )
    return VisionSignals(
        adapter=adapter,
        hidden=torch.randn(b, t, width, generator=g),
        projected=torch.zeros(b, patches, 1),
        image_sample=torch.arange(b),
        input_ids=torch.zeros(1, 1, dtype=torch.long),
        text_valid=torch.zeros(1, 1, dtype=torch.bool),
        captured=qk(),
        layer_captures={object_layer: qk()},
    )


# --- received attention ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "b, heads, kv_heads, length, chunk",
    [
        (3, 8, 8, 17, 1 << 24),
        (3, 8, 8, 17, 17 * 17 * 3 * 2),
        (2, 8, 2, 13, 13 * 13 * 2 * 3),
        (2, 6, 3, 11, 1),
    ],
)
def test_received_attention_equals_the_plain_formula(b, heads, kv_heads, length, chunk):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(b, heads, length, 16, generator=g) * 3
    k = torch.randn(b, kv_heads, length, 16, generator=g) * 3
    expected = reference_received(q, k, 0.3)
    got = received_attention(q, k, 0.3, chunk)
    assert got.dtype == torch.float32 and got.shape == (b, length)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(b))  # each query row's probabilities sum to 1
    # bf16 q/k (what the tower captures): the same products, upcast, float32 throughout
    q16, k16 = q.bfloat16(), k.bfloat16()
    torch.testing.assert_close(received_attention(q16, k16, 0.3, chunk), reference_received(q16, k16, 0.3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 matmul with float32 output is CUDA-only")
@pytest.mark.parametrize("scaling", [0.125, 0.3])  # a power of two takes the bf16 matmul, 0.3 the float32 one
def test_received_attention_cuda_bf16_equals_the_plain_formula(scaling):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (
        torch.randn(4, 16, 577, 64, device="cuda", generator=g, dtype=torch.bfloat16) * 2 for _ in range(2)
    )
    got = received_attention(q, k, scaling)
    torch.testing.assert_close(got, reference_received(q, k, scaling), rtol=1e-4, atol=1e-7)
    assert signals_attention._BF16_GEMM[0]  # the matmul with float32 output ran (or the float32 path did)


def test_signals_received_attention_is_the_chunked_function():
    signals = _signals(2, patches=16)
    for layer in (22, 8):
        qk = signals.layer_qk(layer)
        torch.testing.assert_close(
            signals.received_attention(layer), reference_received(qk.query, qk.key, qk.scaling)
        )
        assert signals.received_attention(layer) is signals.received_attention(layer)  # computed once


def test_received_attention_holds_a_chunk_not_every_head(monkeypatch):
    """LLaVA-1.5's shape scaled down in width (16 heads x 577 tokens): the largest tensor made is one chunk of
    whole heads, not the (B, H, T, T) float32 probabilities of the plain formula."""
    b, heads, length = 2, 16, 577
    q = torch.randn(b, heads, length, 4)
    full = b * heads * length * length * 4
    with counted(monkeypatch) as (ops, reads):
        received_attention(q, q, 0.5, chunk_elements=b * length * length * 4)  # 4 heads per step
    assert ops.largest <= full // 4 and not reads and ops.syncs == 0
    with counted(monkeypatch) as (old, _):
        reference_received(q, q, 0.5)
    assert old.largest >= full


# --- VisPruner rounds ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(40))
def test_vispruner_rounds_select_as_the_previous_loop(seed):
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 5, (1,), generator=g))
    n = int(torch.randint(4, 90, (1,), generator=g))
    keep = int(torch.randint(0, n + 1, (1,), generator=g))
    ratio = [0.0, 0.25, 0.5, 0.75, 1.0][seed % 5]
    cap = int(torch.randint(1, 12, (1,), generator=g))
    attn = torch.rand(b, n, generator=g)
    if seed % 3 == 0:
        attn = (attn * 4).round()  # tied attention
    feats = torch.randn(b, n, int(torch.randint(1, 8, (1,), generator=g)), generator=g)
    if seed % 4 == 0:
        feats[:, ::3] = feats[:, :1]  # exact duplicates
    valid = torch.rand(b, n, generator=g) > torch.rand(1, generator=g) if seed % 2 else None
    got = vispruner_select(attn, feats, keep, ratio, cap, valid)
    expected = reference_vispruner(attn, feats, keep, ratio, cap, valid)
    assert torch.equal(got.indices, expected.indices) and torch.equal(got.valid, expected.valid)


@pytest.mark.parametrize("keep", [64, 128])
def test_vispruner_llava_shape_same_selection_fewer_ops(keep, monkeypatch):
    """576 patches: the same picks as the previous loop, with and without a valid mask (sinks), in at most 6
    ops per round plus setup (the previous loop: ~34 per round, 2,267 ops at keep 64), no host reads."""
    g = torch.Generator().manual_seed(keep)
    attn = torch.rand(2, 576, generator=g)
    feats = torch.randn(2, 576, 32, generator=g)
    valid = torch.rand(2, 576, generator=g) > 0.05
    rounds = len(_residual_bounds(576 - keep // 2, keep - keep // 2, 8))
    for v, per_round in ((None, 5), (valid, 6)):
        vispruner_select(attn, feats, keep, valid=v)  # one-time setup (the per-|R| deletion table) done
        with counted(monkeypatch) as (ops, reads):
            got = vispruner_select(attn, feats, keep, valid=v)
        assert ops.kernels <= per_round * rounds + 80 and ops.syncs == 0 and not reads
        with counted(monkeypatch) as (old, _):
            expected = reference_vispruner(attn, feats, keep, valid=v)
        assert old.kernels > 2 * ops.kernels
        assert torch.equal(got.indices, expected.indices) and torch.equal(got.valid, expected.valid)


# --- no host syncs in the methods' select ----------------------------------------------------------------
def test_hiprune_and_vispruner_nosink_select_without_host_reads(monkeypatch):
    signals = _signals(2, heads=4, patches=576)
    with counted(monkeypatch) as (ops, reads):
        selection = HiPrune(keep=64).select(0, Stage(kind="vision", keep=64), signals)
    assert not reads and ops.syncs == 0
    assert [selection.info[k].tolist() for k in ("anchors", "buffers", "registers")] == [
        [1, 1],
        [4, 4],
        [59, 59],
    ]
    assert selection.all_valid and selection.indices.shape == (2, 64)
    signals = _signals(2, heads=4, patches=576)
    method = VisPrunerNoSink(keep=64, attention_sink_threshold=0.002)
    method.select(0, Stage(kind="vision", keep=64), signals)  # one-time setup done
    with counted(monkeypatch) as (ops, reads):
        selection = method.select(0, Stage(kind="vision", keep=64), signals)
    assert not reads and ops.syncs == 0
    assert selection.info["sinks"].tolist() == (signals.cls_attention > 0.002).sum(dim=1).tolist()
