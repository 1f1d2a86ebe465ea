"""The settings of one evaluation run, validated at the edge, and the identity that names its result folder.

Two kinds of settings: those that can change a prediction (model, dtype, attention backend, task, data,
prompt template, preprocessing, method, budget, parameters, decoding length, parser) form the run's
identity -- hashed into the folder name and stored as `config.json`, so a run with different settings never
writes into the folder of another. Those that cannot (batch size, limit, output root, progress display,
device index) may change between a run and its resumption; in particular a larger `--limit` extends a run.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vtprune.errors import UserInputError
from vtprune.eval.errors import EvalInputError
from vtprune.userinput import parse_keep

TEMPLATES = ("hf", "vicuna_v1")
PREPROCESSINGS = ("crop", "pad")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# LLaVA's `conv_vicuna_v1` system prompt; the paper-reproduction setting prepends it.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass
class EvalConfig:
    """Everything `run_eval` needs. Identity fields first, then execution-only fields."""

    model: str
    task: str = "pope"
    split: str | None = None
    dataset_id: str | None = None
    dataset_config: str | None = None
    revision: str | None = None
    parser: str | None = None
    method: str = "none"
    keep: int | float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    template: str = "hf"
    preprocessing: str = "crop"
    max_new_tokens: int | None = None
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    model_revision: str | None = None
    # execution-only (not part of the identity)
    batch_size: int = 1
    limit: int | None = None
    output: str = "results"
    device: str = "auto"
    retry_errors: bool = False
    progress: bool = True
    compile: bool = False  # compiled decoding (vtprune/compiled.py): the same answers, faster

    IDENTITY_EXCLUDED = ("batch_size", "limit", "output", "device", "retry_errors", "progress", "compile")

    def validate(self) -> None:
        """Check the fields that need no model or data; raise EvalInputError naming the valid choices."""
        if self.template not in TEMPLATES:
            raise EvalInputError(f"unknown template {self.template!r}; valid templates: {', '.join(TEMPLATES)}")
        if self.preprocessing not in PREPROCESSINGS:
            raise EvalInputError(
                f"unknown preprocessing {self.preprocessing!r}; valid choices: {', '.join(PREPROCESSINGS)}"
            )
        if self.dtype not in DTYPES:
            raise EvalInputError(f"unknown dtype {self.dtype!r}; valid dtypes: {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise EvalInputError(f"batch size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise EvalInputError(f"limit must be >= 1, got {self.limit}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise EvalInputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.method == "none":
            if self.params:
                raise EvalInputError("--param needs a pruning method (method is 'none')")
            self.keep = None
        else:
            # keep=None means the method's paper default budget (vtprune.prune semantics)
            try:
                self.keep = None if self.keep is None else parse_keep(self.keep)
            except UserInputError as exc:  # reported as this configuration's error, like the checks above
                raise EvalInputError(str(exc)) from None

    def identity(self, task_description: dict[str, Any], resolved_dtype: str) -> dict[str, Any]:
        """The settings that define what the run computes (task fields resolved to their defaults)."""
        data = {k: v for k, v in asdict(self).items() if k not in self.IDENTITY_EXCLUDED}
        data.update({k: v for k, v in task_description.items() if k != "task"})
        data["dataset_id"] = task_description.get("dataset")
        data.pop("dataset", None)
        data["dtype"] = resolved_dtype
        # retrained weights saved in the same folder are another model: their results go to another run folder
        from vtprune.loading import model_fingerprint

        data["model_fingerprint"] = model_fingerprint(self.model)
        return data


def config_hash(identity: dict[str, Any]) -> str:
    """Short stable hash of a run identity (sorted-key JSON)."""
    blob = json.dumps(identity, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def model_name(model: str) -> str:
    """A folder-safe model name: the last component of a path or Hub id."""
    name = Path(model.rstrip("/")).name or model
    return _safe(name)


def keep_label(method: str, keep: int | float | None) -> str:
    if method == "none":
        return "kall"
    if keep is None:
        return "kdefault"
    return f"k{keep:g}" if isinstance(keep, float) else f"k{keep}"


def run_folder_name(identity: dict[str, Any]) -> Path:
    """`<task>-<split>/<model-name>/<method>-k<keep>-<hash>` relative to the output root."""
    return (
        Path(_safe(f"{identity['task']}-{identity['split']}"))
        / model_name(identity["model"])
        / _safe(f"{identity['method']}-{keep_label(identity['method'], identity['keep'])}-{config_hash(identity)}")
    )


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text)
