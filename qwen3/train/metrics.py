"""The held-out metrics: loss, token accuracy, perplexity, bits per byte.

The seed scored a few overlapping windows drawn from the training stream. Here every held-out
target is scored exactly once: every token of a validation split as a target of the
non-overlapping windows of `eval_windows` (`score_tokens`), or every learned token of packed
conversations (`score_packed`), so two evaluations of the same checkpoint agree and runs can be
compared. Bits per byte divides the total loss by the UTF-8 size of the scored text instead of the
number of tokens, which makes models with different tokenizers comparable. The stages score their
held-out data with these (train/stages/); `qwen3 eval` goes through the stages (train/evaluate.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from qwen3.data.conversations import Packed
from qwen3.data.windows import eval_windows
from qwen3.errors import UserError
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.model.loss import loss_and_hits


@dataclass
class EvalResult:
    loss: float           # mean cross-entropy over the scored targets, nats per token
    accuracy: float       # fraction of targets that were the model's top prediction
    perplexity: float     # exp(loss): the effective number of equally likely next tokens
    bits_per_byte: float  # total loss in bits / UTF-8 bytes of the split
    tokens: int           # targets scored

    def metrics(self) -> dict[str, float]:
        """The metrics.jsonl fields of an evaluation."""
        return {"val_loss": self.loss, "val_acc": self.accuracy, "val_ppl": self.perplexity,
                "val_bpb": self.bits_per_byte}

    def summary(self) -> str:
        return (f"loss {self.loss:.4f} | accuracy {self.accuracy:.2%} | perplexity {self.perplexity:.2f}"
                f" | bits/byte {self.bits_per_byte:.4f} | {self.tokens:,} tokens")

    def report(self) -> list[tuple[str, str]]:
        """The lines `qwen3 eval` prints."""
        return [("loss", f"{self.loss:.4f} nats/token"), ("accuracy", f"{self.accuracy:.2%}"),
                ("perplexity", f"{self.perplexity:.2f}"), ("bits/byte", f"{self.bits_per_byte:.4f}"),
                ("tokens", f"{self.tokens:,}")]


def score_tokens(model: Qwen3ForCausalLM, tokens: np.ndarray, seq_len: int, batch_size: int, num_bytes: int,
                 device: torch.device | str = "cpu", autocast: contextlib.AbstractContextManager | None = None,
                 rank: int = 0, world_size: int = 1) -> EvalResult:
    """Score every token of `tokens` (a validation split of `num_bytes` UTF-8 bytes of text) but the
    first, in windows of `seq_len`."""
    result = score_batches(model, eval_windows(tokens, seq_len, batch_size), num_bytes, device, autocast,
                           rank, world_size)
    if result is None:
        raise UserError(f"the validation split has {len(tokens)} token(s): nothing to evaluate")
    return result


def score_packed(model: Qwen3ForCausalLM, packed: Packed, batch_size: int, device: torch.device | str = "cpu",
                 autocast: contextlib.AbstractContextManager | None = None, rank: int = 0,
                 world_size: int = 1) -> EvalResult:
    """Score the learned tokens of packed conversations, `batch_size` rows at a time."""
    x = torch.from_numpy(packed.rows[:, :-1].copy())
    y = torch.from_numpy(packed.targets())
    batches = ((x[start:start + batch_size], y[start:start + batch_size]) for start in range(0, len(x), batch_size))
    result = score_batches(model, batches, packed.reply_bytes, device, autocast, rank, world_size)
    if result is None:
        raise UserError("no conversation to score: every one is longer than a row")
    return result


@torch.no_grad()
def score_batches(model: Qwen3ForCausalLM, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_bytes: int,
                  device: torch.device | str = "cpu",
                  autocast: contextlib.AbstractContextManager | None = None,
                  rank: int = 0, world_size: int = 1) -> EvalResult | None:
    """The metrics of `model`'s body (`model.model`: ids -> hidden states) and head
    (`model.lm_head.weight`) over (x, y) batches whose targets of -100 are not scored (None when no
    target is); `num_bytes` is the UTF-8 size of the scored text. With several processes, rank r
    scores batches r, r + world_size, ... and the sums are all-reduced, so every rank returns the
    same result."""
    was_training = model.training
    model.eval()
    # Running sums on the device (nats, correct predictions, targets): no host sync per batch.
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for index, (x, y) in enumerate(batches):
        if index % world_size != rank:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast or contextlib.nullcontext():  # the head and loss a slice of rows at a time
            nats, hits, count = loss_and_hits(model.model(x), model.lm_head.weight, y)
        totals += torch.stack([nats, hits.double(), count.double()])
    model.train(was_training)
    if world_size > 1:
        dist.all_reduce(totals)
    nats, correct, count = totals.tolist()
    if count == 0:
        return None
    loss = nats / count
    # Each target token stands for its share of the split's bytes, so total bits / total bytes
    # = loss_per_token * tokens / (bytes * ln 2).
    bits_per_byte = nats / (num_bytes * math.log(2)) if num_bytes > 0 else math.nan
    perplexity = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709
    return EvalResult(loss, correct / count, perplexity, bits_per_byte, int(count))
