"""Built-in pruning methods; importing this package registers them by name."""

# One module per method; importing it registers the method.
from vtprune.methods import (  # noqa: F401
    cdpruner,
    dart,
    divprune,
    fastv,
    flowcut,
    himap,
    hiprune,
    holov,
    illava,
    l2norm,
    none,
    pdrop,
    prumerge,
    random,
    scope,
    sparsevlm,
    tokencarve,
    visionzip,
    vispruner,
)
from vtprune.methods.base import METHODS, Method, Selection, Stage, make_method, register  # noqa: F401
