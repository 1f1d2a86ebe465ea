"""Built-in pruning methods; importing this package registers them by name."""

from vtprune.methods import fastv, l2norm, none, random, vispruner  # noqa: F401
from vtprune.methods.base import METHODS, Method, Selection, Stage, make_method, register  # noqa: F401
