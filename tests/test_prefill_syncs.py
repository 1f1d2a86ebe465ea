"""A vision-stage prefill reads nothing back from the GPU between queuing the vision tower and the end of the
forward (CUDA only; skipped on CPU): the prompt's layout comes from host copies of the ids and the mask taken
before the tower, and the stages are recorded in one transfer when the prefill ends. At batch 1 a read in
between would leave the GPU idle while the host launches the selection and the LLM (vtprune/engine/session.py).
"""

from __future__ import annotations

import linecache
import warnings

import pytest
import torch

import vtprune
from vtprune.testing import make_tiny_llava, random_image

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

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


@cuda
@pytest.mark.parametrize("method", ["visionzip", "divprune", "cdpruner", "vispruner", "scope", "hiprune"])
@pytest.mark.parametrize("padded", [False, True])
def test_vision_stage_prefill_reads_back_only_before_the_tower_and_at_the_end(method, padded):
    model, processor = make_tiny_llava()
    model = model.cuda().eval()
    texts = ["USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nWhat is in this picture? ASSISTANT:"]
    texts = texts if padded else texts[:1]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[random_image(i) for i in range(len(texts))], text=texts, padding=True, return_tensors="pt")
    inputs = inputs.to("cuda")
    # CDPruner's default text relevance loads a CLIP text tower from the hub; its selection is the same DPP
    vtprune.prune(model, method, keep=8, **({"relevance": "none"} if method == "cdpruner" else {}))
    with torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1)  # warm-up: lazy inits are not the engine's
    syncs = _engine_syncs(model, inputs)
    unexpected = [s for s in syncs if not any(a in s for a in ALLOWED)]
    assert not unexpected, "device reads inside the prefill:\n" + "\n".join(unexpected)
    assert any(RECORDS in s for s in syncs)  # the check sees syncs at all (the records' one read)
