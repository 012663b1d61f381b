"""qwen3: a Qwen3-architecture language model built from scratch, with its training, inference and
serving.

This is the package's face: the names most scripts need, each imported when it is first used, so
that `import qwen3` (and `qwen3 --help`, `qwen3 prepare`) loads no torch:

    from qwen3 import load_model, save_model, Muon
    model = load_model("runs/seed/best")      # any Hugging Face Qwen3 folder

The house, bottom to top (each package's docstring says what it holds and what it may import;
tests/test_layers.py holds the code to the rule):

    errors, config, runtime, atomic, allocator   what every layer may use
    model/    the Qwen3 decoder and what travels with it: KV cache, sliced loss, checkpoints, LoRA
    data/     text -> tokens: sources, tokenizer, token store, windows, conversations, the embedded sets
    infer/    generation (sampling, engine), the terminal chat and demo, GGUF export
    train/    the loop and its stages, optimizers, evaluation, run files (may generate through infer/)
    server/   the OpenAI-compatible API and the chat page, over infer/
    cli       the `qwen3` command, which nothing imports
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
EXPORTS = {
    "ModelConfig": "qwen3.config", "TrainConfig": "qwen3.config", "preset": "qwen3.config",
    "UserError": "qwen3.errors",
    "Qwen3ForCausalLM": "qwen3.model.decoder",
    "load_model": "qwen3.model.checkpoint", "save_model": "qwen3.model.checkpoint",
    "Tokenizer": "qwen3.data.tokenizer", "load_tokenizer": "qwen3.data.tokenizer",
    "Muon": "qwen3.train.muon",
    "Engine": "qwen3.infer.engine", "load_engine": "qwen3.infer.engine",
    "SamplingParams": "qwen3.infer.sampling",
}
__all__ = ["__version__", *EXPORTS]


def __getattr__(name: str) -> Any:
    if name in EXPORTS:
        return getattr(importlib.import_module(EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen3' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
