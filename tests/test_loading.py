"""`model_fingerprint`: what tells one checkpoint folder's weights from another's (the eval runs are keyed by it)."""

from __future__ import annotations

from pathlib import Path

from vtprune import loading
from vtprune.loading import model_fingerprint


def _folder(root: Path, weights: bytes) -> Path:
    root.mkdir()
    (root / "config.json").write_text('{"model_type": "llava"}')
    (root / "model.safetensors").write_bytes(weights)
    (root / "notes.txt").write_text("not part of the model")
    return root


def test_same_files_same_fingerprint_and_any_weight_change_shows(tmp_path: Path) -> None:
    weights = bytes(range(256)) * 64
    first = model_fingerprint(str(_folder(tmp_path / "a", weights)))
    assert first is not None and first == model_fingerprint(str(_folder(tmp_path / "b", weights)))
    changed = bytearray(weights)
    changed[5000] ^= 1
    assert model_fingerprint(str(_folder(tmp_path / "c", bytes(changed)))) != first
    (tmp_path / "a" / "notes.txt").write_text("edited")  # not a model file
    assert model_fingerprint(str(tmp_path / "a")) == first
    (tmp_path / "a" / "config.json").write_text('{"model_type": "llava", "x": 1}')
    assert model_fingerprint(str(tmp_path / "a")) != first


def test_large_weights_are_read_at_both_ends(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(loading, "FINGERPRINT_CHUNK", 16)
    weights = bytearray(200)
    first = model_fingerprint(str(_folder(tmp_path / "a", bytes(weights))))
    weights[-1] = 1
    assert model_fingerprint(str(_folder(tmp_path / "b", bytes(weights)))) != first
    assert model_fingerprint(str(_folder(tmp_path / "c", bytes(201)))) != first  # the size counts too


def test_hub_ids_have_none_and_the_testbed_has_one() -> None:
    assert model_fingerprint("llava-hf/llava-1.5-7b-hf") is None
    assert model_fingerprint("testbed") == model_fingerprint(str(loading.resolve_model_path("testbed")))
    assert model_fingerprint("testbed") is not None
