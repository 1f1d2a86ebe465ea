"""The `lmms_eval.models` entry point: tells lmms-eval that `--model vtprune` is VTPruneLMM.

Kept apart from the model module so that lmms-eval, which loads every entry point at start, imports only this
light file for runs of other models; the model module (torch, vtprune's predictor) loads when `vtprune` is used.
"""

from __future__ import annotations

MODEL_ID = "vtprune"
CLASS_PATH = "vtprune.integrations.lmms_eval.VTPruneLMM"


def manifest():
    """lmms-eval calls this (a callable payload) and registers the manifest it returns."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
