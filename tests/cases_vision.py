"""Invariant-matrix entries of the vision-stage methods of the methods issue (see tests/test_engine.py).

case id ("method" or "method[variant]") -> (params for the 4-layer, 64-visual-token tiny model,
exact oracle possible (no created/merged tokens), keeps everything at keep=all).

CDPruner runs here without a CLIP text tower (relevance="none": plain DPP on the projected tokens); its CLIP
relevance path is tested end to end with a tiny saved CLIP checkpoint in tests/test_methods_vision.py.
VisionZip and PruMerge create or merge tokens: no oracle. VisionZip at keep=all leaves the model unmodified
(issue 20); PruMerge chooses its own count (keep is only a cap), so keep=all is not the identity.
"""

CASES: dict[str, tuple[dict, bool, bool]] = {
    "cdpruner": ({"relevance": "none"}, True, True),
    "divprune": ({}, True, True),
    "divprune[vision]": ({"feature": "vision"}, True, True),
    "visionzip": ({}, False, True),
    "visionzip[split]": ({"contextual": 3}, False, True),
    "prumerge": ({}, False, False),
    "prumerge[plus]": ({"plus": True}, False, False),
    # HiPrune: object layer 1 (CLIP layer 0) by default on the 3-layer tower; α large enough for anchors.
    "hiprune": ({"alpha": 0.5}, True, True),
    "hiprune[defaults]": ({}, True, True),
    "hiprune[grid-layer2]": ({"alpha": 1.0, "buffer": "grid", "object_layer": 2}, True, True),
    # HoloV: 4 crops of 16 tokens (2 rows, or 4×4 blocks); the defaults give 16 crops of 4 on 64 tokens.
    "holov": ({"crops": 4}, True, True),
    "holov[defaults]": ({}, True, True),
    "holov[grid]": ({"crops": 4, "partition": "grid"}, True, True),
    "scope": ({}, True, True),
    "scope[add-alpha]": ({"combine": "add", "alpha": 0.5}, True, True),
    "vispruner[seed-aliases]": ({"vispruner_ratio": 0.75, "removal_number": 4}, True, True),
}
