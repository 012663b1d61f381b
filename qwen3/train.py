"""The training loop, in one process or many (torchrun + DistributedDataParallel).

The seed called 250 optimizer steps "500 steps", validated on windows that overlapped its training
data and kept only a pickled final model. Here:

* a step is one optimizer step over `batch_size * grad_accum` windows (the global batch, however many
  processes share it); the learning rate warms up linearly, then follows a cosine to a floor;
* mixed precision is autocast (bfloat16 where the device multiplies it natively, float16 with a
  gradient scaler on older GPUs, float32 otherwise) over float32 master weights;
* evaluation scores the whole validation split every `eval_interval` steps and at the last step;
  `OUT/best/` keeps the best checkpoint, `OUT/last/` the latest with everything a resume needs
  (optimizers, step, RNG states, data position), both written atomically;
* `OUT/metrics.jsonl`, `OUT/run.json` and `OUT/loss.png` record the run; a progress bar shows it;
* Ctrl-C saves `last/` and stops; a non-finite loss stops the run without saving over `last/`.

The hot path reads nothing back from the device except at log steps, and glibc's allocator is told
to keep freed memory (`tune_malloc`), which removes most of the page faults of a CPU step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import qwen3
from qwen3.checkpoint import (TRAINER_STATE_NAME, last_checkpoint, load_model, load_trainer_state,
                              remove_checkpoint, resume_state, save_model)
from qwen3.config import ModelConfig, TrainConfig, apply_overrides
from qwen3.store import PreparedData, prepare
from qwen3.errors import UserError
from qwen3.evaluate import EvalResult, evaluate
from qwen3.model import Qwen3ForCausalLM
from qwen3.muon import build_optimizers
from qwen3.runtime import (cpu_name, graceful_stop, peak_flops, resolve_device, resolve_dtype, rng_state,
                           seed_everything, set_rng_state, tune_malloc)
from qwen3.windows import RandomWindows

class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run stopped without saving over its last checkpoint."""


@dataclass
class RunResult:
    """What a finished (or interrupted) run hands back."""

    out_dir: Path
    step: int                  # optimizer steps completed
    tokens: int                # training tokens consumed
    elapsed_s: float           # wall-clock of the whole run, resumed parts included
    interrupted: bool          # stopped by Ctrl-C or `should_stop` before max_steps
    best_val_loss: float
    final_eval: EvalResult | None  # the evaluation at the last step (None when interrupted)


# --------------------------------------------------------------------------------------------
# Pieces with no state of their own


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
    the whole forward pass (the loss is taken in float32 whatever the autocast dtype)."""

    def __init__(self, model: Qwen3ForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def plot_losses(metrics_file: Path, image: Path) -> None:
    """Training and validation loss against the optimizer step, from metrics.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line]
    train = [(e["step"], e["loss"]) for e in events if "loss" in e]
    val = [(e["step"], e["val_loss"]) for e in events if "val_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="training (mean since the previous log step)", color="tab:blue")
    if val:
        ax.plot(*zip(*val), "o-", label="validation (whole split)", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.set_title(f"{metrics_file.parent.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    temporary = image.with_name(f".{image.name}.tmp.png")
    fig.savefig(temporary)
    plt.close(fig)
    temporary.replace(image)


# --------------------------------------------------------------------------------------------
# Configuration of a resumed run


def resume_configs(run_dir: str | Path, overrides: dict[str, Any] | None = None
                   ) -> tuple[ModelConfig, TrainConfig]:
    """The configs saved in `run_dir/last`, with `overrides` applied (e.g. a larger max_steps).

    The model's shape cannot change; the output folder is `run_dir` whatever the saved one was.
    """
    state = resume_state(run_dir, mmap=True)
    saved_model = ModelConfig(**state["model_config"])
    saved_train = TrainConfig(**state["train_config"])
    model_config, train_config = apply_overrides(saved_model, saved_train, dict(overrides or {}))
    if model_config != saved_model:
        changed = [f.name for f in dataclasses.fields(ModelConfig)
                   if getattr(model_config, f.name) != getattr(saved_model, f.name)]
        raise UserError(f"the model's shape cannot change when resuming (changed: {', '.join(changed)})")
    return model_config, dataclasses.replace(train_config, out_dir=str(run_dir))


def unfinished_run(out_dir: Path) -> tuple[int, int] | None:
    """(step, max_steps) of the run in `out_dir` when it stopped before its last step, else None."""
    last = last_checkpoint(out_dir)
    if last is None or not (last / TRAINER_STATE_NAME).is_file():
        return None
    state = load_trainer_state(last, mmap=True)
    step, max_steps = state["step"], state["train_config"]["max_steps"]
    return (step, max_steps) if step < max_steps else None


# --------------------------------------------------------------------------------------------
# The run


class Trainer:
    """One training run: set up by the constructor, carried out by `run()`."""

    def __init__(self, model_config: ModelConfig, config: TrainConfig, resume: bool = False,
                 should_stop: Callable[[int], bool] | None = None) -> None:
        self.config = config
        self.should_stop = should_stop
        self.out = Path(config.out_dir)
        self.init_distributed()
        self.is_main = self.rank == 0
        self.autocast_dtype = resolve_dtype(config.dtype, self.device)
        if config.grad_accum % self.world_size:
            raise UserError(f"grad_accum ({config.grad_accum}) must be a multiple of the number of "
                            f"processes ({self.world_size}) so the global batch stays the same")
        self.micro_steps = config.grad_accum // self.world_size
        self.seq_len = config.seq_len or model_config.max_position_embeddings
        if self.seq_len > model_config.max_position_embeddings:
            raise UserError(f"seq_len {self.seq_len} is longer than the model's context "
                            f"(max_position_embeddings {model_config.max_position_embeddings})")
        self.tokens_per_step = config.batch_size * config.grad_accum * self.seq_len
        tune_malloc()

        state = resume_state(self.out) if resume else None
        if not resume and self.is_main and (unfinished := unfinished_run(self.out)):
            raise UserError(f"{self.out} holds an unfinished run (step {unfinished[0]} of "
                            f"{unfinished[1]}): continue it with --resume {self.out}, or choose "
                            f"another --out")
        # On resume the checkpoint's own tokenizer tokenizes the data, so the token ids match.
        self.data = self.prepare_data(str(self.out / "last") if resume else config.tokenizer)
        tokenizer = self.data.tokenizer

        seed_everything(config.seed)
        if resume:
            self.model = load_model(self.out / "last", device=self.device).train()
        else:
            model_config = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size,
                                               bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id)
            self.model = Qwen3ForCausalLM(model_config).to(self.device)
        if tokenizer.vocab_size > self.model.config.vocab_size:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                            f"{self.model.config.vocab_size}")
        self.optimizers = build_optimizers(self.model, config.optimizer, config.muon_lr,
                                           config.adamw_lr, config.weight_decay,
                                           tuple(config.adamw_betas))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.autocast_dtype == torch.float16)
        self.windows = RandomWindows(self.data.train_tokens, self.seq_len, config.batch_size,
                                     config.seed, self.rank, self.world_size)
        self.step_model = self.build_step_model()

        self.step = 0
        self.best_val_loss = math.inf
        self.elapsed_before = 0.0  # wall-clock of the earlier parts of a resumed run
        # Device-side sums since the last log line (read back only at log steps).
        self.loss_sum = torch.zeros((), device=self.device)
        self.grad_norm_sum = torch.zeros((), device=self.device)
        self.pending_steps = 0
        self.pending_seconds = 0.0  # training time (evaluation and saving excluded) in them
        if state is not None:
            self.restore(state)
        self.flops_per_token = flops_per_token(self.model.config, self.seq_len)
        self.peak = config.peak_flops or peak_flops(self.device, self.autocast_dtype)
        if self.is_main:
            self.start_files(resumed=state is not None)

    # ---- set-up

    def init_distributed(self) -> None:
        """Rank, world size and device; under torchrun, join the process group (NCCL or gloo)."""
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(self.config.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        self.device = device
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    device_id=device if device.type == "cuda" else None)

    def prepare_data(self, tokenizer: str) -> PreparedData:
        """Tokenize on rank 0 first; the other ranks then find the cache (no race building it)."""
        config = self.config

        def run() -> PreparedData:
            return prepare(config.data, tokenizer=tokenizer, vocab_size=config.tokenizer_vocab_size,
                           val_fraction=config.val_fraction, cache_dir=config.cache_dir,
                           min_tokens=self.seq_len + 1, progress=self.is_main,
                           log=self.log if self.is_main else lambda message: None)

        if self.world_size == 1:
            return run()
        data = run() if self.is_main else None
        dist.barrier()
        return data or run()

    def build_step_model(self) -> nn.Module:
        """The module a micro-step calls: model + loss, compiled and/or wrapped in DDP as asked."""
        step_model: nn.Module = CausalLMLoss(self.model)
        if self.config.compile:
            torch._dynamo.config.suppress_errors = True  # fall back to eager where compiling fails
            step_model = torch.compile(step_model)
        if self.world_size > 1:
            step_model = nn.parallel.DistributedDataParallel(
                step_model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        return step_model

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly where `last/` stopped: optimizers, scaler, step, data position, RNG."""
        saved_optimizer = state["train_config"]["optimizer"]
        if saved_optimizer != self.config.optimizer:
            raise UserError(f"the run was trained with optimizer {saved_optimizer!r}; it cannot "
                            f"change to {self.config.optimizer!r} when resuming")
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        peaks = {"muon": self.config.muon_lr, "adamw": self.config.adamw_lr}
        for optimizer in self.optimizers:  # the current config's peak LRs (they may be overridden)
            kind = "adamw" if isinstance(optimizer, torch.optim.AdamW) else "muon"
            for group in optimizer.param_groups:
                group["initial_lr"] = peaks[kind]
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.best_val_loss = state["best_val_loss"]
        self.elapsed_before = state["elapsed_s"]
        pending = state["pending"]
        self.loss_sum.fill_(pending["loss_sum"])
        self.grad_norm_sum.fill_(pending["grad_norm_sum"])
        self.pending_steps = pending["steps"]
        self.pending_seconds = pending["seconds"]
        ranks = state["ranks"]
        mine = ranks[self.rank] if self.rank < len(ranks) else ranks[0]
        # The window stream is the same on every rank (each takes its rows of the global batch).
        self.windows.load_state_dict(mine["windows"])
        set_rng_state(mine["rng"], self.device)

    def start_files(self, resumed: bool) -> None:
        """run.json; metrics.jsonl cut back to the resumed step (or emptied for a new run)."""
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = self.out / "metrics.jsonl"
        kept = []
        if resumed and metrics.is_file():
            kept = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                    if line and json.loads(line)["step"] <= self.step]
        metrics.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        if not resumed:  # replace a finished earlier run in the same folder
            for stale in ("best", "last"):
                remove_checkpoint(self.out / stale)
            (self.out / "loss.png").unlink(missing_ok=True)
        device_name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                       else cpu_name())
        run = {
            "model": dataclasses.asdict(self.model.config),
            "train": dataclasses.asdict(self.config),
            "parameters": self.model.num_parameters(),
            "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak,
            "device": {"type": self.device.type, "name": device_name,
                       "threads": torch.get_num_threads(), "world_size": self.world_size},
            "autocast_dtype": str(self.autocast_dtype).removeprefix("torch."),
            "seq_len": self.seq_len,
            "tokens_per_step": self.tokens_per_step,
            "data": self.data.summary,
            "versions": {"qwen3": qwen3.__version__, "torch": torch.__version__,
                         "numpy": np.__version__, "python": platform.python_version()},
            "resumed_from_step": self.step if resumed else None,
        }
        (self.out / "run.json").write_text(json.dumps(run, indent=2, default=str) + "\n", encoding="utf-8")

    # ---- the loop

    def run(self) -> RunResult:
        config = self.config
        self.started = time.perf_counter()
        stop = threading.Event()
        final: EvalResult | None = None
        if self.is_main:
            self.log(f"training {self.model.num_parameters():,} parameters on {self.device} "
                     f"({self.world_size} process{'es' if self.world_size > 1 else ''}, autocast "
                     f"{str(self.autocast_dtype).removeprefix('torch.')}), {self.tokens_per_step:,} "
                     f"tokens per step, steps {self.step + 1}..{config.max_steps} -> {self.out}")
        # Into a file or a pipe (a log, CI) the bar is redrawn every 30 s rather than every step.
        self.bar = tqdm(total=config.max_steps, initial=self.step, unit="step", file=sys.stderr,
                        disable=not self.is_main, dynamic_ncols=True, desc="train",
                        mininterval=0.1 if sys.stderr.isatty() else 30.0)
        try:
            with graceful_stop(stop):
                while self.step < config.max_steps:
                    self.train_step(self.step + 1)
                    last = self.step == config.max_steps
                    log_now = self.step % config.log_interval == 0 or last
                    stopping = self.stop_requested(stop, log_now)
                    if log_now:
                        self.log_metrics()
                    if self.step % config.eval_interval == 0 or last:
                        result = self.evaluate_and_save()
                        final = result if last else None
                    elif stopping:
                        self.save_last()
                    if stopping and not last:
                        self.log(f"stopped at step {self.step}; {self.out / 'last'} saved. "
                                 f"Continue with: qwen3 train --resume {self.out}")
                        return self.result(interrupted=True, final=None)
        finally:
            self.bar.close()
        return self.result(interrupted=False, final=final)

    def train_step(self, step: int) -> None:
        """One optimizer step: micro-batches with gradient accumulation, clip, step, schedule."""
        config = self.config
        start = time.perf_counter()
        factor = lr_factor(step, config.warmup_steps, config.max_steps, config.min_lr_ratio)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
        for micro in range(self.micro_steps):
            x, y = next(self.windows)
            if self.device.type == "cuda":
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            # Gradients are all-reduced once per step, on the last micro-batch.
            sync = micro == self.micro_steps - 1 or self.world_size == 1
            with contextlib.nullcontext() if sync else self.step_model.no_sync():
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype != torch.float32):
                    loss = self.step_model(x, y)
                # Each micro-batch's mean loss / micro_steps: the gradient of the step's mean loss
                # (DDP then averages over ranks).
                self.scaler.scale(loss / self.micro_steps).backward()
            self.loss_sum += loss.detach()
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        if config.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.params, config.grad_clip, foreach=True)
        else:
            grad_norm = nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None],
                                                foreach=True)
        self.grad_norm_sum += grad_norm
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.step = step
        self.pending_steps += 1
        self.pending_seconds += time.perf_counter() - start
        self.bar.update(1)

    def stop_requested(self, stop: threading.Event, log_now: bool) -> bool:
        """Ctrl-C or `should_stop`. With several processes they agree at log steps (a collective)."""
        local = stop.is_set() or bool(self.should_stop and self.should_stop(self.step))
        if self.world_size == 1:
            return local
        if not log_now:
            return False
        flag = torch.tensor([float(local)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def read_pending(self) -> tuple[float, float]:
        """Mean loss and gradient norm since the last log (over all ranks); stops a diverged run."""
        sums = torch.stack([self.loss_sum, self.grad_norm_sum]).double()
        if self.world_size > 1:
            dist.all_reduce(sums)
        loss_sum, grad_norm_sum = sums.tolist()
        steps = max(self.pending_steps, 1)
        loss = loss_sum / (steps * self.micro_steps * self.world_size)
        grad_norm = grad_norm_sum / (steps * self.world_size)
        # A float16 scaler skips steps with inf gradients by design; elsewhere inf is divergence.
        if not math.isfinite(loss) or (not self.scaler.is_enabled() and not math.isfinite(grad_norm)):
            self.diverged(f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}",
                          "by")
        return loss, grad_norm

    def diverged(self, what: str, preposition: str) -> None:
        last = self.out / "last"
        kept = (f"the last good checkpoint, {last}, is untouched" if last.exists()
                else "no checkpoint had been saved yet")
        raise TrainingDiverged(
            f"training diverged: {what} {preposition} step {self.step}; stopped without saving ({kept}). "
            f"Lower muon_lr/adamw_lr, raise warmup_steps or set grad_clip")

    def log_metrics(self) -> None:
        loss, grad_norm = self.read_pending()
        tok_per_s = self.pending_steps * self.tokens_per_step / max(self.pending_seconds, 1e-9)
        lr = self.optimizers[0].param_groups[0]["lr"]
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self.pending_steps, self.pending_seconds = 0, 0.0
        if not self.is_main:
            return
        self.write_event({"lr": lr, "loss": loss, "grad_norm": grad_norm, "tok_per_s": tok_per_s,
                          "mfu": tok_per_s * self.flops_per_token / self.peak})
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_per_s:,.0f}", refresh=False)

    def evaluate_and_save(self) -> EvalResult:
        """Evaluate on the whole validation split; save best/ when it improved, and last/."""
        self.read_pending()  # never checkpoint a diverged model
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                  enabled=self.autocast_dtype != torch.float32)
        result = evaluate(self.model, self.data.val_tokens, self.seq_len, self.config.batch_size,
                          self.data.val_bytes, self.device, autocast, self.rank, self.world_size)
        if not math.isfinite(result.loss):
            self.diverged(f"validation loss {result.loss}", "at")
        improved = result.loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, result.loss)
        if self.is_main:
            self.write_event({**result.metrics(), "lr": self.optimizers[0].param_groups[0]["lr"]})
            self.log(f"step {self.step}: validation {result.summary()}"
                     f"{' (best so far)' if improved else ''}")
            if improved:
                save_model(self.model, self.out / "best", tokenizer=self.data.tokenizer)
        self.save_last()
        if self.is_main:
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
        return result

    def save_last(self) -> None:
        """last/: the model, its tokenizer and everything `--resume` needs. Collective under DDP."""
        self.read_pending()
        mine = {"rng": rng_state(self.device), "windows": self.windows.state_dict()}
        ranks = [mine]
        if self.world_size > 1:
            ranks = [None] * self.world_size
            dist.all_gather_object(ranks, mine)
        if self.is_main:
            state = {
                "step": self.step,
                "model_config": dataclasses.asdict(self.model.config),
                "train_config": dataclasses.asdict(self.config),
                "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
                "scaler": self.scaler.state_dict(),
                "best_val_loss": self.best_val_loss,
                "elapsed_s": self.elapsed(),
                "pending": {"loss_sum": self.loss_sum.item(), "grad_norm_sum": self.grad_norm_sum.item(),
                            "steps": self.pending_steps, "seconds": self.pending_seconds},
                "ranks": ranks,
            }
            save_model(self.model, self.out / "last", tokenizer=self.data.tokenizer, trainer_state=state)
        if self.world_size > 1:
            dist.barrier()  # nobody reads last/ before it is complete

    # ---- bookkeeping

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def write_event(self, values: dict[str, Any]) -> None:
        event = {"step": self.step, "tokens": self.step * self.tokens_per_step, **values,
                 "elapsed_s": round(self.elapsed(), 3)}
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps(event) + "\n")

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message, file=sys.stderr)

    def result(self, interrupted: bool, final: EvalResult | None) -> RunResult:
        return RunResult(self.out, self.step, self.step * self.tokens_per_step, self.elapsed(),
                         interrupted, self.best_val_loss, final)


def train(model_config: ModelConfig, config: TrainConfig, resume: bool = False,
          should_stop: Callable[[int], bool] | None = None) -> RunResult:
    """Train (or with `resume`, continue the run in config.out_dir from its last/ checkpoint).

    `should_stop(step)` is asked after every step; True saves last/ and returns, like Ctrl-C.
    Under torchrun this runs in every process and the process group is torn down at the end.
    """
    try:
        return Trainer(model_config, config, resume, should_stop).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
