"""The LLM input after a vision-stage selection: the prompt's text embeddings with each image block replaced by
its kept tokens, as one pure function on tensors.

Where every token goes depends on the token ids alone, so the index maps are computed on the host from a host
copy of the prompt (`PromptLayout`) and only then moved to the device: the prefill never waits for the GPU
(the vision tower, the selection) to learn a length, which at batch 1 would leave the GPU idle while the host
launches what follows."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptLayout:
    """The pruned prompt's shape and index maps (host tensors), from the prompt's layout alone.

    `new_len` is the pruned prompt's length; `slot_pos` (B, n * W) each image slot's sequence position;
    the text (non-image) columns of the prompt are (`text_rows`, `text_cols`), and `text_new_cols` their
    positions in the pruned one; `padded` whether some sample is left-padded to `new_len`."""

    new_len: int
    slot_pos: torch.Tensor
    text_rows: torch.Tensor
    text_cols: torch.Tensor
    text_new_cols: torch.Tensor
    padded: bool

    @classmethod
    def build(
        cls, is_image: torch.Tensor, starts: torch.Tensor, block_len: torch.Tensor, width: int
    ) -> PromptLayout:
        """`is_image` (B, L) marks the prompt's image tokens, in blocks (B, n) starting at `starts` and
        `block_len` long (host tensors); each block becomes `width` slots. Samples whose blocks got shorter
        start later (extra left padding), so every sample has the same length."""
        length = is_image.shape[1]
        n_img = starts.shape[1]
        new_lengths = length - block_len.sum(dim=1) + n_img * width  # (B,)
        new_len = int(new_lengths.max())
        shift = new_len - new_lengths  # (B,)
        block = torch.arange(n_img)
        before = torch.cumsum(block_len, dim=1) - block_len  # image tokens in earlier blocks
        slot_pos = (starts - before + block * width + shift[:, None])[:, :, None] + torch.arange(width)
        positions = torch.arange(length)
        images_before = torch.cumsum(is_image, dim=1) - is_image.long()
        blocks_before = ((starts + block_len)[:, None, :] <= positions[None, :, None]).sum(dim=2)
        text_pos = positions - images_before + blocks_before * width + shift[:, None]
        rows, cols = torch.nonzero(~is_image, as_tuple=True)
        return cls(new_len, slot_pos.flatten(1), rows, cols, text_pos[rows, cols], bool((shift > 0).any()))

    def to(self, device: torch.device) -> PromptLayout:
        # non_blocking: a host-to-device copy that does not wait for the work already queued on the device
        moved = {
            name: getattr(self, name).to(device, non_blocking=True)
            for name in ("slot_pos", "text_rows", "text_cols", "text_new_cols")
        }
        return PromptLayout(new_len=self.new_len, padded=self.padded, **moved)


def assemble_llm_input(
    embeds: torch.Tensor,
    text_valid: torch.Tensor,
    layout: PromptLayout,
    tokens: torch.Tensor,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds, key_valid) of the pruned prompt.

    `embeds` (B, L, D) are the prompt's embeddings and `text_valid` (B, L) which of its columns are valid;
    `layout` (on the embeddings' device) places them; `tokens` (B * n, W, D) are the tokens kept of each image
    and `valid` (B * n, W) which slots hold one. Unused slots and the new left padding are holes: invalid, so
    masked and skipped by the positions."""
    batch, _, dim = embeds.shape
    slots = layout.slot_pos.shape[1]
    inputs_embeds = embeds.new_zeros(batch, layout.new_len, dim)
    key_valid = torch.zeros(batch, layout.new_len, dtype=torch.bool, device=embeds.device)
    rows, cols, new_cols = layout.text_rows, layout.text_cols, layout.text_new_cols
    inputs_embeds[rows, new_cols] = embeds[rows, cols]
    key_valid[rows, new_cols] = text_valid[rows, cols]
    flat_tokens = tokens.reshape(batch, slots, dim).to(embeds.dtype)
    inputs_embeds.scatter_(1, layout.slot_pos[:, :, None].expand(-1, -1, dim), flat_tokens)
    key_valid.scatter_(1, layout.slot_pos, valid.reshape(batch, slots))
    return inputs_embeds, key_valid
