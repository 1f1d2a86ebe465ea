"""The visual tokens of a batch's images as the LLM receives them, and the arithmetic of image groups and shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.errors import PruneConfigError


@dataclass
class ImageTokens:
    """The visual tokens of every image as the LLM receives them, padded to the longest image."""

    hidden: torch.Tensor  # (N, 1 + P, Dv) feature-layer output per token, [CLS] first
    projected: torch.Tensor  # (N, P, D)
    lengths: torch.Tensor  # (N,) tokens of each image
    source: torch.Tensor | None = None  # (N, P) crop * p + patch, -1: not from the tower (VisionSignals)
    image_crop: torch.Tensor | None = None  # (N,) the image's base view among the tower inputs
    crop_hidden: torch.Tensor | None = None  # (C, 1 + p, Dv) the tower's output per input, when images have several

    @property
    def count(self) -> int:
        return self.lengths.shape[0]

    @property
    def uniform(self) -> bool:
        return bool((self.lengths == self.lengths[0]).all())

    @property
    def token_valid(self) -> torch.Tensor:
        return torch.arange(self.projected.shape[1])[None] < self.lengths[:, None]

    @classmethod
    def build(cls, adapter, crop_hidden: torch.Tensor, projected, image_sizes, batch: int) -> ImageTokens:
        if isinstance(projected, torch.Tensor):  # each image is one tower input whose patches are its tokens
            return cls(crop_hidden, projected, torch.full((projected.shape[0],), projected.shape[1]))
        sources = adapter.token_sources(image_sizes)
        if sources is not None and len(projected) > len(sources):
            # generate() repeated each sample's images for beams / num_return_sequences after encoding them
            # once: the copies come from the same tower inputs.
            sources = [sources[int(j)] for j in expanded_images(len(projected), len(sources), batch)]
        counts = [t.shape[0] for t in projected]
        if sources is None or [len(s) for s in sources] != counts:
            raise PruneConfigError(
                f"{adapter.family}: the image features ({len(counts)} images) do not match the image sizes given"
            )
        device = crop_hidden.device
        source = torch.nn.utils.rnn.pad_sequence(sources, batch_first=True, padding_value=-1).to(device)
        per_crop = crop_hidden.shape[1] - 1
        image_crop = source[:, 0] // per_crop  # the base view comes first
        flat = crop_hidden[:, 1:].reshape(-1, crop_hidden.shape[-1])
        tokens = flat[source.clamp(min=0)].masked_fill((source < 0)[..., None], 0)
        return cls(
            hidden=torch.cat([crop_hidden[image_crop, :1], tokens], dim=1),
            projected=torch.nn.utils.rnn.pad_sequence(projected, batch_first=True),
            lengths=torch.tensor(counts),
            source=source,
            image_crop=image_crop,
            crop_hidden=crop_hidden,
        )


def expanded_images(expanded: int, computed: int, batch: int) -> torch.Tensor:
    """(expanded,) the computed image each image of an expanded batch is a copy of: generate() repeats each
    sample's group of images for beams / num_return_sequences ([A1 A2, B1 B2] -> [A1 A2, A1 A2, B1 B2, B1 B2])."""
    per_sample = expanded // batch
    repeat = expanded // computed
    j = torch.arange(expanded)
    return (j // (per_sample * repeat)) * per_sample + j % per_sample


def equal_shares(total: int, sizes: list[int]) -> list[int]:
    """`total` split as equally as possible over parts of the given sizes, none above its size (what a part
    cannot take goes to the others; earlier parts get the remainder first)."""
    shares = [0] * len(sizes)
    left, open_parts = total, [i for i, size in enumerate(sizes) if size > 0]
    while left > 0 and open_parts:
        each, extra = divmod(left, len(open_parts))
        for rank, i in enumerate(open_parts):
            give = min(each + (rank < extra), sizes[i] - shares[i])
            shares[i] += give
            left -= give
        open_parts = [i for i in open_parts if shares[i] < sizes[i]]
    return shares
