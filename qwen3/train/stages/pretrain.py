"""Pretraining: the next token of text, learned from random windows of the token store.

The data is the token store of the run's text sources (data/store.py: a tokenizer, trained on
them when the run names none, and the split by document); the loop draws random windows of the
training split (data/windows.py), every rank its rows of each global batch; evaluation scores every
token of the validation split once (train/metrics.py).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from qwen3.config import TrainConfig
from qwen3.data.kjv import OPENINGS
from qwen3.data.store import PreparedData, prepare
from qwen3.data.windows import RandomWindows
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.runtime import Distributed
from qwen3.train.metrics import EvalResult, score_tokens
from qwen3.train.parallel import BatchLayout
from qwen3.train.stages.base import Stage


class Pretraining(Stage):
    name = "pretrain"
    chat = False

    def __init__(self, data: PreparedData, seq_len: int) -> None:
        self.data = data
        self.tokenizer = data.tokenizer
        self.seq_len = seq_len

    @classmethod
    def prepare(cls, config: TrainConfig, tokenizer: str, seq_len: int, progress: bool = False,
                training: bool = True) -> Pretraining:
        """The token store of the text sources, split by document; for training each split holds
        at least one window of seq_len + 1 tokens, for scoring the validation split one target."""
        data = prepare(config.data, tokenizer=tokenizer, vocab_size=config.tokenizer_vocab_size,
                       val_fraction=config.val_fraction, cache_dir=config.cache_dir,
                       min_tokens=seq_len + 1 if training else 2, progress=progress)
        return cls(data, seq_len)

    def batches(self, layout: BatchLayout, seed: int, processes: Distributed) -> RandomWindows:
        return RandomWindows(self.data.train_tokens, layout.seq_len, layout.rows, seed, processes.rank,
                             processes.world_size)

    def evaluate(self, model: Qwen3ForCausalLM, batch_size: int, device: torch.device,
                 autocast: contextlib.AbstractContextManager, rank: int = 0, world_size: int = 1) -> EvalResult:
        """Every token of the validation split, once."""
        return score_tokens(model, self.data.val_tokens, self.seq_len, batch_size, self.data.val_bytes, device,
                            autocast, rank, world_size)

    def sample_prompts(self) -> list[str]:
        return list(OPENINGS)

    @property
    def eval_tokens(self) -> int:
        return self.data.eval_tokens

    @property
    def summary(self) -> dict[str, Any]:
        return self.data.summary

    @property
    def scored_on(self) -> str:
        return f"validation split, windows of {self.seq_len}"
