"""The training loop's pieces that hold no run state: the schedule, the FLOP count, the loss module,
how the global batch is shared across processes, the counters between log lines, compilation, and
the two seams of the loop: where the model comes from (`ModelSource`) and what it learns from
(`DataStage`: pretraining's text windows, or chat fine-tuning's conversations in qwen3/train/stages/sft.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from qwen3.model.checkpoint import CheckpointError, find_checkpoint, load_config, load_model
from qwen3.config import ModelConfig, TrainConfig, refuse_model_changes
from qwen3.data.store import PreparedData, prepare
from qwen3.data.windows import RandomWindows
from qwen3.errors import UserError
from qwen3.train.evaluate import EvalResult, evaluate
from qwen3.model.loss import IGNORE, linear_cross_entropy
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.runtime import Distributed
from qwen3.data.tokenizer import Tokenizer


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The multiplier of every peak learning rate at optimizer step `step` (1-based).

    Linear warmup reaching 1 at step `warmup_steps`, then half a cosine from 1 down to
    `min_lr_ratio` at `max_steps`: f = r + (1 - r) * (1 + cos(pi * progress)) / 2.
    """
    if step <= warmup_steps:
        return step / warmup_steps
    if max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# Muon's momentum under `muon_momentum_warmup`: from this value at step 1 up to Muon's own (0.95).
MUON_MOMENTUM_START = 0.85


def apply_schedule(optimizers: list[torch.optim.Optimizer], step: int, config: TrainConfig) -> None:
    """Set every group's learning rate for optimizer step `step` (1-based) and, with a momentum
    warmup, Muon's momentum: linear from MUON_MOMENTUM_START to its peak over the warmup's steps."""
    factor = lr_factor(step, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    rise = min(1.0, (step - 1) / config.muon_momentum_warmup) if config.muon_momentum_warmup else 1.0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
            if "initial_momentum" in group:
                peak = group["initial_momentum"]
                group["momentum"] = MUON_MOMENTUM_START + (peak - MUON_MOMENTUM_START) * rise


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight of every matmul (2 forward, 4 backward), plus the
    attention scores and weighted sums, 12 * layers * heads * head_dim * seq_len (PaLM, appendix B;
    the causal mask's halving is not discounted). The embedding lookup is free; the LM head is not."""
    c, d = config.hidden_size, config.head_dim
    attention = c * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)  # q, o, k, v
    mlp = 3 * c * config.intermediate_size  # gate, up, down
    matmul_weights = config.num_hidden_layers * (attention + mlp) + config.vocab_size * c  # + LM head
    return 6.0 * matmul_weights + 12.0 * config.num_hidden_layers * config.num_attention_heads * d * seq_len


class CausalLMLoss(nn.Module):
    """The model plus its mean next-token cross-entropy: one module, so DDP and torch.compile see
    the whole forward pass. The loss is taken in float32 a slice of rows at a time (qwen3/model/loss.py),
    so the full logits never exist. Targets of -100 are left out of the mean: that is the loss mask.
    With `divisor` the summed loss is divided by it instead of by this batch's count (`loss_divisor`)."""

    def __init__(self, model: Qwen3ForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, divisor: torch.Tensor | None = None) -> torch.Tensor:
        return linear_cross_entropy(self.model.model(x), self.model.lm_head.weight, y, divisor)


def loss_divisor(micro_batches: list[tuple[torch.Tensor, torch.Tensor]], processes: Distributed) -> torch.Tensor:
    """What each micro-batch's summed loss is divided by so that one step learns from every target
    of its global batch equally, whichever micro-batch and process holds it: the step's count of
    targets over all micro-batches and processes (a collective under DDP), over the number of
    processes, because DDP averages their gradients. A mean per micro-batch instead would weigh a
    token of a batch with few reply tokens more than one of a batch with many. Without a loss mask
    every batch counts the same and this is the mean per micro-batch over the micro-steps."""
    count = torch.tensor(float(sum(int((y != IGNORE).sum()) for _, y in micro_batches)), device=processes.device)
    if processes.world_size > 1:
        dist.all_reduce(count)
    return count.clamp_min(1) / processes.world_size  # no targets at all: loss 0, never 0/0


@dataclass(frozen=True)
class BatchLayout:
    """How one step's global batch (batch_size windows x grad_accum micro-batches) is shared: every
    process runs `micro_steps` micro-batches of `rows` windows of `seq_len` tokens."""

    micro_steps: int
    rows: int
    seq_len: int
    world_size: int

    @property
    def tokens_per_step(self) -> int:
        """Training tokens of one optimizer step, all processes together."""
        return self.micro_steps * self.rows * self.world_size * self.seq_len


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


@dataclass
class Pending:
    """Sums since the last log line. The tensors stay on the device: a step never waits on them."""

    loss_sum: torch.Tensor
    grad_norm_sum: torch.Tensor
    steps: int = 0
    seconds: float = 0.0  # training time (evaluation and saving excluded) of those steps

    @classmethod
    def zeros(cls, device: torch.device) -> Pending:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device))

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self.steps, self.seconds = 0, 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.item(), "grad_norm_sum": self.grad_norm_sum.item(),
                "steps": self.steps, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum.fill_(state["loss_sum"])
        self.grad_norm_sum.fill_(state["grad_norm_sum"])
        self.steps, self.seconds = state["steps"], state["seconds"]


class CompiledOrEager(nn.Module):
    """`module` through torch.compile; when compiling fails, the log says why and the module runs
    eagerly from then on (an error of the module itself is then raised by the eager call)."""

    def __init__(self, module: nn.Module, log: Callable[[str], None]) -> None:
        super().__init__()
        self.module = module
        self.compiled: Callable[..., Any] | None = torch.compile(module.forward)  # not a second submodule
        self.log = log

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as error:  # compilers raise many types
                reason = (str(error).strip().splitlines() or [""])[0][:200]
                self.log(f"torch.compile failed ({type(error).__name__}: {reason}); "
                         f"continuing without compilation")
                self.compiled = None
        return self.module(*args)


class BatchSource(Protocol):
    """What the loop draws micro-batches from: an endless stream of (x, y) CPU tensors of this
    process's rows, whose state resumes it exactly. Targets equal to -100 are not learned (the loss
    skips them, transformers' convention): a loss mask, e.g. over a conversation's prompts."""

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


BatchFactory = Callable[[Any, BatchLayout, int, Distributed], BatchSource]


@dataclass(frozen=True)
class DataStage:
    """What a stage of training reads, draws its micro-batches from and is scored on.

    prepare(config, tokenizer, seq_len, progress, log) -> data: the training and held-out data
    (`tokenizer`: what to tokenize with, a path, or "" to train one; `data.tokenizer`,
    `data.summary` and `data.eval_tokens` are what the loop reads of it);
    batches(data, layout, seed, processes) -> this process's BatchSource;
    evaluate(model, data, seq_len, batch_size, device, autocast, rank, world_size) -> the held-out
    metrics, the same on every rank."""

    prepare: Callable[[TrainConfig, str, int, bool, Callable[[str], None]], Any]
    batches: BatchFactory
    evaluate: Callable[[Qwen3ForCausalLM, Any, int, int, torch.device, contextlib.AbstractContextManager,
                        int, int], EvalResult]


def prepare_text(config: TrainConfig, tokenizer: str, seq_len: int, progress: bool,
                 log: Callable[[str], None]) -> PreparedData:
    """Pretraining data: the token store of the text sources, split by document."""
    return prepare(config.data, tokenizer=tokenizer, vocab_size=config.tokenizer_vocab_size,
                   val_fraction=config.val_fraction, cache_dir=config.cache_dir, min_tokens=seq_len + 1,
                   progress=progress, log=log)


def random_windows(data: PreparedData, layout: BatchLayout, seed: int, processes: Distributed) -> BatchSource:
    """Pretraining batches: random windows of the training split, each rank its rows of the global batch."""
    return RandomWindows(data.train_tokens, layout.seq_len, layout.rows, seed, processes.rank,
                         processes.world_size)


def evaluate_text(model: Qwen3ForCausalLM, data: PreparedData, seq_len: int, batch_size: int,
                  device: torch.device, autocast: contextlib.AbstractContextManager, rank: int,
                  world_size: int) -> EvalResult:
    """Every token of the validation split, once."""
    return evaluate(model, data.val_tokens, seq_len, batch_size, data.val_bytes, device, autocast,
                    rank, world_size)


PRETRAINING = DataStage(prepare_text, random_windows, evaluate_text)


def data_stage(name: str) -> DataStage:
    """The DataStage of TrainConfig.stage."""
    if name == "sft":
        from qwen3.train.stages.sft import CHAT_FINE_TUNING  # imports this module

        return CHAT_FINE_TUNING
    return PRETRAINING


@dataclass(frozen=True)
class ModelSource:
    """Where the run's model comes from: a fresh initialization (the shape of the config, the
    vocabulary of the tokenizer), or the weights and tokenizer of a checkpoint folder."""

    checkpoint: Path | None = None

    def tokenizer(self, config: TrainConfig) -> str:
        """What tokenizes the data: a checkpoint's own tokenizer, so the token ids match its model."""
        return str(self.checkpoint) if self.checkpoint else config.tokenizer

    def build(self, model_config: ModelConfig, tokenizer: Tokenizer, device: torch.device) -> Qwen3ForCausalLM:
        if self.checkpoint is not None:
            model = load_model(self.checkpoint, device=device).train()
            refuse_model_changes(model.config, model_config, f"{self.checkpoint} holds another model")
        else:
            model = Qwen3ForCausalLM(replace(
                model_config, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)).to(device)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                            f"{model.config.vocab_size}")
        return model


def init_checkpoint(path: str | Path) -> tuple[Path, ModelConfig]:
    """The checkpoint folder `--init-from path` starts from (a run folder means its best/) and its
    model's shape; a folder that is not a Qwen3 checkpoint with a tokenizer is a UserError."""
    try:
        folder = find_checkpoint(path)
        model_config = load_config(folder)
    except CheckpointError as error:
        raise UserError(f"--init-from {path}: not a Qwen3 checkpoint: {error}") from None
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"--init-from {path}: {folder} has no tokenizer.json; a run starts from a "
                        f"checkpoint's weights and its tokenizer")
    return folder, model_config
