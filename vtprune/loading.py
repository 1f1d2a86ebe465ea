"""Loading a LLaVA checkpoint and its processor: a Hugging Face id, a local folder, or `testbed`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """`auto` device: the GPU if there is one; `auto` dtype: bfloat16 on GPU, float32 on CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    valid = ("float32", "float16", "bfloat16")
    if dtype not in valid:
        raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(valid)}")
    return device, getattr(torch, dtype)


def resolve_model_path(model: str) -> str:
    """`testbed` is the small trained LLaVA shipped with vtprune; anything else goes to from_pretrained."""
    if model == "testbed":
        from vtprune.testbed import testbed_path

        return str(testbed_path())
    return model


# The files that decide what a checkpoint folder computes. A file over 2 * FINGERPRINT_CHUNK bytes is fingerprinted
# by its size and its first and last FINGERPRINT_CHUNK bytes, so that a 14 GB folder is not read whole before every
# run (retraining changes those bytes too: they hold the first and the last tensors).
FINGERPRINT_FILES = ("*.json", "*.jinja", "*.safetensors", "*.bin", "*.model")
FINGERPRINT_CHUNK = 8 << 20


def model_fingerprint(model: str) -> str | None:
    """A short digest of a local model folder (or `testbed`): the names, sizes and contents of its config,
    processor and weight files. Evaluation results are stored under it, so that retrained weights saved in the
    same folder are never mistaken for the ones an earlier run scored. None for a Hub id (its revision is given
    with `model_revision`)."""
    folder = Path(resolve_model_path(model))
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    files = sorted({f for pattern in FINGERPRINT_FILES for f in folder.glob(pattern) if f.is_file()})
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with file.open("rb") as handle:
            if size <= 2 * FINGERPRINT_CHUNK:
                digest.update(handle.read())
            else:
                digest.update(handle.read(FINGERPRINT_CHUNK))
                handle.seek(size - FINGERPRINT_CHUNK)
                digest.update(handle.read(FINGERPRINT_CHUNK))
    return digest.hexdigest()[:16]


def load_model(
    model: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    revision: str | None = None,
):
    """(the vision-language model in eval mode on `device`, its processor with left padding).

    The class comes from the checkpoint's `model_type` (transformers' image-text-to-text mapping); only the
    families vtprune has an adapter for are loaded (`vtprune.models.supported_models()`)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from vtprune.errors import PruneConfigError
    from vtprune.models import supported_models

    path = resolve_model_path(model)
    if not Path(path).exists() and "/" not in path:
        raise FileNotFoundError(
            f"model {model!r} is neither a local folder nor a Hugging Face id (owner/name)"
        )
    model_type = AutoConfig.from_pretrained(path, revision=revision).model_type
    supported = supported_models()
    if model_type not in supported:
        raise PruneConfigError(
            f"model {model!r} is a {model_type!r} model; vtprune supports {', '.join(supported)}"
        )
    llava = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, revision=revision
    )
    llava.to(device).eval()
    try:
        processor = AutoProcessor.from_pretrained(path, revision=revision)
    except ImportError as error:
        if model_type not in ("qwen2_vl", "qwen2_5_vl") or "orchvision" not in str(error):
            raise
        # Qwen-VL's video processor needs torchvision: load the image-only processor (images work as usual).
        from vtprune.models.qwen2_vl import load_image_only_processor

        processor = load_image_only_processor(path, revision)
    processor.tokenizer.padding_side = "left"  # generation continues from the right end of every row
    return llava, processor
