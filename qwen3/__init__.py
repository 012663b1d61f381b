"""qwen3: a Qwen3-architecture language model built from scratch, with its training, inference and serving."""

__version__ = "0.1.0"
