"""Invariant-matrix entries of the LLM-stage methods of the methods issue (see tests/test_engine.py).

case id ("method" or "method[variant]") -> (params for the 4-layer, 64-visual-token tiny model,
exact oracle possible (no created/merged tokens), keeps everything at keep=all).

On 4 layers the layer-average budgets of PDrop/HiMAP cannot go below ~17 tokens (layer 0 sees all 64), so
the plain cases keep one token per stage at keep=16/5; the [ratios]/[counts] variants give explicit counts
(which override keep, hence not keep-all) to exercise real selections.
"""

CASES: dict[str, tuple[dict, bool, bool]] = {
    # SparseVLM: sparse layers 0, 1, 2 (score layer l, prune before l + 1); recycling creates tokens.
    "sparsevlm": ({"layers": (0, 1, 2)}, False, True),
    "sparsevlm[norecycle]": ({"layers": (0, 1, 2), "recycle": False}, True, True),
    # v1: rank-adaptive, different counts per sample (Selection.valid). The hand-written oracle needs equal
    # counts per sample, so its exactness is checked sample by sample in test_methods_llm.py.
    "sparsevlm[v1]": ({"version": "1", "layers": (0, 1, 2), "scale": 0.5, "recycle": False}, False, True),
    "sparsevlm[v1-recycle]": ({"version": "1", "layers": (0, 1, 2), "scale": 3.0}, False, True),
    "sparsevlm[v2]": ({"version": "2.0", "layers": (0, 1, 2), "priority_heads": 2}, True, True),
    # "sink" masks pad-to-square padding only (the released patches); the square test images have none
    "sparsevlm[debias]": (
        {"layers": (0, 1, 2), "recycle": False, "debias": ["recency", "sink"]},
        True,
        True,
    ),
    "pdrop": ({"layer_list": (1, 2, 3)}, True, True),
    "pdrop[ratios]": ({"layer_list": (1, 2, 3), "ratios": (0.5, 0.25, 0.0625)}, True, False),
    "himap": ({"K_t": 1, "K_i": 2}, True, True),
    "himap[counts]": ({"K_t": 1, "K_i": 3, "R_t": 12, "R_i": 4}, True, False),
    "tokencarve": ({"K": 2}, False, True),
    "illava": ({"llm_layer": 2}, False, True),  # the tiny 3-layer tower gets no ViT stage by default
    # DART: keys of layer 1 (captured under SDPA), cut before layer 2; 2 + 2 pivots on 64 tokens.
    "dart": ({"K": 2, "pivot_image_token": 2, "pivot_text_token": 2}, True, True),
    "dart[defaults]": ({}, True, True),
    "dart[l2-k1]": ({"K": 1, "norm": "l2"}, True, True),
    "dart[pre-llm]": ({"K": 0}, True, True),  # the vision-stage variant
    # FlowCut: the tiny tower has one layer before its feature layer (rpl = 0 there: straight to keep);
    # the adaptive schedule on a deeper tower is tested in test_methods_llm.py.
    "flowcut": ({}, False, True),
    # ViT stage at CLIP layer 0 (the only one before the tiny tower's feature layer 1): 64 -> 56 patches.
    # Explicit vit_layers fix that count whatever keep says, hence not keep-all (the default ViT stage is
    # skipped at keep=all, test_methods_vision.py).
    "illava[vit]": ({"llm_layer": 2, "vit_layers": (0,), "vit_remove": 8}, False, False),
}
