"""One optimizer step's work on one process or many (torchrun + DistributedDataParallel): how the
global batch is shared, what each micro-batch's loss is divided by, and the step model that a
micro-step calls (the model and its loss, compiled where asked and wrapped in DDP).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qwen3.errors import UserError, log
from qwen3.runtime import Distributed


@dataclass(frozen=True)
class BatchLayout:
    """How one step's global batch (batch_size rows x grad_accum micro-batches) is shared: every
    process runs `micro_steps` micro-batches of `rows` rows, each `sequences_per_row` sequences (a
    prompt's group of completions in RL, else one) of up to `seq_len` tokens."""

    micro_steps: int
    rows: int
    seq_len: int
    world_size: int
    sequences_per_row: int = 1

    @property
    def tokens_per_step(self) -> int:
        """Training tokens of one optimizer step, all processes together (rows at their full length)."""
        return self.micro_steps * self.rows * self.world_size * self.sequences_per_row * self.seq_len


def batch_layout(batch_size: int, grad_accum: int, seq_len: int, world_size: int) -> BatchLayout:
    """Split the accumulation steps across processes as far as they divide, then the rows of each
    micro-batch: grad_accum 4 on 2 processes is 2 micro-batches each; batch_size 4, grad_accum 1 on
    2 processes is 2 rows each. The global batch, and so the result, does not change."""
    shared_steps = math.gcd(grad_accum, world_size)
    row_split = world_size // shared_steps
    if batch_size % row_split:
        raise UserError(
            f"{world_size} processes cannot share a global batch of batch_size {batch_size} x grad_accum "
            f"{grad_accum} equally: make batch_size or grad_accum a multiple of {world_size}")
    return BatchLayout(grad_accum // shared_steps, batch_size // row_split, seq_len, world_size)


def loss_divisor(units: list[int], processes: Distributed) -> torch.Tensor:
    """What each micro-batch's summed loss is divided by so that one step learns from every unit of
    its global batch equally (a target, a completion token, a pair: `units` counts each of this
    process's micro-batches'), whichever micro-batch and process holds it: the step's count over all
    micro-batches and processes (a collective under DDP), over the number of processes, because DDP
    averages their gradients. A mean per micro-batch instead would weigh a token of a batch with few
    reply tokens more than one of a batch with many. Without a loss mask every batch counts the
    same and this is the mean per micro-batch over the micro-steps."""
    count = torch.tensor(float(sum(units)), device=processes.device)
    if processes.world_size > 1:
        dist.all_reduce(count)
    return count.clamp_min(1) / processes.world_size  # no targets at all: loss 0, never 0/0


class CompiledOrEager(nn.Module):
    """`module` through torch.compile; when compiling fails, the log says why and the module runs
    eagerly from then on (an error of the module itself is then raised by the eager call)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.compiled: Callable[..., Any] | None = torch.compile(module.forward)  # not a second submodule

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as error:  # compilers raise many types
                reason = (str(error).strip().splitlines() or [""])[0][:200]
                log(f"torch.compile failed ({type(error).__name__}: {reason}); continuing without compilation")
                self.compiled = None
        return self.module(*args)


def wrap_step_model(step_model: nn.Module, compile_model: bool, processes: Distributed) -> nn.Module:
    """Model + loss, compiled (eager where compiling fails, said in the log) and in DDP as asked."""
    if compile_model:
        step_model = CompiledOrEager(step_model)
    if processes.world_size > 1:
        # The buffers (RoPE tables) are equal everywhere by construction: no broadcast each step.
        step_model = nn.parallel.DistributedDataParallel(
            step_model, device_ids=[processes.device.index] if processes.device.type == "cuda" else None,
            gradient_as_bucket_view=True, broadcast_buffers=False)
    return step_model
