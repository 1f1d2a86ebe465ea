"""Hand-written references for the engine invariants; independent of vtprune's engine code.

`oracle_logits` runs the unmodified model's pieces by hand: image features from the model's own
`get_image_features`, a prompt holding only the kept image tokens (vision stage), then every decoder layer
called directly, with the sequence gathered to the kept tokens before each LLM-stage prune layer and
masks/positions built from scratch.
"""

from __future__ import annotations

import torch

from vtprune import compat


def _mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = valid.shape[1]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    allowed = causal[None] & valid[:, None, :]
    allowed = allowed | torch.eye(n, dtype=torch.bool)[None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def image_features(model, pixel_values, image_sizes=None) -> list[torch.Tensor]:
    """The projected tokens the unmodified model feeds its LLM, one (P_i, D) tensor per image."""
    cfg = model.config
    extra = {"image_sizes": image_sizes} if image_sizes is not None else {}
    out = model.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        **extra,
    )
    return list(compat.projected_image_features(out)) if image_sizes is None else list(out.pooler_output)


def oracle_logits(
    model, input_ids, attention_mask, pixel_values, record, position_ids=None, image_sizes=None
) -> tuple:
    """Logits of the unmodified model fed only the kept tokens, as the record says.

    Returns (logits (B, L', V), valid (B, L')) for the final sequence layout (samples of different lengths
    are left-padded).
    """
    cfg = model.config
    lm = model.model.language_model
    feats = image_features(model, pixel_values, image_sizes)
    embeds = model.get_input_embeddings()(input_ids)
    batch = input_ids.shape[0]
    n_img = len(feats) // batch
    stages = [s for s in record.stages if s.name != "none"]
    vision = stages[0] if stages and stages[0].kind == "vision" else None
    llm_stages = [s for s in stages if s.kind == "llm"]
    rows, valids, visual_orig = [], [], []
    for b in range(batch):
        tokens, valid, orig = [], [], []
        image_seen = 0
        offset = 0  # original number of the image's first token
        p = 0
        ids = input_ids[b].tolist()
        while p < len(ids):
            if ids[p] == cfg.image_token_id:
                img = feats[b * n_img + image_seen]
                count = img.shape[0]
                if vision is None:
                    kept = [offset + j for j in range(count)]
                else:
                    kept = [k for k in vision.kept[b] if offset <= k < offset + count]
                for k in kept:
                    tokens.append(img[k - offset])
                    valid.append(True)
                    orig.append(k)
                p += count
                offset += count
                image_seen += 1
            else:
                tokens.append(embeds[b, p])
                valid.append(bool(attention_mask[b, p]) if attention_mask is not None else True)
                orig.append(None)
                p += 1
        rows.append(torch.stack(tokens))
        valids.append(valid)
        visual_orig.append(orig)
    width = max(len(v) for v in valids)
    lengths_differ = any(len(v) != width for v in valids)  # images of different token counts
    for b in range(batch):  # left-pad to a common length
        missing = width - len(valids[b])
        rows[b] = torch.cat([rows[b].new_zeros(missing, rows[b].shape[-1]), rows[b]])
        valids[b] = [False] * missing + valids[b]
        visual_orig[b] = [None] * missing + visual_orig[b]
    hidden = torch.stack(rows).to(embeds.dtype)
    valid = torch.tensor(valids)
    if vision is not None or position_ids is None or lengths_differ:
        positions = (torch.cumsum(valid, 1) - 1).clamp(min=0).masked_fill(~valid, 0)
    else:
        positions = position_ids
    for layer_idx, layer in enumerate(lm.layers):
        for stage in llm_stages:
            if stage.prune_layer == layer_idx:
                keep_cols = []
                for b in range(batch):
                    kept = set(stage.kept[b])
                    keep_cols.append([i + 1 for i, o in enumerate(visual_orig[b]) if o is None or o in kept])
                # Samples keeping different counts are left-padded with a column of padding (column 0).
                width = max(len(cols) for cols in keep_cols)
                index = torch.tensor([[0] * (width - len(cols)) + cols for cols in keep_cols])
                hidden = torch.cat([hidden[:, :1] * 0, hidden], dim=1)
                hidden = torch.gather(hidden, 1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))
                valid = torch.gather(torch.cat([valid[:, :1] & False, valid], dim=1), 1, index)
                visual_orig = [[([None] + visual_orig[b])[i] for i in index[b].tolist()] for b in range(batch)]
                if stage.positions == "original":
                    positions = torch.gather(torch.cat([positions[:, :1] * 0, positions], dim=1), 1, index)
                else:
                    positions = (torch.cumsum(valid, 1) - 1).clamp(min=0).masked_fill(~valid, 0)
        rope = lm.rotary_emb(hidden, position_ids=positions)
        hidden = layer(
            hidden,
            attention_mask=_mask(valid, hidden.dtype),
            position_embeddings=rope,
            position_ids=positions,
        )
    hidden = lm.norm(hidden)
    return model.lm_head(hidden), valid


def oracle_greedy(
    model, input_ids, attention_mask, pixel_values, record, steps: int, image_sizes=None
) -> torch.Tensor:
    """Greedy decoding that recomputes the whole prefix every step with the prefill's kept set."""
    ids, mask = input_ids, attention_mask
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else model.config.text_config.pad_token_id
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    out = []
    for _ in range(steps):
        logits, _ = oracle_logits(model, ids, mask, pixel_values, record, image_sizes=image_sizes)
        last = logits[:, -1].clone()
        last[:, model.config.image_token_id] = float("-inf")  # as generate(suppress_tokens=[image token])
        nxt = last.argmax(-1).masked_fill(finished, pad)  # generate pads finished rows
        finished = finished | (nxt == eos)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
    return torch.stack(out, dim=1)
