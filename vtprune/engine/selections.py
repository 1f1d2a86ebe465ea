"""Pure functions on `Selection`s: one row of a selection, rows joined or stacked, a subset's selection in its
row's numbering. The engine uses them to select per image, per crop or per sample and recombine."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from vtprune.methods.base import Selection


def selection_row(selection: Selection, row: int) -> Selection:
    """Row `row` of a selection, as a one-row selection."""
    cut = slice(row, row + 1)
    fields = ("indices", "valid", "values", "extra", "extra_valid", "extra_index", "scores")
    return Selection(
        **{f: getattr(selection, f)[cut] if getattr(selection, f) is not None else None for f in fields},
        info=dict(selection.info),
    )


def concat_selections(parts: list[Selection], projected: torch.Tensor) -> Selection:
    """One row from one-row selections over disjoint tokens of it (already in the row's numbering): kept tokens
    in the row's order, created tokens after them; a part without merged values keeps its projected tokens."""
    indices, values, extra, extra_index = [], [], [], []
    for part in parts:
        keep = part.valid[0] if part.valid is not None else torch.ones_like(part.indices[0], dtype=torch.bool)
        index = part.indices[0][keep]
        indices.append(index)
        values.append(part.values[0][keep] if part.values is not None else projected[0, index])
        if part.extra is not None:
            made = part.extra_valid[0] if part.extra_valid is not None else torch.ones_like(part.extra[0, :, 0], dtype=torch.bool)
            extra.append(part.extra[0][made])
            if part.extra_index is not None:
                extra_index.append(part.extra_index[0][made])
            else:
                extra_index.append(torch.full((int(made.sum()),), -1, device=projected.device))
    index = torch.cat(indices)
    order = torch.argsort(index)
    scores = [p.scores for p in parts if p.scores is not None]
    return Selection(
        indices=index[order][None],
        values=torch.cat(values)[order][None].to(projected.dtype),
        extra=torch.cat(extra)[None] if extra else None,
        extra_index=torch.cat(extra_index)[None] if extra else None,
        scores=torch.stack(scores).sum(dim=0) if scores else None,
        info={},
    )


def stack_selections(rows: list[Selection]) -> Selection:
    """One Selection from the one-row selections of rows planned one at a time (padded, unused slots
    invalid); facts that differ between rows are kept as per-row lists."""

    def pad(tensors, value, dtype=None):
        if all(t is None for t in tensors):
            return None
        like = next(t for t in tensors if t is not None)
        filled = [t if t is not None else like.new_full((1, 0, *like.shape[2:]), value) for t in tensors]
        width = max(t.shape[1] for t in filled)
        out = [F.pad(t, (0, 0) * (t.ndim - 2) + (0, width - t.shape[1]), value=value) for t in filled]
        return torch.cat(out).to(dtype) if dtype is not None else torch.cat(out)

    ones = [torch.ones_like(r.indices, dtype=torch.bool) if r.valid is None else r.valid for r in rows]
    extra_valid = [
        None if r.extra is None else (r.extra_valid if r.extra_valid is not None else r.extra.new_ones(r.extra.shape[:2]))
        for r in rows
    ]
    info: dict = {}
    for key in dict.fromkeys(k for r in rows for k in r.info):
        # rows planned one at a time read their tensors here (this path syncs per row anyway)
        values = [v.tolist() if isinstance(v := r.info.get(key), torch.Tensor) else v for r in rows]
        info[key] = values[0] if all(v == values[0] for v in values) else values
    return Selection(
        indices=pad([r.indices for r in rows], 0),
        valid=pad(ones, False),
        values=pad([r.values for r in rows], 0),
        extra=pad([r.extra for r in rows], 0),
        extra_valid=pad([v.bool() if v is not None else None for v in extra_valid], False),
        extra_index=pad([r.extra_index for r in rows], -1),
        scores=pad([r.scores for r in rows], 0),
        info=info,
    )


def in_row_numbering(selection: Selection, among: torch.Tensor, width: int) -> Selection:
    """A one-row selection made over a subset (`among`) of a row's `width` tokens, in the row's numbering."""
    scores = selection.scores
    if scores is not None:
        full = scores.new_zeros(1, width)
        scores = full.index_copy(1, among, scores)
    extra_index = selection.extra_index
    if extra_index is not None:
        extra_index = torch.where(extra_index >= 0, among[extra_index.clamp(min=0)], extra_index)
    return dataclasses.replace(selection, indices=among[selection.indices], scores=scores, extra_index=extra_index)


def selected_tokens(selection: Selection, projected: torch.Tensor):
    """Kept (and created) tokens of each image in the LLM embedding space, their validity and numbering."""
    valid = (
        selection.valid
        if selection.valid is not None
        else torch.ones_like(selection.indices, dtype=torch.bool)
    )
    index = torch.where(valid, selection.indices, 0)  # unused slots point anywhere; they are masked
    rows, t = index.shape
    d = projected.shape[-1]
    if selection.values is not None:
        kept = selection.values
    else:
        kept = torch.gather(projected, 1, index[:, :, None].expand(-1, -1, d))
    orig = index.masked_fill(~valid, -1)
    if selection.extra is not None:
        c = selection.extra.shape[1]
        kept = torch.cat([kept, selection.extra.to(kept.dtype)], dim=1)
        extra_valid = (
            selection.extra_valid
            if selection.extra_valid is not None
            else torch.ones(rows, c, dtype=torch.bool, device=index.device)
        )
        valid = torch.cat([valid, extra_valid], dim=1)
        extra_index = (
            selection.extra_index
            if selection.extra_index is not None
            else torch.full((rows, c), -1, device=index.device)
        )
        orig = torch.cat([orig, extra_index], dim=1)
    return kept, valid, orig
