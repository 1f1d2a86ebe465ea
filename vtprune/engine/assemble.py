"""The LLM input after a vision-stage selection: the prompt's text embeddings with each image block replaced by
its kept tokens, as one pure function on tensors."""

from __future__ import annotations

import torch


def assemble_llm_input(
    embeds: torch.Tensor,
    is_image: torch.Tensor,
    text_valid: torch.Tensor,
    starts: torch.Tensor,
    block_len: torch.Tensor,
    tokens: torch.Tensor,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs_embeds, key_valid, slot_pos, text_pos) of the pruned prompt.

    `embeds` (B, L, D) are the prompt's embeddings and `is_image` (B, L) marks its image tokens, in blocks
    (B, n) starting at `starts` and `block_len` long. `tokens` (B * n, W, D) are the tokens kept of each image
    and `valid` (B * n, W) which slots hold one. Each block becomes W slots (unused slots are holes: invalid,
    so masked and skipped by the positions); samples whose blocks got shorter start later (extra left
    padding), so every sample has the same length. `slot_pos` (B, n * W) is each slot's sequence position,
    `text_pos` (B, L) the new position of each text (non-image) column of the prompt.
    """
    batch, length, dim = embeds.shape
    device = embeds.device
    n_img, width = starts.shape[1], tokens.shape[1]
    starts, block_len = starts.to(device), block_len.to(device)
    new_lengths = length - block_len.sum(dim=1) + n_img * width  # (B,)
    new_len = int(new_lengths.max())
    shift = new_len - new_lengths  # (B,)
    block = torch.arange(n_img, device=device)
    before = torch.cumsum(block_len, dim=1) - block_len  # image tokens in earlier blocks
    slot_pos = (starts - before + block * width + shift[:, None])[:, :, None] + torch.arange(width, device=device)
    slot_pos = slot_pos.flatten(1)  # (B, n * W)
    positions = torch.arange(length, device=device)
    images_before = torch.cumsum(is_image, dim=1) - is_image.long()
    blocks_before = ((starts + block_len)[:, None, :] <= positions[None, :, None]).sum(dim=2)
    text_pos = positions - images_before + blocks_before * width + shift[:, None]
    inputs_embeds = embeds.new_zeros(batch, new_len, dim)
    key_valid = torch.zeros(batch, new_len, dtype=torch.bool, device=device)
    text_rows, text_cols = torch.nonzero(~is_image, as_tuple=True)
    new_text_cols = text_pos[text_rows, text_cols]
    inputs_embeds[text_rows, new_text_cols] = embeds[text_rows, text_cols]
    key_valid[text_rows, new_text_cols] = text_valid[text_rows, text_cols]
    flat_tokens = tokens.reshape(batch, n_img * width, dim).to(embeds.dtype)
    inputs_embeds.scatter_(1, slot_pos[:, :, None].expand(-1, -1, dim), flat_tokens)
    key_valid.scatter_(1, slot_pos, valid.reshape(batch, n_img * width))
    return inputs_embeds, key_valid, slot_pos, text_pos
