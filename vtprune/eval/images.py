"""Turn whatever a dataset stores in its image column into an RGB PIL image, and LLaVA's square padding.

Hugging Face `datasets` hands out PIL images, parquet files read with pyarrow hand out `{"bytes", "path"}`
structs, and a local JSONL folder stores file names. Decoding all of them in one place means every task
and every loader accepts every form, and a broken image fails here with a reason the runner can record.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image


class ImageDecodeError(ValueError):
    """A sample's image could not be read (missing, corrupt, unknown form)."""


def decode_image(value: Any, base_dir: str | Path | None = None) -> Image.Image | None:
    """Decode an image cell to an RGB PIL image; None stays None (a text-only sample).

    Accepted: a PIL image, raw bytes, a `{"bytes": ..., "path": ...}` dict (the parquet/Arrow form of a
    `datasets.Image` column), or a path string (relative paths resolve against `base_dir`).
    """
    if value is None:
        return None
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, dict):
            data = value.get("bytes")
            path = value.get("path")
            if data:
                image = Image.open(io.BytesIO(bytes(data)))
            elif path:
                image = Image.open(_resolve(path, base_dir))
            else:
                raise ImageDecodeError("image cell has neither bytes nor path")
        elif isinstance(value, (str, Path)):
            image = Image.open(_resolve(value, base_dir))
        else:
            raise ImageDecodeError(f"unsupported image value of type {type(value).__name__}")
        image.load()  # force decoding now so a truncated file fails here, not inside the processor
        return image.convert("RGB")
    except ImageDecodeError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError ...)
        raise ImageDecodeError(f"unreadable image: {type(exc).__name__}: {exc}") from exc


def _resolve(path: str | Path, base_dir: str | Path | None) -> Path:
    p = Path(path)
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    if not p.exists():
        raise ImageDecodeError(f"image file not found: {p}")
    return p


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `expand2square`: paste the image centred on a square canvas of the background colour.

    The original LLaVA code pads with the CLIP mean colour before the CLIP processor, so the subsequent
    resize + centre crop keeps the whole image instead of cropping its long side.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(image_mean: Any) -> tuple[int, int, int]:
    """The padding colour LLaVA uses: the processor's normalisation mean scaled to 0..255."""
    if image_mean is None:
        return (0, 0, 0)
    if isinstance(image_mean, (int, float)):
        image_mean = [image_mean] * 3
    values = [int(float(x) * 255) for x in image_mean]
    return (values[0], values[1], values[2])
