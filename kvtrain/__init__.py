"""kvtrain: teach language models to live with a compressed KV cache."""

__version__ = "0.1.0"
