"""The state of a training run in one object: what the loop's set-up builds, a step advances, and
`last/` saves (trainer_state.pt) so that `--resume` continues exactly where it stopped.

    TrainState   the config, the processes, the stage (data), the model, its optimizers and their
                 scaler, the micro-batch stream, the counters since the last log line, the files
    Pending      the sums since the last log line, kept on the device
    TrainResult  what a finished (or interrupted) run hands back
"""

from __future__ import annotations

import dataclasses
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qwen3 import __version__
from qwen3.config import TrainConfig
from qwen3.errors import UserError
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.model.lora import adapter_state_dict, load_adapter_state
from qwen3.runtime import Distributed, device_name, rng_state, set_rng_state
from qwen3.train.parallel import BatchLayout
from qwen3.train.runfiles import RunFiles
from qwen3.train.stages import BatchSource, Score, Stage


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


@dataclass
class TrainResult:
    """What a finished (or interrupted) run hands back."""

    out_dir: Path
    step: int                  # optimizer steps completed
    tokens: int                # training tokens consumed
    elapsed_s: float           # wall-clock of the whole run, resumed parts included
    interrupted: bool          # stopped by Ctrl-C or `should_stop` before max_steps
    best_val_loss: float      # the best evaluation's loss (Score.loss: lower is better)
    best_summary: str         # and its summary line
    final_eval: Score | None   # the evaluation at the last step (None when interrupted)


@dataclass
class TrainState:
    """Everything a run is: what the set-up builds, a step advances and last/ saves."""

    config: TrainConfig
    processes: Distributed
    autocast_dtype: torch.dtype
    layout: BatchLayout
    stage: Stage                   # what the run learns from and is evaluated on, its data prepared
    model: Qwen3ForCausalLM
    step_model: nn.Module          # model + loss, compiled and/or wrapped in DDP: what a micro-step calls
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    batches: BatchSource
    pending: Pending               # sums since the last log line, on the device
    files: RunFiles
    peak_flops: float              # one device's
    flops_per_token: float         # training FLOPs of one token at this model and seq_len
    params: list[nn.Parameter] = field(default_factory=list)  # the trainable ones: clipped together
    step: int = 0
    best_val_loss: float = math.inf
    best_summary: str = ""         # the best evaluation's summary line
    elapsed_before: float = 0.0    # wall-clock of the earlier parts of a resumed run
    started: float = field(default_factory=time.perf_counter)

    @property
    def out(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def device(self) -> torch.device:
        return self.processes.device

    @property
    def lr(self) -> float:
        """The learning rate of the first group now (the schedule scales every group alike)."""
        return self.optimizers[0].param_groups[0]["lr"]

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def write_event(self, values: dict[str, Any]) -> None:
        self.files.write_event({"step": self.step, "tokens": self.step * self.layout.tokens_per_step,
                                **values, "elapsed_s": round(self.elapsed(), 3)})

    def result(self, interrupted: bool, final: Score | None) -> TrainResult:
        return TrainResult(self.out, self.step, self.step * self.layout.tokens_per_step, self.elapsed(),
                           interrupted, self.best_val_loss, self.best_summary, final)

    def state_dict(self, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        """trainer_state.pt: everything but the weights that a resume needs; `ranks` holds each
        process's RNG states and window stream position."""
        trainer_state = {
            "step": self.step,
            "model_config": dataclasses.asdict(self.model.config),
            "train_config": dataclasses.asdict(self.config),
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "scaler": self.scaler.state_dict(),
            "best_val_loss": self.best_val_loss,
            "best_summary": self.best_summary,
            "elapsed_s": self.elapsed(),
            "pending": self.pending.state_dict(),
            "ranks": ranks,
        }
        if self.config.lora_rank:
            trainer_state["adapter"] = adapter_state_dict(self.model)
        return trainer_state

    def rank_state(self) -> dict[str, Any]:
        """This process's part of `state_dict`'s ranks: its RNG states and window stream position."""
        return {"rng": rng_state(self.device), "windows": self.batches.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Continue exactly where last/ stopped: optimizers, scaler, step, counters, data position,
        RNG (and a LoRA run's adapters); a config change a resume cannot make is a UserError."""
        saved_optimizer = saved["train_config"]["optimizer"]
        if saved_optimizer != self.config.optimizer:
            raise UserError(f"the run was trained with optimizer {saved_optimizer!r}; it cannot "
                            f"change to {self.config.optimizer!r} when resuming")
        if bool(saved["train_config"].get("embedding_lr")) != bool(self.config.embedding_lr):
            raise UserError("embedding_lr gives the embedding an optimizer group of its own: it cannot be turned "
                            "on or off when resuming (its value may change)")
        for optimizer, saved_optimizer_state in zip(self.optimizers, saved["optimizers"]):
            peaks = [{key: group[key] for key in ("initial_lr", "initial_momentum") if key in group}
                     for group in optimizer.param_groups]
            optimizer.load_state_dict(saved_optimizer_state)
            for group, peak in zip(optimizer.param_groups, peaks):  # the current config's peaks
                group.update(peak)
        self.scaler.load_state_dict(saved["scaler"])
        self.step = saved["step"]
        self.best_val_loss = saved["best_val_loss"]
        self.best_summary = saved.get("best_summary", "")  # absent from runs saved before it was kept
        self.elapsed_before = saved["elapsed_s"]
        self.pending.load_state_dict(saved["pending"])
        ranks = saved["ranks"]
        mine = ranks[self.processes.rank] if self.processes.rank < len(ranks) else ranks[0]
        # The window stream is the same on every rank (each takes its rows of the global batch).
        self.batches.load_state_dict(mine["windows"])
        if self.config.lora_rank:
            load_adapter_state(self.model, saved["adapter"])
        set_rng_state(mine["rng"], self.device)

    def describe(self) -> dict[str, Any]:
        """run.json: the resolved configuration and the environment."""
        device = self.device
        return {
            "model": dataclasses.asdict(self.model.config),
            "train": dataclasses.asdict(self.config),
            "parameters": self.model.num_parameters(),
            "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak_flops,
            "device": {"type": device.type, "name": device_name(device), "threads": torch.get_num_threads(),
                       "world_size": self.processes.world_size},
            "autocast_dtype": str(self.autocast_dtype).removeprefix("torch."),
            "seq_len": self.layout.seq_len,
            "tokens_per_step": self.layout.tokens_per_step,
            "micro_batch": {"rows_per_process": self.layout.rows, "micro_steps": self.layout.micro_steps},
            "data": self.stage.summary,
            "versions": {"qwen3": __version__, "torch": torch.__version__,
                         "numpy": np.__version__, "python": platform.python_version()},
        }
