"""The error every layer of vtprune raises for bad user input to pruning (a bottom module: imports nothing)."""


class PruneConfigError(ValueError):
    """Bad user input to prune(): unknown method, impossible budget, layer out of range, unsupported model, ..."""
