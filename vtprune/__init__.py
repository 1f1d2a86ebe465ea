"""vtprune: visual token pruning for vision-language models on unmodified Hugging Face models."""

__version__ = "0.1.0"
