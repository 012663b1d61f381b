"""The training loop, in one process or many (torchrun + DistributedDataParallel).

The seed called 250 optimizer steps "500 steps", validated on windows that overlapped its training
data and kept only a pickled final model. Here:

* a step is one optimizer step over `batch_size * grad_accum` windows (the global batch, however many
  processes share it); the learning rate warms up linearly, then follows a cosine to a floor;
* mixed precision is autocast (bfloat16 where the device multiplies it natively, float16 with a
  gradient scaler on older GPUs, float32 otherwise) over float32 master weights;
* evaluation scores the whole validation split every `eval_interval` steps and at the last step, and
  shows samples (qwen3/train/samples.py); `OUT/best/` keeps the best checkpoint, `OUT/last/` the latest with
  everything a resume needs (optimizers, step, RNG states, data position), both written atomically;
* `OUT/metrics.jsonl`, `OUT/run.json`, `OUT/loss.png` (and `OUT/tensorboard/`) record the run (runfiles.py);
* Ctrl-C saves `last/` and stops; a non-finite loss stops the run without saving over `last/`.

It reads as nanoGPT's loop does: `setup` builds the run's whole state (`TrainState`), `train_step`
takes one optimizer step on it, and `run` is the loop. The model comes from a `ModelSource` (a fresh
initialization or a checkpoint folder) and the micro-batches from a `BatchSource`, so another
source of either (a checkpoint to fine-tune, conversations with a loss mask) uses the same loop.

The hot path reads nothing back from the device except at log steps, and glibc's allocator is told
to keep freed memory (`tune_malloc`), which removes most of the page faults of a CPU step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import qwen3
from qwen3.model.checkpoint import resume_state, save_model
from qwen3.config import ModelConfig, TrainConfig
from qwen3.errors import UserError
from qwen3.train.evaluate import EvalResult
from qwen3.model.lora import adapter_state_dict, add_lora, load_adapter_state
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.train.muon import build_optimizers
from qwen3.train.start import ResumePoint, refuse_unfinished, resume_configs, unfinished_run
from qwen3.train.runfiles import RunFiles
from qwen3.train.plan import RunEstimate
from qwen3.runtime import (Distributed, autocast_for, cpu_name, graceful_stop, init_distributed, peak_flops,
                           rank_zero_first, resolve_dtype, rng_state, seed_everything, set_rng_state,
                           teardown_distributed, tune_malloc)
from qwen3.train.samples import write_samples
from qwen3.train.parts import (PRETRAINING, BatchLayout, BatchSource, CausalLMLoss, CompiledOrEager, DataStage,
                              ModelSource, Pending, apply_schedule, batch_layout, data_stage, flops_per_token,
                              loss_divisor, lr_factor)

# The training API in one place (the resume helpers and the loop's pieces live in their own modules).
__all__ = ["BatchSource", "CausalLMLoss", "ModelSource", "RunResult", "TrainState", "TrainingDiverged",
           "flops_per_token", "lr_factor", "resume_configs", "run", "setup", "train", "train_step",
           "unfinished_run"]


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


@dataclass
class TrainState:
    """Everything a run is: what `setup` builds, `train_step` advances and `last/` saves."""

    config: TrainConfig
    processes: Distributed
    autocast_dtype: torch.dtype
    layout: BatchLayout
    data: Any                      # the stage's: PreparedData (text windows) or ConversationData
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
    stage: DataStage = PRETRAINING  # what the run learns from and is evaluated on
    step: int = 0
    best_val_loss: float = math.inf
    elapsed_before: float = 0.0    # wall-clock of the earlier parts of a resumed run
    started: float = field(default_factory=time.perf_counter)

    @property
    def out(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def device(self) -> torch.device:
        return self.processes.device

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def log(self, message: str) -> None:
        if self.processes.is_main:
            tqdm.write(message, file=sys.stderr)

    def write_event(self, values: dict[str, Any]) -> None:
        self.files.write_event({"step": self.step, "tokens": self.step * self.layout.tokens_per_step,
                                **values, "elapsed_s": round(self.elapsed(), 3)})

    def result(self, interrupted: bool, final: EvalResult | None) -> RunResult:
        return RunResult(self.out, self.step, self.step * self.layout.tokens_per_step, self.elapsed(),
                         interrupted, self.best_val_loss, final)


# --------------------------------------------------------------------------------------------
# Set-up


def setup(model_config: ModelConfig, config: TrainConfig, saved: dict[str, Any] | None = None,
          model_source: ModelSource | None = None) -> TrainState:
    """The run's state, ready for its first step; with `saved` (the trainer state of
    config.out_dir/last), ready for the step after the saved one. `model_source`, when given, builds
    the model instead of `init_from` or a fresh initialization; a resumed run still loads last/."""
    processes = init_distributed(config.device)
    autocast_dtype = resolve_dtype(config.dtype, processes.device)
    seq_len = config.seq_len or model_config.max_position_embeddings
    if seq_len > model_config.max_position_embeddings:
        raise UserError(f"seq_len {seq_len} is longer than the model's context "
                        f"(max_position_embeddings {model_config.max_position_embeddings})")
    layout = batch_layout(config.batch_size, config.grad_accum, seq_len, processes.world_size)
    tune_malloc()
    out = Path(config.out_dir)
    files = RunFiles(out, processes.is_main, config.tensorboard)  # refuses a missing tensorboard now
    # A LoRA run resumes from the frozen base it started from plus its saved adapters.
    if saved is not None and not config.lora_rank:
        source = ModelSource(out / "last")
    else:
        source = model_source or ModelSource(Path(config.init_from) if config.init_from else None)
    say = (lambda message: tqdm.write(message, file=sys.stderr)) if processes.is_main else (lambda message: None)

    stage = data_stage(config.stage)

    def prepare_data() -> Any:
        if saved is None:
            refuse_unfinished(out)
        return stage.prepare(config, source.tokenizer(config), seq_len, processes.is_main, say)

    # Rank 0 tokenizes, then the others find the cache; a user error stops every rank.
    data = rank_zero_first(prepare_data, processes)
    seed_everything(config.seed)
    model = source.build(model_config, data.tokenizer, processes.device)
    if config.lora_rank:
        model = add_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets)
    optimizers = build_optimizers(model, config.optimizer, config.muon_lr, config.adamw_lr, config.weight_decay,
                                  tuple(config.adamw_betas), config.embedding_lr)
    step_model = wrap_step_model(CausalLMLoss(model), config.compile, processes, say)
    state = TrainState(
        config, processes, autocast_dtype, layout, data, model, step_model, optimizers,
        torch.amp.GradScaler(processes.device.type, enabled=autocast_dtype == torch.float16),
        stage.batches(data, layout, config.seed, processes), Pending.zeros(processes.device),
        files,
        config.peak_flops or peak_flops(processes.device, autocast_dtype),
        flops_per_token(model.config, layout.seq_len), [p for p in model.parameters() if p.requires_grad], stage)
    if saved is not None:
        restore(state, saved)
    state.files.start(describe_run(state), state.step if saved is not None else None)
    return state


def wrap_step_model(step_model: nn.Module, compile_model: bool, processes: Distributed,
                    log: Callable[[str], None]) -> nn.Module:
    """Model + loss, compiled (eager where compiling fails, said in the log) and in DDP as asked."""
    if compile_model:
        step_model = CompiledOrEager(step_model, log)
    if processes.world_size > 1:
        # The buffers (RoPE tables) are equal everywhere by construction: no broadcast each step.
        step_model = nn.parallel.DistributedDataParallel(
            step_model, device_ids=[processes.device.index] if processes.device.type == "cuda" else None,
            gradient_as_bucket_view=True, broadcast_buffers=False)
    return step_model


def restore(state: TrainState, saved: dict[str, Any]) -> None:
    """Continue exactly where `last/` stopped: optimizers, scaler, step, counters, data position, RNG."""
    saved_optimizer = saved["train_config"]["optimizer"]
    if saved_optimizer != state.config.optimizer:
        raise UserError(f"the run was trained with optimizer {saved_optimizer!r}; it cannot "
                        f"change to {state.config.optimizer!r} when resuming")
    if bool(saved["train_config"].get("embedding_lr")) != bool(state.config.embedding_lr):
        raise UserError("embedding_lr gives the embedding an optimizer group of its own: it cannot be turned "
                        "on or off when resuming (its value may change)")
    for optimizer, saved_optimizer_state in zip(state.optimizers, saved["optimizers"]):
        peaks = [{key: group[key] for key in ("initial_lr", "initial_momentum") if key in group}
                 for group in optimizer.param_groups]
        optimizer.load_state_dict(saved_optimizer_state)
        for group, peak in zip(optimizer.param_groups, peaks):  # the current config's peaks
            group.update(peak)
    state.scaler.load_state_dict(saved["scaler"])
    state.step = saved["step"]
    state.best_val_loss = saved["best_val_loss"]
    state.elapsed_before = saved["elapsed_s"]
    state.pending.load_state_dict(saved["pending"])
    ranks = saved["ranks"]
    mine = ranks[state.processes.rank] if state.processes.rank < len(ranks) else ranks[0]
    # The window stream is the same on every rank (each takes its rows of the global batch).
    state.batches.load_state_dict(mine["windows"])
    if state.config.lora_rank:
        load_adapter_state(state.model, saved["adapter"])
    set_rng_state(mine["rng"], state.device)


def describe_run(state: TrainState) -> dict[str, Any]:
    """run.json: the resolved configuration and the environment."""
    device = state.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "model": dataclasses.asdict(state.model.config),
        "train": dataclasses.asdict(state.config),
        "parameters": state.model.num_parameters(),
        "flops_per_token": state.flops_per_token,
        "peak_flops": state.peak_flops,
        "device": {"type": device.type, "name": device_name, "threads": torch.get_num_threads(),
                   "world_size": state.processes.world_size},
        "autocast_dtype": str(state.autocast_dtype).removeprefix("torch."),
        "seq_len": state.layout.seq_len,
        "tokens_per_step": state.layout.tokens_per_step,
        "micro_batch": {"rows_per_process": state.layout.rows, "micro_steps": state.layout.micro_steps},
        "data": state.data.summary,
        "versions": {"qwen3": qwen3.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
    }


# --------------------------------------------------------------------------------------------
# The loop


def train(model_config: ModelConfig, config: TrainConfig, resume: bool | ResumePoint = False,
          should_stop: Callable[[int], bool] | None = None) -> RunResult:
    """Train (or with `resume`, continue the run in config.out_dir from its last/ checkpoint; True
    reads it, a ResumePoint was read already).

    `should_stop(step)` is asked after every step; True saves last/ and returns, like Ctrl-C.
    Under torchrun this runs in every process and the process group is torn down at the end.
    """
    saved = (resume.state if isinstance(resume, ResumePoint)
             else resume_state(config.out_dir) if resume else None)
    try:
        return run(setup(model_config, config, saved), should_stop)
    finally:
        teardown_distributed()


def run(state: TrainState, should_stop: Callable[[int], bool] | None = None) -> RunResult:
    """Steps until max_steps: log every log_interval, evaluate and save every eval_interval and at
    the end; Ctrl-C or `should_stop` saves last/ and returns early."""
    config = state.config
    stop = threading.Event()
    final: EvalResult | None = None
    estimate = RunEstimate(state)  # logs what the run is; after a few timed steps, its wall-clock
    # Into a file or a pipe (a log, CI) the bar is redrawn every 30 s rather than every step.
    bar = tqdm(total=config.max_steps, initial=state.step, unit="step", file=sys.stderr,
               disable=not state.processes.is_main, dynamic_ncols=True, desc="train",
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    with bar, graceful_stop(stop):
        while state.step < config.max_steps:
            with estimate.timing(state):
                train_step(state)
            bar.update(1)
            last = state.step == config.max_steps
            log_now = state.step % config.log_interval == 0 or last
            stopping = stop_requested(state, stop, should_stop, log_now)
            if log_now:
                loss, lr, tok_per_s = log_metrics(state)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_per_s:,.0f}", refresh=False)
            if state.step % config.eval_interval == 0 or last:
                result = evaluate_and_save(state)
                final = result if last else None
            elif stopping:
                stop_if_diverged(state)
                save_last(state)
            if stopping and not last:
                state.log(f"stopped at step {state.step}; {state.out / 'last'} saved. "
                          f"Continue with: qwen3 train --resume {state.out}")
                return state.result(interrupted=True, final=None)
    return state.result(interrupted=False, final=final)


def train_step(state: TrainState) -> None:
    """One optimizer step: micro-batches with gradient accumulation, clip, step, schedule."""
    config, micro_steps, device = state.config, state.layout.micro_steps, state.device
    start = time.perf_counter()
    step = state.step + 1
    apply_schedule(state.optimizers, step, config)
    micro_batches = [next(state.batches) for _ in range(micro_steps)]
    divisor = loss_divisor(micro_batches, state.processes)
    for micro, batch in enumerate(micro_batches):
        if device.type == "cuda":
            batch = tuple(tensor.pin_memory() for tensor in batch)
        batch = tuple(tensor.to(device, non_blocking=True) for tensor in batch)
        # Gradients are all-reduced once per step, on the last micro-batch.
        sync = micro == micro_steps - 1 or state.processes.world_size == 1
        with contextlib.nullcontext() if sync else state.step_model.no_sync():
            with autocast_for(device, state.autocast_dtype):
                # The summed loss over the step's per-process share of targets: summed over the
                # micro-batches (and averaged over ranks by DDP) it is the step's mean loss.
                loss = state.step_model(*batch, divisor)
            state.scaler.scale(loss).backward()
        state.pending.loss_sum += loss.detach()
    for optimizer in state.optimizers:
        state.scaler.unscale_(optimizer)
    if config.grad_clip > 0:
        grad_norm = nn.utils.clip_grad_norm_(state.params, config.grad_clip, foreach=True)
    else:
        grad_norm = nn.utils.get_total_norm([p.grad for p in state.params if p.grad is not None], foreach=True)
    state.pending.grad_norm_sum += grad_norm
    for optimizer in state.optimizers:
        state.scaler.step(optimizer)
    state.scaler.update()
    for optimizer in state.optimizers:
        # Under DDP the gradients are views into its all-reduce buckets: zero them in place.
        optimizer.zero_grad(set_to_none=state.processes.world_size == 1)
    state.step = step
    state.pending.steps += 1
    state.pending.seconds += time.perf_counter() - start


def stop_requested(state: TrainState, stop: threading.Event, should_stop: Callable[[int], bool] | None,
                   log_now: bool) -> bool:
    """Ctrl-C or `should_stop`. With several processes they agree at log steps (a collective)."""
    local = stop.is_set() or bool(should_stop and should_stop(state.step))
    if state.processes.world_size == 1:
        return local
    if not log_now:
        return False
    flag = torch.tensor([float(local)], device=state.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def means_since_log(state: TrainState) -> tuple[float, float]:
    """Mean loss and gradient norm since the last log, over all ranks (a collective under DDP)."""
    sums = torch.stack([state.pending.loss_sum, state.pending.grad_norm_sum]).double()
    world = state.processes.world_size
    if world > 1:
        dist.all_reduce(sums)
    loss_sum, grad_norm_sum = sums.tolist()  # loss_sum: world_size times each step's mean, summed
    steps = max(state.pending.steps, 1)
    return loss_sum / (steps * world), grad_norm_sum / (steps * world)


def stop_if_diverged(state: TrainState, means: tuple[float, float] | None = None) -> None:
    """Raise TrainingDiverged when the loss or gradient norm since the last log is not finite
    (computing the means, a collective, unless given). Nothing diverged is ever saved."""
    loss, grad_norm = means or means_since_log(state)
    # A float16 scaler skips steps with inf gradients by design; elsewhere inf is divergence.
    if not math.isfinite(loss) or (not state.scaler.is_enabled() and not math.isfinite(grad_norm)):
        diverged(state, f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}", "by")


def diverged(state: TrainState, what: str, preposition: str) -> None:
    last = state.out / "last"
    kept = (f"the last good checkpoint, {last}, is untouched" if last.exists()
            else "no checkpoint had been saved yet")
    raise TrainingDiverged(
        f"training diverged: {what} {preposition} step {state.step}; stopped without saving ({kept}). "
        f"Lower muon_lr/adamw_lr, raise warmup_steps or set grad_clip")


def log_metrics(state: TrainState) -> tuple[float, float, float]:
    """Write the log event (and stop a diverged run); returns loss, learning rate and tokens/s."""
    loss, grad_norm = means = means_since_log(state)
    stop_if_diverged(state, means)
    pending = state.pending
    tok_per_s = pending.steps * state.layout.tokens_per_step / max(pending.seconds, 1e-9)
    lr = state.optimizers[0].param_groups[0]["lr"]
    pending.reset()
    # MFU per device: each device processes 1/world of the tokens against its own peak.
    mfu = tok_per_s / state.processes.world_size * state.flops_per_token / state.peak_flops
    state.write_event({"lr": lr, "loss": loss, "grad_norm": grad_norm, "tok_per_s": tok_per_s, "mfu": mfu})
    return loss, lr, tok_per_s


def evaluate_and_save(state: TrainState) -> EvalResult:
    """Evaluate on the whole validation split; save best/ when it improved, and last/."""
    stop_if_diverged(state)  # never checkpoint a diverged model
    processes = state.processes
    result = state.stage.evaluate(state.model, state.data, state.layout.seq_len, state.config.batch_size,
                                  state.device, autocast_for(state.device, state.autocast_dtype),
                                  processes.rank, processes.world_size)
    if not math.isfinite(result.loss):
        diverged(state, f"validation loss {result.loss}", "at")
    improved = result.loss < state.best_val_loss
    state.best_val_loss = min(state.best_val_loss, result.loss)
    state.write_event({**result.metrics(), "lr": state.optimizers[0].param_groups[0]["lr"]})
    state.log(f"step {state.step}: validation {result.summary()}{' (best so far)' if improved else ''}")
    write_samples(state)
    if improved and processes.is_main:
        save_model(state.model, state.out / "best", tokenizer=state.data.tokenizer)
    save_last(state)
    state.files.plot()
    return result


def save_last(state: TrainState) -> None:
    """last/: the model, its tokenizer and everything `--resume` needs. Collective under DDP."""
    processes = state.processes
    mine = {"rng": rng_state(state.device), "windows": state.batches.state_dict()}
    ranks = [mine]
    if processes.world_size > 1:
        ranks = [None] * processes.world_size
        dist.all_gather_object(ranks, mine)
    if processes.is_main:
        trainer_state = {
            "step": state.step,
            "model_config": dataclasses.asdict(state.model.config),
            "train_config": dataclasses.asdict(state.config),
            "optimizers": [optimizer.state_dict() for optimizer in state.optimizers],
            "scaler": state.scaler.state_dict(),
            "best_val_loss": state.best_val_loss,
            "elapsed_s": state.elapsed(),
            "pending": state.pending.state_dict(),
            "ranks": ranks,
        }
        if state.config.lora_rank:
            trainer_state["adapter"] = adapter_state_dict(state.model)
        save_model(state.model, state.out / "last", tokenizer=state.data.tokenizer, trainer_state=trainer_state)
    if processes.world_size > 1:
        dist.barrier()  # nobody reads last/ before it is complete
