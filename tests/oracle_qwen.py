"""Hand-written reference for Qwen2-VL / Qwen2.5-VL: the unmodified model's pieces fed only the kept tokens,
with each kept token at the unpruned model's own 3-D rotary position. Independent of vtprune's engine.

`oracle_logits` takes the image features from the model's `get_image_features` (or `get_video_features`),
the positions from its `get_rope_index` on the full prompt, keeps the text and the image tokens the record
says, and runs every decoder layer by hand (gathering the sequence before each LLM-stage prune layer).
"""

from __future__ import annotations

import torch
from oracle import _mask


def token_type(model, input_ids):
    kinds = torch.zeros_like(input_ids)
    kinds[input_ids == model.config.image_token_id] = 1
    kinds[input_ids == model.config.video_token_id] = 2
    return kinds


def full_positions(model, inputs) -> torch.Tensor:
    """(3, B, L) the unpruned model's positions of the full prompt."""
    grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None}
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=token_type(model, inputs["input_ids"]),
        attention_mask=inputs.get("attention_mask"), **grids,
    )
    return positions


def visual_features(model, inputs) -> list[torch.Tensor]:
    if inputs.get("pixel_values") is not None:
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    else:
        out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True)
    return list(out.pooler_output)


def kept_columns(model, inputs, record, sample: int) -> list[int]:
    """Prompt columns of sample `sample` that the vision stage keeps (text + kept visual tokens)."""
    ids = inputs["input_ids"][sample]
    visual = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
    stages = [s for s in record.stages if s.name != "none"]
    vision = stages[0] if stages and stages[0].kind == "vision" else None
    keep = set(vision.kept[sample]) if vision is not None else None
    columns, number = [], 0
    for col in range(ids.shape[0]):
        if visual[col]:
            if keep is None or number in keep:
                columns.append(col)
            number += 1
        else:
            columns.append(col)
    return columns


def oracle_logits(model, inputs, record) -> torch.Tensor:
    """(B, L', V) logits of the unmodified model fed only the kept tokens at their original positions."""
    lm = model.model.language_model
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    batch = input_ids.shape[0]
    feats = torch.cat(visual_features(model, inputs))
    embeds = model.get_input_embeddings()(input_ids).clone()
    visual = (input_ids == model.config.image_token_id) | (input_ids == model.config.video_token_id)
    embeds[visual] = feats.to(embeds.dtype)
    positions_full = full_positions(model, inputs)
    valid_full = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    rows = [kept_columns(model, inputs, record, b) for b in range(batch)]
    width = max(len(r) for r in rows)
    index = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    pad = torch.tensor([[True] * (width - len(r)) + [False] * len(r) for r in rows])
    hidden = torch.gather(embeds, 1, index[:, :, None].expand(-1, -1, embeds.shape[-1]))
    valid = torch.gather(valid_full, 1, index) & ~pad
    positions = torch.gather(positions_full, 2, index[None].expand(3, -1, -1)).masked_fill(~valid[None], 0)
    # the original visual-token number of each column (None for text)
    number = torch.cumsum(visual.long(), dim=1) - 1
    orig = [[int(number[b, c]) if visual[b, c] and not pad[b, j] else None for j, c in enumerate(index[b].tolist())]
            for b in range(batch)]
    for layer_idx, layer in enumerate(lm.layers):
        for stage in (s for s in record.stages if s.kind == "llm" and s.prune_layer == layer_idx):
            cols = []
            for b in range(batch):
                kept = set(stage.kept[b])
                cols.append([i for i, o in enumerate(orig[b]) if (o is None and valid[b, i]) or o in kept])
            width = max(len(c) for c in cols)
            gather = torch.tensor([[0] * (width - len(c)) + c for c in cols])
            gap = torch.tensor([[True] * (width - len(c)) + [False] * len(c) for c in cols])
            hidden = torch.gather(hidden, 1, gather[:, :, None].expand(-1, -1, hidden.shape[-1]))
            valid = torch.gather(valid, 1, gather) & ~gap
            orig = [[None if gap[b, j] else orig[b][i] for j, i in enumerate(gather[b].tolist())] for b in range(batch)]
            if stage.positions == "original":
                positions = torch.gather(positions, 2, gather[None].expand(3, -1, -1)).masked_fill(~valid[None], 0)
            else:
                flat = (torch.cumsum(valid, 1) - 1).clamp(min=0).masked_fill(~valid, 0)
                positions = flat[None].expand(3, -1, -1)
        rope = lm.rotary_emb(hidden, positions)
        hidden = layer(hidden, attention_mask=_mask(valid, hidden.dtype), position_embeddings=rope)
    return model.lm_head(lm.norm(hidden))
