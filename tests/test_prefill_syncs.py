"""A vision-stage prefill reads nothing back from the GPU between queuing the vision tower and the end of the
forward: the prompt's layout comes from host copies of the ids and the mask taken before the tower, and the
stages are recorded in one transfer when the prefill ends. At batch 1 a read in between would leave the GPU
idle while the host launches the selection and the LLM (vtprune/engine/session.py).

Every registered method whose only stage is a vision stage is checked twice:
* on any device, the Python-level reads (`tolist`, `item`, `bool()`, `int()`, ...) made in vtprune's code
  during the prefill are those of the unpruned engine (its layout reads of host copies) plus the method's
  declared own (`OWN_READS`);
* on CUDA, with torch's sync-debug mode, the only device synchronisations are the host copies before the tower
  and the records' read (this also sees reads made inside torch ops, e.g. a CUDA `bincount`).
"""

from __future__ import annotations

import linecache
import sys
import warnings

import pytest
import torch
from conftest import QUESTIONS, build_inputs, sized_image_inputs

import vtprune
from vtprune.api import session_of
from vtprune.methods.base import METHODS, _load_builtin_methods
from vtprune.testing import make_tiny_llava, make_tiny_llava_next, make_tiny_qwen_vl, random_image

_load_builtin_methods()
VISION_METHODS = sorted(name for name, cls in METHODS.items() if cls.stage_kind == "vision")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

# a method's own reads, each with why: the selection's shape depends on the data
OWN_READS = {"prumerge": ("methods/prumerge.py",)}  # its adaptive token count sets the selection's width
PARAMS = {"cdpruner": {"relevance": "none"}}  # CDPruner's default relevance loads a CLIP text tower from the hub
TEXTS = ["USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nWhat is in this picture? ASSISTANT:"]

# the only reads the engine makes in a vision-stage prefill: the host copies before the tower, the records after
RECORDS = "flat = torch.cat("  # PruneSession._stage_records
ALLOWED = ("ids_host = input_ids.cpu()", "text_valid_host = text_valid_in.cpu()", RECORDS)


def _engine_syncs(model, inputs) -> list[str]:
    """The source lines in vtprune that made the device synchronise during one prefill forward."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(**inputs, use_cache=True, logits_to_keep=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [
        f"{w.filename.rsplit('vtprune/', 1)[-1]}:{w.lineno}: {linecache.getline(w.filename, w.lineno).strip()}"
        for w in caught
        if "/vtprune/" in w.filename and "synchroniz" in str(w.message)
    ]


def _inputs(processor, padded: bool, device: str = "cpu"):
    texts = TEXTS if padded else TEXTS[:1]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[random_image(i) for i in range(len(texts))], text=texts, padding=True, return_tensors="pt")
    return inputs.to(device)


def _prune(model, method: str) -> None:
    vtprune.prune(model, method, keep=8, **PARAMS.get(method, {}))
    assert method == "none" or {stage.kind for stage in session_of(model).stages} == {"vision"}


def _python_reads(model, inputs, monkeypatch) -> list[str]:
    """The vtprune source lines that read a tensor's value into Python during one prefill forward."""
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def call(tensor, *args, _original=original, **kwargs):
            frame = sys._getframe(1)
            if "/vtprune/" in frame.f_code.co_filename:
                reads.append(f"{frame.f_code.co_filename.rsplit('vtprune/', 1)[-1]}:{frame.f_lineno}")
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, call)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)
    finally:
        monkeypatch.undo()
    return reads


@pytest.mark.parametrize("method", VISION_METHODS)
def test_vision_stage_methods_read_only_what_the_engine_reads(method, monkeypatch):
    model, processor = make_tiny_llava()
    model.eval()
    inputs = _inputs(processor, padded=True)
    _prune(model, "none")  # the engine without a selection: its layout's reads (of host copies) and the records'
    engine_reads = set(_python_reads(model, inputs, monkeypatch))
    vtprune.unprune(model)
    _prune(model, method)
    with torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1)  # warm-up: lazy inits are not the prefill's
    reads = _python_reads(model, inputs, monkeypatch)
    own = [r for r in reads if r not in engine_reads and not r.startswith(OWN_READS.get(method, ()))]
    assert not own, f"{method} reads from the device inside the prefill:\n" + "\n".join(
        f"{r}: {linecache.getline(vtprune.__file__.rsplit('/', 1)[0] + '/' + r.split(':')[0], int(r.split(':')[1])).strip()}"
        for r in own
    )
    assert any("engine/session.py" in r for r in reads)  # the counter sees reads at all (the records' one)


@cuda
@pytest.mark.parametrize("method", VISION_METHODS)
@pytest.mark.parametrize("padded", [False, True])
def test_vision_stage_prefill_reads_back_only_before_the_tower_and_at_the_end(method, padded):
    model, processor = make_tiny_llava()
    model = model.cuda().eval()
    inputs = _inputs(processor, padded, "cuda")
    _prune(model, method)
    with torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1)  # warm-up: lazy inits are not the engine's
    syncs = _engine_syncs(model, inputs)
    unexpected = [
        s for s in syncs if not any(a in s for a in ALLOWED) and not s.startswith(OWN_READS.get(method, ()))
    ]
    assert not unexpected, "device reads inside the prefill:\n" + "\n".join(unexpected)
    assert any(RECORDS in s for s in syncs)  # the check sees syncs at all (the records' one read)


# --- the "text" query rows' width, from the host -------------------------------------------------------
def _family_batch(family: str):
    """A tiny model of `family` and a left-padded batch of questions of different lengths (LLaVA: two images
    per prompt; NeXT and Qwen: images of different token counts)."""
    if family == "llava":
        model, processor = make_tiny_llava(seed=0)
        return model, build_inputs(processor, QUESTIONS[:3], [1, 2, 3], images_per_prompt=2)
    if family == "llava_next":
        model, processor = make_tiny_llava_next(seed=0)
        return model, sized_image_inputs(processor, QUESTIONS[:2], [(120, 60), (80, 100)], [1, 2], 60)
    model, processor = make_tiny_qwen_vl(family, seed=0)
    return model, sized_image_inputs(processor, QUESTIONS[:2], [(64, 48), (48, 80)], [1, 2], 64)


TEXT_QUERY_METHODS = {"dart": {"pivot_text_token": 2}, "sparsevlm": {"layers": (0, 1, 2)}}


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
@pytest.mark.parametrize("method", sorted(TEXT_QUERY_METHODS))
def test_text_query_width_from_the_host_is_the_device_count(family, method, monkeypatch):
    """The engine gives LLM stages the width of the "text" query rows (the real tokens after the last image
    token) from the host copies of the ids and mask; it must be what the device would count."""
    from vtprune.signals.context import LLMSignals

    model, inputs = _family_batch(family)
    seen = []
    original = LLMSignals.set_text_width

    def checked(self, width):
        seen.append((width, int(self.text_counts().max())))
        return original(self, width)

    monkeypatch.setattr(LLMSignals, "set_text_width", checked)
    with vtprune.pruned(model, method, keep=4, **TEXT_QUERY_METHODS[method]), torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1)
    assert seen and all(given == counted for given, counted in seen), seen
