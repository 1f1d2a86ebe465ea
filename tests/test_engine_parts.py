"""The engine's tensor work, each part alone on hand-made tensors (vtprune/engine/): the LLM input a vision
stage gives, an LLM stage's drop, and the masks. The invariant matrix (test_engine.py) tests them together."""

from __future__ import annotations

import pytest
import torch

from vtprune.engine.assemble import PromptLayout, assemble_llm_input
from vtprune.engine.drop import drop_tokens
from vtprune.engine.masks import format_mask, static_step_mask
from vtprune.engine.state import Layout
from vtprune.methods.base import Selection, Stage


def test_assembled_input_replaces_each_image_block_and_left_pads_shorter_samples():
    # sample 0: [t0 i i i t1]; sample 1: [pad t2 i i t3]; each image keeps 2 slots, sample 1's second is a hole
    embeds = torch.arange(10, dtype=torch.float32).reshape(2, 5, 1)
    is_image = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    text_valid = torch.tensor([[1, 0, 0, 0, 1], [0, 1, 0, 0, 1]], dtype=torch.bool)
    tokens = torch.tensor([[[100.0], [101.0]], [[200.0], [201.0]]])
    valid = torch.tensor([[True, True], [True, False]])
    starts, lengths = torch.tensor([[1], [2]]), torch.tensor([[3], [2]])
    layout = PromptLayout.build(is_image, starts, lengths, width=2)
    inputs, key_valid = assemble_llm_input(embeds, text_valid, layout, tokens, valid)
    assert inputs[..., 0].tolist() == [[0, 0, 100, 101, 4], [5, 6, 200, 201, 9]]  # a new left pad is zero
    assert key_valid.tolist() == [[False, True, True, True, True], [False, True, True, False, True]]
    assert layout.new_len == 5 and layout.padded  # sample 0 lost a token: one new left pad
    assert layout.slot_pos.tolist() == [[2, 3], [2, 3]]
    assert layout.text_rows.tolist() == [0, 0, 1, 1, 1] and layout.text_cols.tolist() == [0, 4, 0, 1, 4]
    assert layout.text_new_cols.tolist() == [1, 4, 0, 1, 4]
    unpadded = PromptLayout.build(is_image[1:], starts[1:], lengths[1:], width=2)
    assert unpadded.new_len == 5 and not unpadded.padded


def _layout() -> Layout:
    # [t0 v0 v1 t1]: visual tokens at positions 1 and 2, numbered 0 and 1
    return Layout(
        first_layer=0,
        key_valid=torch.ones(1, 4, dtype=torch.bool),
        position_ids=torch.arange(4)[None],
        visual_index=torch.tensor([[1, 2]]),
        visual_valid=torch.ones(1, 2, dtype=torch.bool),
        original_index=torch.tensor([[0, 1]]),
    )


def test_drop_keeps_positions_and_gathers_the_rotary_embeddings():
    hidden = torch.arange(4, dtype=torch.float32).reshape(1, 4, 1)
    rope = (torch.arange(4.0).reshape(1, 4, 1) + 10, torch.arange(4.0).reshape(1, 4, 1) + 20)
    stage = Stage(kind="llm", keep=1, score_layer=1, prune_layer=2, positions="original")
    out, layout = drop_tokens(
        hidden, _layout(), Selection(indices=torch.tensor([[1]])), stage, 2,
        model_rope=rope, rotary=None, attn_implementation="eager",
    )  # fmt: skip
    assert out[0, :, 0].tolist() == [0, 2, 3]  # v0 dropped
    assert layout.position_ids.tolist() == [[0, 2, 3]] and layout.model_positions
    assert layout.prefill_rope[0][0, :, 0].tolist() == [10, 12, 13] and layout.prefill_rope[1][0, :, 0].tolist() == [20, 22, 23]
    assert layout.visual_index.tolist() == [[1]] and layout.original_index.tolist() == [[1]]
    assert layout.first_layer == 2 and layout.prefill_mask.shape == (1, 1, 3, 3)


def test_drop_reindexes_and_places_created_tokens_after_the_kept_ones():
    hidden = torch.arange(4, dtype=torch.float32).reshape(1, 4, 1)
    calls = []

    def rotary(h, position_ids):
        calls.append(position_ids.tolist())
        return (position_ids[..., None].float(), -position_ids[..., None].float())

    selection = Selection(indices=torch.tensor([[0]]), extra=torch.tensor([[[7.0]]]), extra_index=torch.tensor([[1]]))
    stage = Stage(kind="llm", keep=1, score_layer=1, prune_layer=2, positions="reindex")
    out, layout = drop_tokens(
        hidden, _layout(), selection, stage, 2, model_rope=None, rotary=rotary, attn_implementation="sdpa"
    )
    assert out[0, :, 0].tolist() == [0, 1, 7, 3]  # t0, v0, the created token, t1
    assert calls == [[[0, 1, 2, 3]]] and layout.position_ids.tolist() == [[0, 1, 2, 3]]
    assert layout.visual_index.tolist() == [[1, 2]] and layout.original_index.tolist() == [[0, 1]]
    assert not layout.model_positions and layout.prefill_mask is None  # SDPA's own causal path


def test_masks_per_implementation():
    key_valid = torch.tensor([[False, True, True]])
    sdpa = format_mask(key_valid, 3, "sdpa", torch.float32)
    assert sdpa[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    eager = format_mask(key_valid, 1, "eager", torch.float32)
    assert eager[0, 0, 0, 0] == torch.finfo(torch.float32).min and eager[0, 0, 0, 1:].tolist() == [0, 0]
    assert format_mask(key_valid, 1, "flash_attention_2", torch.float32).tolist() == [[0, 1, 1]]
    assert format_mask(torch.ones(1, 3, dtype=torch.bool), 3, "sdpa", torch.float32) is None
    static = format_mask(torch.ones(1, 2, dtype=torch.bool), 1, "sdpa", torch.float32, key_length=4)
    assert static[0, 0, 0].tolist() == [True, True, False, False]  # the cache's unused slots are masked


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "flash_attention_2"])
@pytest.mark.parametrize("decoded,q_len", [(0, 1), (3, 1), (2, 2)])
def test_static_step_mask_equals_the_growing_mask(implementation, decoded, q_len):
    """A decode step's fixed-shape mask (position read from the cache's device count) is the mask built from
    the prefill's validity plus the real tokens decoded so far, padded to the cache's length."""
    key_valid = torch.tensor([[False, True, True, True], [True, True, False, True]])
    held = torch.tensor(key_valid.shape[1] + decoded)
    fixed = static_step_mask(key_valid, held, q_len, 10, implementation, torch.float32)
    grown = torch.cat([key_valid, torch.ones(2, decoded + q_len, dtype=torch.bool)], dim=1)
    expected = format_mask(grown, q_len, implementation, torch.float32, all_valid=False, key_length=10)
    assert torch.equal(fixed, expected)
