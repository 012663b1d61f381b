"""The Stage interface: what one kind of training learns from and is scored on.

The loop (train/loop.py) is the same for every stage; a stage is what differs. It prepares its
data from the run's config (reads, tokenizes and splits it into training and held-out parts),
chooses the sequence length when the config leaves it open (seq_len 0: `longest_sequence` bounds
it) and says why, hands the loop an endless stream of micro-batches, scores a model on its held-out
part, names the prompts its samples continue (from the held-out part when it is the user's), and
describes itself for run.json, the plan and `qwen3 eval`.
A stage that learns from something other than next tokens also gives the loss (`objective`),
what a micro-batch's loss is summed over (`units`) and metrics of its own. Pretraining (text
windows, pretrain.py) and chat fine-tuning (conversations with a loss mask on the replies, sft.py),
reinforcement learning (rollouts scored by a reward, rl.py) and preference optimization (pairs,
dpo.py) implement it; the registry in __init__.py is the one place that knows them. The stages
that draw whole items (rows, prompts, pairs) shuffled anew each epoch draw them with `drawn`.
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from qwen3.config import SEQ_LEN_CAP, TrainConfig
from qwen3.data.tokenizer import Tokenizer
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.model.loss import IGNORE, CausalLMLoss
from qwen3.runtime import Distributed
from qwen3.train.parallel import BatchLayout


class BatchSource(Protocol):
    """What the loop draws micro-batches from: an endless stream of (x, y) CPU tensors of this
    process's rows, whose state resumes it exactly. Targets equal to -100 are not learned (the loss
    skips them, transformers' convention): a loss mask, e.g. over a conversation's prompts."""

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Score(Protocol):
    """What an evaluation hands back: the figure the best checkpoint minimizes, the metrics.jsonl
    fields, a log line and the lines `qwen3 eval` prints."""

    @property
    def loss(self) -> float: ...
    def metrics(self) -> dict[str, float]: ...
    def summary(self) -> str: ...
    def report(self) -> list[tuple[str, str]]: ...


class Stage(ABC):
    """A stage with its data prepared: made by `prepare`, then read by the loop. The defaults of the
    methods that are not abstract are next-token prediction's: pretraining and fine-tuning keep them."""

    name: ClassVar[str]   # TrainConfig.stage
    chat: ClassVar[bool]  # its sample prompts are user turns of the chat template, not text to continue
    tokenizer: Tokenizer  # what the data was tokenized with: the model's
    seq_len: int          # tokens a training sequence predicts: config.seq_len, or the stage's choice
    sequences_per_row: int = 1  # sequences a row of the batch layout holds (RL: a prompt's group)

    @classmethod
    @abstractmethod
    def prepare(cls, config: TrainConfig, tokenizer: str, context: int, progress: bool = False,
                training: bool = True) -> Stage:
        """The stage's training and held-out data from `config` (its data sources and split).
        `tokenizer` is a tokenizer.json or model folder, or "" to train one on the data; `context`
        the model's (max_position_embeddings), which bounds the sequence length the stage chooses
        when config.seq_len is 0; `progress` shows progress bars. `training` False prepares for
        scoring the held-out part alone (`qwen3 eval`), which then needs no whole training window."""

    @abstractmethod
    def batches(self, layout: BatchLayout, seed: int, processes: Distributed, model: Qwen3ForCausalLM,
                autocast: contextlib.AbstractContextManager) -> BatchSource:
        """This process's stream of training micro-batches (its rows of each global batch); `model`
        (the one being trained) and `autocast` for stages whose batches it computes (RL's rollouts)."""

    def objective(self, model: Qwen3ForCausalLM) -> nn.Module:
        """The model and its loss as one module: `module(*batch, divisor)` is a micro-batch's summed
        loss over `divisor`. Next-token cross-entropy on the targets that are not -100."""
        return CausalLMLoss(model)

    def units(self, batch: tuple[torch.Tensor, ...]) -> int:
        """What a micro-batch's loss is summed over (the loop divides by the step's total): its
        learned targets."""
        return int((batch[1] != IGNORE).sum())

    def metrics(self, processes: Distributed) -> dict[str, float]:
        """The stage's own metrics since the last log line (a collective under DDP): none here."""
        return {}

    @abstractmethod
    def evaluate(self, model: Qwen3ForCausalLM, batch_size: int, device: torch.device,
                 autocast: contextlib.AbstractContextManager, rank: int = 0, world_size: int = 1) -> Score:
        """The model's metrics on the whole held-out part, the same on every rank (a collective)."""

    @abstractmethod
    def sample_prompts(self) -> list[str]:
        """The prompts the run's samples continue when the config names none."""

    @property
    @abstractmethod
    def eval_tokens(self) -> int:
        """Tokens one evaluation passes through the model (for the run's time estimate)."""

    @property
    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """What run.json records of the data: sources, sizes, counts."""

    @property
    @abstractmethod
    def scored_on(self) -> str:
        """What `evaluate` scores, in words (`qwen3 eval` prints it)."""

    @property
    @abstractmethod
    def choices(self) -> list[str]:
        """What the stage chose from its data (the sequence length, the split), each in one line
        that says why: the run prints them with its plan."""


def longest_sequence(config: TrainConfig, context: int) -> tuple[int, str]:
    """The longest training sequence a stage chooses by itself, and why: the model's context, or
    SEQ_LEN_CAP for a run from a checkpoint whose context is longer (qwen3/config.py)."""
    if config.init_from and context > SEQ_LEN_CAP:
        return SEQ_LEN_CAP, f"the checkpoint's context of {context:,} capped at {SEQ_LEN_CAP:,}"
    return context, f"the model's context of {context:,}"


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The order in which epoch `epoch` of a run seeded `seed` draws its `count` items."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(count)


def drawn(seed: int, count: int, rows: int, step: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """(position, item) of the `rows` items that micro-batch `step` of process `rank` takes from
    `count` items shuffled anew each epoch: the global positions (step * world_size + rank) * rows
    onwards, position p being item epoch_order(p // count)[p % count]. The stream depends on the
    step alone, not on how many processes share it, so the step count resumes it."""
    first = (step * world_size + rank) * rows
    return [(position, int(epoch_order(seed, position // count, count)[position % count]))
            for position in range(first, first + rows)]
