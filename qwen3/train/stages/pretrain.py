"""Pretraining: the next token of text, learned from random windows of the token store.

The data is the token store of the run's text sources (data/store.py: a tokenizer, trained on
them when the run names none, and the leak-free split of data/split.py); the loop draws random
windows of the training split (data/windows.py), every rank its rows of each global batch;
evaluation scores every token of the validation split once (train/metrics.py).

The window is config.seq_len, else the model's context (capped for a run from a long-context
checkpoint: `longest_sequence`), shortened to a multiple of SEQ_LEN_MULTIPLE when a split of a
small corpus holds less, so that one text file trains as it is. The samples continue openings of
held-out documents, or the embedded corpus's fixed openings when that is what the run reads.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from qwen3.config import SEQ_LEN_MULTIPLE, TrainConfig
from qwen3.data.kjv import OPENINGS
from qwen3.data.sources import BUILTIN_KJV
from qwen3.data.store import PreparedData, prepare
from qwen3.data.windows import RandomWindows
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.runtime import Distributed
from qwen3.train.metrics import EvalResult, score_tokens
from qwen3.train.parallel import BatchLayout
from qwen3.train.samples import SAMPLE_PROMPTS, openings
from qwen3.train.stages.base import Stage, longest_sequence

OPENING_TOKENS = 256  # of a held-out document, decoded for its sample prompts


class Pretraining(Stage):
    name = "pretrain"
    chat = False

    def __init__(self, data: PreparedData, seq_len: int, window: str) -> None:
        self.data = data
        self.tokenizer = data.tokenizer
        self.seq_len = seq_len
        self.window = window  # the window length and why

    @classmethod
    def prepare(cls, config: TrainConfig, tokenizer: str, context: int, progress: bool = False,
                training: bool = True) -> Pretraining:
        """The token store of the text sources, split leak-free; for training each split holds at
        least one window of seq_len + 1 tokens, for scoring the validation split one target."""
        longest, why = (config.seq_len, "seq_len as set") if config.seq_len else longest_sequence(config, context)
        fitted = training and not config.seq_len  # a chosen window may shorten to what the data holds
        shortest_window = min(longest, SEQ_LEN_MULTIPLE) if fitted else longest
        data = prepare(config.data, tokenizer=tokenizer, vocab_size=config.tokenizer_vocab_size,
                       val_fraction=config.val_fraction, cache_dir=config.cache_dir,
                       min_tokens=shortest_window + 1 if training else 2, progress=progress)
        held = min(len(data.train_tokens), len(data.val_tokens))
        if fitted and held <= longest:
            shortened = (held - 1) // SEQ_LEN_MULTIPLE * SEQ_LEN_MULTIPLE
            why = (f"the longest multiple of {SEQ_LEN_MULTIPLE} that a window of both splits fits in (the shorter "
                   f"holds {held:,} tokens; {why})")
            longest = shortened
        return cls(data, longest, f"windows of {longest:,} tokens: {why}")

    def batches(self, layout: BatchLayout, seed: int, processes: Distributed, model: Qwen3ForCausalLM,
                autocast: contextlib.AbstractContextManager) -> RandomWindows:
        return RandomWindows(self.data.train_tokens, layout.seq_len, layout.rows, seed, processes.rank,
                             processes.world_size)

    def evaluate(self, model: Qwen3ForCausalLM, batch_size: int, device: torch.device,
                 autocast: contextlib.AbstractContextManager, rank: int = 0, world_size: int = 1) -> EvalResult:
        """Every token of the validation split, once."""
        return score_tokens(model, self.data.val_tokens, self.seq_len, batch_size, self.data.val_bytes, device,
                            autocast, rank, world_size)

    def sample_prompts(self) -> list[str]:
        """The embedded corpus's openings when the run reads it alone, else openings of the first
        held-out documents."""
        if all(source == BUILTIN_KJV for source in self.data.sources):
            return list(OPENINGS)
        tokens = self.data.val_tokens
        ends = np.flatnonzero(np.asarray(tokens) == self.tokenizer.eos_token_id)[:SAMPLE_PROMPTS]
        starts = [0, *(ends[:-1] + 1)]
        return openings([self.tokenizer.decode(np.asarray(tokens[start:min(end, start + OPENING_TOKENS)]).tolist())
                         for start, end in zip(starts, ends)])

    @property
    def eval_tokens(self) -> int:
        return self.data.eval_tokens

    @property
    def summary(self) -> dict[str, Any]:
        return {**self.data.summary, "choices": self.choices}

    @property
    def scored_on(self) -> str:
        return f"validation split, windows of {self.seq_len}"

    @property
    def choices(self) -> list[str]:
        return [self.window, self.data.split]
