"""vtprune: visual token pruning for vision-language models on unmodified Hugging Face models."""

__version__ = "0.1.0"

from vtprune.api import get_method, is_pruned, last_record, list_methods, prune, pruned, unprune  # noqa: E402
from vtprune.errors import PruneConfigError  # noqa: E402

__all__ = ["prune", "unprune", "pruned", "is_pruned", "last_record", "list_methods", "get_method", "PruneConfigError"]
