"""Invariant-matrix entries of the vision-stage methods of the methods issue (see tests/test_engine.py).

case id ("method" or "method[variant]") -> (params for the 4-layer, 64-visual-token tiny model,
exact oracle possible (no created/merged tokens), keeps everything at keep=all).
"""

CASES: dict[str, tuple[dict, bool, bool]] = {}
