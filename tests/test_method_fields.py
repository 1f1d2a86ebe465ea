"""Declarative field validation of the method dataclasses (vtprune/methods/base.py `check_fields`)."""

from __future__ import annotations

import dataclasses

import pytest

import vtprune
from vtprune.errors import PruneConfigError
from vtprune.methods.base import METHODS, make_method

vtprune.list_methods()  # registers the built-in methods
FIELDS = [(name, f.name) for name, cls in sorted(METHODS.items()) for f in dataclasses.fields(cls)]


@pytest.mark.parametrize(("method", "field_name"), FIELDS, ids=[f"{m}.{f}" for m, f in FIELDS])
def test_every_field_rejects_a_wrong_type_by_name(method, field_name):
    # A complex number is no field's type (ints, numbers, strings, bools, sequences, None).
    with pytest.raises(PruneConfigError, match=rf"{method}: .*{field_name}"):
        make_method(method, **{field_name: 1j})


def test_every_default_is_valid():
    for name in METHODS:
        make_method(name)


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("sparsevlm", {"recycle": "false"}, r"sparsevlm: recycle='false' must be a bool \(True or False\) or None"),
        ("fastv", {"K": 2.5}, r"fastv: K=2.5 must be an int >= 1"),
        ("fastv", {"K": True}, r"fastv: K=True must be an int"),
        ("fastv", {"K": 0}, r"fastv: K=0 must be an int >= 1 \(K=0 is random pruning"),
        ("fastv", {"R": 1.0}, r"fastv: R=1.0 must be a number in \[0, 1\)"),
        ("fastv", {"query": "middle"}, r"fastv: query='middle' must be one of 'last', 'all'"),
        ("holov", {"alpha": float("nan")}, r"holov: alpha=nan must be a number >= 0"),
        ("himap", {"R_t": 1.5, "R_i": 2}, r"himap: R_t=1.5 must be an int >= 1, or None"),
        ("pdrop", {"ratios": (0.5, 2.0, 0.1)}, r"pdrop: ratios=\(0.5, 2.0, 0.1\): every item must be in \(0, 1\]"),
        ("pdrop", {"layer_list": (0, 4)}, r"pdrop: layer_list=\(0, 4\): every item must be >= 1"),
        ("illava", {"vit_layers": (1, "2")}, r"illava: vit_layers=\(1, '2'\) must be a sequence of ints or None"),
        ("visionzip", {"crop_budget": "tile"}, r"visionzip: crop_budget='tile' must be one of 'crop', 'image'"),
        ("vispruner", {"retain_img_tokens": "64"}, r"vispruner: retain_img_tokens='64' must be a number or None"),
        ("fastv", {"num_heads": 0}, r"fastv: num_heads=0 must be >= 1"),
        # the range of a field whose default a subclass overrides still holds
        ("vispruner_nosink", {"attention_sink_threshold": 0.0}, r"attention_sink_threshold=0.0 must be a number in \(0, 1\]"),
    ],
)
def test_wrong_type_or_range_names_field_value_and_expectation(method, params, message):
    with pytest.raises(PruneConfigError, match=message):
        vtprune.get_method(method, **params)


def test_accepted_spellings():
    # an int is a number; a list is stored as a tuple (records and equality do not depend on the spelling)
    assert vtprune.get_method("fastv", R=0).R == 0
    assert vtprune.get_method("pdrop", layer_list=[2, 4], ratios=[0.5, 1]).layer_list == (2, 4)
    assert vtprune.get_method("sparsevlm", version=2.0).version == "2.0"  # a command line reads 2.0 as a float
    assert vtprune.get_method("fastv", debias=["sink"]).debias == ["sink"]  # a list is one of its types
    assert vtprune.get_method("fastv", heads="graph_based", num_heads="dynamic").num_heads == "dynamic"
    # dataclasses.replace re-validates
    with pytest.raises(PruneConfigError, match="K=-1"):
        dataclasses.replace(vtprune.get_method("fastv"), K=-1)
