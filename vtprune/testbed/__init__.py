"""The shapes testbed: a procedurally generated POPE-like benchmark and a tiny trained LLaVA that ships with vtprune.

- `vtprune.testbed.shapes`: `write_shapes_pope`, `write_shapes_mcq`, `ensure_shapes_data` (parquet in the
  lmms-lab/POPE and lmms-lab/ScienceQA schemas, PNG images).
- `testbed_path()`: the packaged checkpoint (`LlavaForConditionalGeneration.from_pretrained(testbed_path())`).
- `vtprune.testbed.train`: the script that trained it (`python -m vtprune.testbed.train --help`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vtprune.testbed import tasks  # noqa: F401  (registers the shapes-pope / shapes-mcq tasks)
from vtprune.testbed.shapes import ensure_shapes_data, write_shapes_mcq, write_shapes_pope

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

__all__ = ["ensure_shapes_data", "load_testbed", "testbed_path", "write_shapes_mcq", "write_shapes_pope"]


def testbed_path() -> Path:
    """Folder of the packaged testbed model (config, fp16 safetensors, processor, card README.md, eval.json)."""
    if not (WEIGHTS_DIR / "config.json").is_file():
        raise FileNotFoundError(f"the testbed weights are missing from {WEIGHTS_DIR} (broken install?)")
    return WEIGHTS_DIR


def load_testbed(
    device: str = "cpu", attn_implementation: str = "sdpa", path: str | Path | None = None
) -> tuple[Any, Any]:
    """(model, processor) of the testbed (or of another saved testbed-style model at `path`), loaded offline with
    `from_pretrained`, fp32, in eval mode."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = testbed_path() if path is None else Path(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn_implementation)
    return model.to(device).eval(), AutoProcessor.from_pretrained(path)
