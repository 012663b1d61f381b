"""Windows of the token store: what training and evaluation feed the model.

Training draws `RandomWindows`: batches at uniform random offsets, seeded and resumable, split
across DDP ranks by rows of one global batch. Evaluation walks `eval_windows`: consecutive windows
that make every validation token but the first a target exactly once, so two evaluations of one
checkpoint agree. Either gives (x, y) LongTensor pairs with y the tokens of x shifted by one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from qwen3.errors import UserError


class RandomWindows:
    """An endless, seeded stream of (x, y) batches at random offsets; y is x shifted by one token.

    Every step draws `batch_size * world_size` offsets from one generator seeded with `seed`, and
    rank r takes rows [r * batch_size, (r + 1) * batch_size): the ranks see disjoint rows of the
    same global batch, and the global stream does not depend on how it is split across ranks.
    `state_dict` / `load_state_dict` resume the stream exactly.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if len(tokens) < seq_len + 1:
            raise UserError(f"{len(tokens)} tokens are fewer than one window of {seq_len + 1}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.generator = np.random.Generator(np.random.PCG64(seed))
        self.steps = 0

    def __iter__(self) -> RandomWindows:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Offsets up to len - seq_len - 1, so the shifted target of the last position exists.
        offsets = self.generator.integers(0, len(self.tokens) - self.seq_len,
                                          size=self.batch_size * self.world_size)
        mine = offsets[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        self.steps += 1
        return _windows_at(self.tokens, mine, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "steps": self.steps, "generator": self.generator.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self.steps = state["steps"]
        self.generator.bit_generator.state = state["generator"]


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows from the start, batched: every token but the first is a
    target exactly once. The last, shorter window (if any) comes alone as its own batch."""
    targets = len(tokens) - 1
    full = max(targets, 0) // seq_len
    for first in range(0, full, batch_size):
        offsets = np.arange(first, min(first + batch_size, full)) * seq_len
        yield _windows_at(tokens, offsets, seq_len)
    rest = targets - full * seq_len
    if rest > 0:
        yield _windows_at(tokens, np.array([full * seq_len]), rest)


def _windows_at(tokens: np.ndarray, offsets: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs tokens[o : o + length] and targets tokens[o + 1 : o + length + 1] for each offset."""
    rows = np.stack([np.asarray(tokens[offset:offset + length + 1], dtype=np.int64) for offset in offsets])
    windows = torch.from_numpy(rows)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
