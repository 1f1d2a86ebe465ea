"""`python -m vtprune.testbed.diagnose`: region lookups, attention to the asked-about object, feature shares."""

from __future__ import annotations

import json

import pytest
import torch

from vtprune.testbed import diagnose
from vtprune.testbed.questions import REGIONS


def test_variance_share_hand_computed():
    x = torch.tensor([[0.0], [2.0], [1.0], [3.0]])
    # group means 1 and 2 around 1.5: between 2 * 0.25 + 2 * 0.25 = 1 of a total 5
    assert diagnose._share(x, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.2)
    assert diagnose._share(x, torch.tensor([0, 1, 2, 3])) == pytest.approx(1.0)


def test_region_questions_ask_about_objects_alone_in_their_quadrant():
    items = diagnose.region_questions(20)
    assert items
    for scene, region, target in items:
        assert region in REGIONS and target in scene.objects and target.region() == region
        assert sum(o.region() == region for o in scene.objects) == 1


def test_diagnose_on_the_shipped_model(tmp_path):
    out = tmp_path / "diagnosis.json"
    result = diagnose.main(["--scenes", "4", "--batch-size", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    n = len(diagnose.region_questions(4))
    assert result["questions"] == n and result["region"]["all"]["n"] == n
    for row in result["region"].values():
        assert 0 <= row["colour"] <= 1 and 0 <= row["names_another_object"] <= 1
    masses = torch.tensor(result["attention"]["per_layer_head"])
    assert masses.shape == (6, 4, 3)
    assert (masses >= 0).all() and (masses.sum(-1) <= 1 + 1e-3).all()
    assert masses.sum() > 0.5  # the last prompt token does attend to the image
    for shares in result["features"].values():
        assert 0 < shares["quadrant_share"] < 1 and 0 < shares["class_share"] < 1
    with pytest.raises(SystemExit):
        diagnose.main(["--scenes", "0"])
