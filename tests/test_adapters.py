"""The model-adapter protocol: the registry, and imports that run one way (adapter -> signals -> methods ->
engine), so that a new model family is one adapter file."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import torch

import vtprune
from vtprune.models import ADAPTERS, adapter_for, register_adapter, supported_models
from vtprune.models.llava import LlavaAdapter

PACKAGE = Path(vtprune.__file__).parent


def _runtime_imports(path: Path) -> set[str]:
    """vtprune modules a file imports at module level (imports under `if TYPE_CHECKING:` or inside functions
    are not module-level statements)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vtprune"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vtprune"))
    return found


def test_imports_run_one_way():
    layers = {
        "models": ("vtprune.signals", "vtprune.methods", "vtprune.engine", "vtprune.api"),
        "signals": ("vtprune.methods", "vtprune.engine", "vtprune.api", "vtprune.models.llava"),
        "methods": ("vtprune.engine", "vtprune.api"),
        "engine": ("vtprune.api", "vtprune.eval", "vtprune.bench", "vtprune.analysis", "vtprune.cli"),
    }
    for folder, forbidden in layers.items():
        for path in (PACKAGE / folder).glob("*.py"):
            bad = [m for m in _runtime_imports(path) if m.startswith(forbidden)]
            assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"
    engine = set().union(*(_runtime_imports(path) for path in (PACKAGE / "engine").glob("*.py")))
    assert "vtprune.engine.session" in engine  # the package was read
    assert not [m for m in engine if m.startswith("vtprune.models.") and m != "vtprune.models.base"]


def test_every_family_is_registered():
    assert supported_models() == {
        "llava": ("LlavaForConditionalGeneration",),
        "llava_next": ("LlavaNextForConditionalGeneration",),
        "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration",),
        "qwen2_vl": ("Qwen2VLForConditionalGeneration",),
    }


def test_a_new_family_is_one_registered_class(tiny, batch_inputs):
    """A family registered under its model_type serves vtprune.prune without any other change."""
    model = copy.deepcopy(tiny[0])
    model.config.model_type = "toy_llava"

    @register_adapter
    class ToyAdapter(LlavaAdapter):
        family = "toy"
        model_types = ("toy_llava",)

    try:
        assert isinstance(adapter_for(model), ToyAdapter)
        with vtprune.pruned(model, "fastv", keep=8), torch.no_grad():
            model(**batch_inputs)
            assert vtprune.last_record(model).tokens_after_pruning == [8, 8, 8]
    finally:
        ADAPTERS.pop("toy_llava")
