"""The batched, sync-free selection paths of SparseVLM and PyramidDrop equal the per-sample code they replaced.

* SparseVLM v1's rank: one `matrix_rank` over zero-padded blocks with a per-sample tolerance == the old loop of
  `matrix_rank(block[b][rows][:, cols])` per sample (random, rank-deficient and empty blocks, different row and
  column counts per sample), and the counts derived from it.
* PyramidDrop's re-projected scores: q projected for the query rows only == q for every token, then the rows.
* On the tiny models, the old implementations (kept here as references) select the same tokens and give the
  same logits.
* SparseVLM's host syncs per prefill, counted on CPU (what would stall a CUDA queue): one read per stage
  (v1: two and its SVD) and one for the records at the end.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from conftest import QUESTIONS, build_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import vtprune
from vtprune.engine.session import PruneSession
from vtprune.methods.pdrop import PyramidDrop
from vtprune.methods.sparsevlm import SparseVLM, batched_block_rank
from vtprune.signals.attention import attention_rows
from vtprune.signals.context import LLMSignals


# --- references: the per-sample code before the batched version -----------------------------------------
def loop_ranks(block: torch.Tensor, raters: torch.Tensor, visual_valid: torch.Tensor) -> list[int]:
    ranks = []
    for b in range(block.shape[0]):
        cols = visual_valid[b].nonzero().squeeze(1)
        rows = raters[b].nonzero().squeeze(1)
        ranks.append(
            int(torch.linalg.matrix_rank(block[b][rows][:, cols])) if rows.numel() and cols.numel() else 0
        )
    return ranks


def loop_v1_counts(self, signals, raters, budget):
    """SparseVLM._v1_counts as it was: one matrix_rank and host syncs per sample."""
    attn, _ = signals.attention("text")
    block = attn.float().mean(dim=1)
    scale, bias = self.scale_bias(budget, signals.tokens_per_image)
    counts, ranks = [], []
    for b in range(block.shape[0]):
        cols = signals.visual_valid[b].nonzero().squeeze(1)
        rows = raters[b].nonzero().squeeze(1)
        n = cols.numel()
        rank = int(torch.linalg.matrix_rank(block[b][rows][:, cols])) if rows.numel() and n else 0
        ranks.append(rank)
        counts.append(n if rank == n else max(1, min(int(rank * scale + bias), n - 1)))
    return torch.tensor(counts, device=block.device), torch.tensor(ranks, device=block.device)


def full_q_attention(self, queries="last"):
    """LLMSignals.attention as it was: q re-projected for every token, then the query rows gathered."""
    if queries not in self.cache:
        q_index, q_valid = self.query_index(queries)
        cap = self.captured if self.captured is not None else self.recompute_qk()
        probs = attention_rows(cap.query, cap.key, cap.scaling, q_index, self.key_valid)
        vis = self.visual_index[:, None, None, :].expand(-1, probs.shape[1], probs.shape[2], -1)
        self.cache[queries] = (torch.gather(probs, 3, vis), q_valid)
    return self.cache[queries]


def random_blocks(seed: int, batch: int = 8, rows: int = 7, cols: int = 12):
    """(B, R, C) attention-like blocks, some of low rank or with repeated rows, and per-sample row/column masks
    of different sizes (one sample without rows, one without columns)."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for b in range(batch):
        kind = b % 4
        if kind == 0:  # full rank
            x = torch.rand(rows, cols, generator=g)
        elif kind == 1:  # rank r < min(R, C) from a product
            r = 1 + b % 3
            x = torch.rand(rows, r, generator=g) @ torch.rand(r, cols, generator=g)
        elif kind == 2:  # repeated rows (SparseVLM raters attending alike)
            base = torch.rand(2, cols, generator=g)
            x = base[torch.randint(0, 2, (rows,), generator=g)]
        else:  # softmax rows of a low-rank logit matrix
            x = torch.softmax(torch.rand(rows, 2, generator=g) @ torch.rand(2, cols, generator=g) * 5, dim=-1)
        blocks.append(x)
    block = torch.stack(blocks)
    row_mask = torch.rand(batch, rows, generator=g) < 0.7
    col_mask = torch.rand(batch, cols, generator=g) < 0.8
    row_mask[:, 0] = True
    col_mask[:, 0] = True
    row_mask[1] = False  # a sample without raters
    col_mask[2] = False  # a sample without visual tokens
    col_mask[3] = True  # one with every column
    return block, row_mask, col_mask


@pytest.mark.parametrize("seed", range(6))
def test_batched_block_rank_equals_per_sample_loop(seed):
    block, rows, cols = random_blocks(seed)
    expected = loop_ranks(block, rows, cols)
    assert batched_block_rank(block, rows, cols).tolist() == expected
    assert len(set(expected)) > 2  # the case mixes ranks
    # the padding never raises a rank: blocks of a wider batch give the same ranks
    wide = torch.nn.functional.pad(block, (0, 5, 0, 3), value=7.0)
    wide_rows = torch.nn.functional.pad(rows, (0, 3), value=False)
    wide_cols = torch.nn.functional.pad(cols, (0, 5), value=False)
    assert batched_block_rank(wide, wide_rows, wide_cols).tolist() == expected


def test_batched_block_rank_uses_each_samples_default_tolerance():
    """A singular value just above max(m_b, n_b)·eps·σ₁ of a small block counts; the padded batch's larger
    max(R, C) tolerance would have dropped it."""
    small = torch.diag(torch.tensor([1.0, 3e-6]))  # 2 x 2: tolerance 2·eps ≈ 2.4e-7 → rank 2
    batch = torch.zeros(2, 2, 40)
    batch[0, :, :2] = small
    batch[1] = torch.rand(2, 40)
    rows = torch.ones(2, 2, dtype=torch.bool)
    cols = torch.zeros(2, 40, dtype=torch.bool)
    cols[0, :2] = True
    cols[1] = True
    assert loop_ranks(batch, rows, cols) == [2, 2]
    assert batched_block_rank(batch, rows, cols).tolist() == [2, 2]
    # and a value below the sample's own 2·eps tolerance does not count
    tiny = batch.clone()
    tiny[0, 1, 1] = 1e-7  # below 2·eps: rank 1 under the sample's own tolerance
    assert batched_block_rank(tiny, rows, cols).tolist() == loop_ranks(tiny, rows, cols) == [1, 2]


class BlockSignals:
    """What SparseVLM._v1_counts reads."""

    def __init__(self, block, rows, cols, tokens_per_image):
        self._attn = (block[:, None].expand(-1, 2, -1, -1), rows)
        self.visual_valid = cols
        self.tokens_per_image = tokens_per_image

    def attention(self, queries):
        return self._attn


@pytest.mark.parametrize(("scale", "bias"), [(13.5, 0.0), (0.5, 0.0), (0.8, 0.0), (9.0, 6.0), (1.5, -2.7)])
def test_v1_counts_equal_per_sample_loop(scale, bias):
    method = SparseVLM(version="1", scale=scale, bias=bias, recycle=False)
    for seed in range(4):
        block, rows, cols = random_blocks(seed)
        signals = BlockSignals(block, rows, cols, tokens_per_image=64)
        counts, ranks = method._v1_counts(signals, rows, 16)
        ref_counts, ref_ranks = loop_v1_counts(method, signals, rows, 16)
        assert ranks.tolist() == ref_ranks.tolist()
        assert counts.tolist() == ref_counts.tolist()
        assert counts.dtype == torch.long


# --- PyramidDrop: q of the query rows only -------------------------------------------------------------
def captured_signals(model, inputs, monkeypatch, params):
    seen = []
    original = PyramidDrop.select

    def spy(self, i, stage, signals):
        seen.append(signals)
        return original(self, i, stage, signals)

    monkeypatch.setattr(PyramidDrop, "select", spy)
    with vtprune.pruned(model, "pdrop", **params), torch.no_grad():
        model(**inputs)
    monkeypatch.undo()
    return seen


def test_recompute_qk_rows_equal_full_projection(tiny, batch_inputs, monkeypatch):
    model = tiny[0]
    signals = captured_signals(
        model, batch_inputs, monkeypatch, {"layer_list": (1, 2, 3), "ratios": (0.5, 0.25, 0.1)}
    )
    assert len(signals) == 3
    for sig in signals:
        assert sig.captured is None  # PDrop re-projects with the prune layer
        with torch.no_grad():
            full = sig.recompute_qk()
            for queries in ("last", "text", "all"):
                index, _ = sig.query_index(queries)
                part = sig.recompute_qk(index)
                assert torch.equal(part.key, full.key)
                b, h, _, dh = full.query.shape
                expected = torch.gather(full.query, 2, index[:, None, :, None].expand(b, h, -1, dh))
                torch.testing.assert_close(part.query, expected, rtol=1e-6, atol=1e-6)
                new = sig.attention(queries)
                old = full_q_attention(LLMSignals(**{**sig.__dict__, "cache": {}}), queries)
                torch.testing.assert_close(new[0], old[0], rtol=1e-6, atol=1e-7)
                assert torch.equal(new[1], old[1])


# --- the tiny models: same selections and logits as the old code ----------------------------------------
def run(model, inputs, name, keep, params):
    with vtprune.pruned(model, name, keep=keep, **params), torch.no_grad():
        logits = model(**inputs).logits
        record = vtprune.last_record(model)
    return logits, [(s.kept, s.counts, s.extra) for s in record.stages]


CASES = [
    ("sparsevlm", {"layers": (0, 1, 2)}),
    ("sparsevlm", {"layers": (0, 1, 2), "recycle": False}),
    ("sparsevlm", {"version": "1", "layers": (0, 1, 2), "scale": 0.5, "recycle": False}),
    ("sparsevlm", {"version": "1", "layers": (0, 1, 2), "scale": 3.0}),
    ("sparsevlm", {"version": "2.0", "layers": (0, 1, 2), "priority_heads": 2}),
    ("pdrop", {"layer_list": (1, 2, 3)}),
    ("pdrop", {"layer_list": (1, 2, 3), "ratios": (0.5, 0.25, 0.0625)}),
]


@pytest.mark.parametrize(("name", "params"), CASES)
@pytest.mark.parametrize("keep", [4, 16])
def test_tiny_model_results_unchanged(tiny, monkeypatch, name, params, keep):
    model, _, processor = tiny
    inputs = build_inputs(processor, QUESTIONS * 2, [1, 2, 3, 4, 5, 6])  # differing v1 counts per sample
    logits, stages = run(model, inputs, name, keep, params)
    monkeypatch.setattr(SparseVLM, "_v1_counts", loop_v1_counts)
    monkeypatch.setattr(LLMSignals, "attention", full_q_attention)
    old_logits, old_stages = run(model, inputs, name, keep, params)
    assert stages == old_stages
    torch.testing.assert_close(logits, old_logits, rtol=1e-5, atol=1e-5)


# --- host syncs per prefill -----------------------------------------------------------------------------
# What would make the host wait for a CUDA device, observed on CPU: reading values (`item`, `int`, `bool`,
# `tolist`), outputs whose shape depends on the data (`nonzero`, boolean indexing, `masked_select`, `unique`)
# and the SVD behind `matrix_rank` (the CUDA solver reports its status to the host).
SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "_linalg_svd",
    "equal",
}


class SyncCounter(TorchDispatchMode):
    """Counts the host syncs of the code run inside it, with where each came from (for a failing assert)."""

    def __init__(self):
        super().__init__()
        self.where: list[str] = []

    def _note(self, what: str) -> None:
        frame = next((f for f in reversed(traceback.extract_stack()[:-2]) if "/vtprune/" in f.filename), None)
        self.where.append(
            f"{what} at {frame.filename.split('/vtprune/')[-1]}:{frame.lineno}" if frame else what
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        )
        if name in SYNC_OPS or boolean_index:
            self._note(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        original = self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(tensor):
            counter._note("tolist")
            return original(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def prefill_syncs(model, inputs, params, keep):
    """Host syncs of one pruned prefill (the model call), in all and inside the LLM stages (`_drop`)."""
    stage_syncs = []
    original = PruneSession._drop

    def drop(self, *args, **kwargs):
        before = len(counter.where)
        out = original(self, *args, **kwargs)
        stage_syncs.append(counter.where[before:])
        return out

    PruneSession._drop = drop
    try:
        with vtprune.pruned(model, "sparsevlm", keep=keep, **params), torch.no_grad():
            with SyncCounter() as counter:
                model(**inputs)
    finally:
        PruneSession._drop = original
    return counter.where, stage_syncs


# Host reads of one prefill of the six-sample batch below: 19 before the first LLM stage (the LLaVA forward
# and the engine's input layout, the same for every LLM method; the layout's reads, the "text" rows' width
# included, are of host copies of the ids and the mask, taken before the vision tower, which on a GPU wait for
# nothing: tests/test_prefill_syncs.py),
# then per stage the method's one read (v1: two, and the SVD of its rank), and one read of all stage records
# when the prefill ends. Before the per-stage reads were merged: 30 (v1.5, v2.0) and 33 (v1), 5 and 6 per stage.
SYNC_CASES = [
    ({"layers": (0, 1, 2)}, 1, 23),
    ({"layers": (0, 1, 2), "recycle": False}, 1, 23),
    ({"version": "2.0", "layers": (0, 1, 2), "priority_heads": 2}, 1, 23),
    ({"version": "1", "layers": (0, 1, 2), "scale": 3.0}, 3, 29),
    ({"version": "1", "layers": (0, 1, 2), "scale": 0.5}, 3, 29),
    ({"version": "1", "layers": (0, 1, 2), "scale": 0.5, "recycle": False}, 3, 29),
]


@pytest.mark.parametrize(("params", "per_stage", "total"), SYNC_CASES)
@pytest.mark.parametrize("keep", [4, 16])
def test_sparsevlm_prefill_host_syncs(tiny, params, per_stage, total, keep):
    model, _, processor = tiny
    inputs = build_inputs(processor, QUESTIONS * 2, [1, 2, 3, 4, 5, 6])
    syncs, stage_syncs = prefill_syncs(model, inputs, params, keep)
    assert [len(s) for s in stage_syncs] == [per_stage] * 3, stage_syncs
    for stage in stage_syncs:  # all of them the method's own reads (and v1's rank)
        assert all("methods/sparsevlm.py" in s for s in stage), stage
    assert len(syncs) == total, "\n".join(syncs)
    assert syncs[-1].startswith("tolist at engine/session.py")  # the records, once the prefill is done
    # v1 covers rows of different counts, and (scale 0.5, keep 4) rows recycling different numbers of tokens
    with vtprune.pruned(model, "sparsevlm", keep=keep, **params), torch.no_grad():
        model(**inputs)
        record = vtprune.last_record(model)
    if params.get("version") == "1":
        assert any(len(set(s.counts)) > 1 for s in record.stages)
    if params.get("scale") == 0.5 and params.get("recycle", True) and keep == 4:
        assert any(len(set(s.extra["recycled"])) > 1 for s in record.stages)
