"""The training loop, in one process or many (torchrun + DistributedDataParallel), for every stage.

The seed called 250 optimizer steps "500 steps", validated on windows that overlapped its training
data and kept only a pickled final model. Here:

* a step is one optimizer step over `batch_size * grad_accum` windows (the global batch, however many
  processes share it); the learning rate warms up linearly, then follows a cosine to a floor;
* mixed precision is autocast (bfloat16 where the device multiplies it natively, float16 with a
  gradient scaler on older GPUs, float32 otherwise) over float32 master weights;
* evaluation scores the whole held-out split every `eval_interval` steps and at the last step, and
  shows samples (train/samples.py); `OUT/best/` keeps the best checkpoint, `OUT/last/` the latest with
  everything a resume needs (optimizers, step, RNG states, data position), both written atomically;
* `OUT/metrics.jsonl`, `OUT/run.json`, `OUT/loss.png` (and `OUT/tensorboard/`) record the run (runfiles.py);
* Ctrl-C saves `last/` and stops; a non-finite loss stops the run without saving over `last/`.

It reads as nanoGPT's loop does, top to bottom: `setup` builds the run's whole state (`TrainState`,
train/state.py), `train_step` takes one optimizer step on it, `evaluate_and_save` scores and
checkpoints it, and `run` is the loop. What differs between pretraining and fine-tuning is the
stage's (train/stages/: the data, its batches, its held-out score, its sample prompts); where the
model comes from is a `ModelSource` (train/start.py: a fresh initialization or a checkpoint folder).

The hot path reads nothing back from the device except at log steps, and glibc's allocator is told
to keep freed memory (`tune_malloc`), which removes most of the page faults of a CPU step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from qwen3.allocator import tune_malloc
from qwen3.config import ModelConfig, TrainConfig
from qwen3.errors import UserError, log
from qwen3.model.checkpoint import resume_state, save_model
from qwen3.model.lora import add_lora
from qwen3.runtime import (autocast_for, graceful_stop, init_distributed, peak_flops, rank_zero_first, resolve_dtype,
                           seed_everything, teardown_distributed)
from qwen3.train.muon import build_optimizers
from qwen3.train.parallel import batch_layout, loss_divisor, wrap_step_model
from qwen3.train.plan import RunPlan, flops_per_token
from qwen3.train.runfiles import RunFiles
from qwen3.train.samples import format_samples, generate_samples, sample_due
from qwen3.train.schedule import apply_schedule
from qwen3.train.stages import Score, stage_class
from qwen3.train.start import ModelSource, refuse_unfinished
from qwen3.train.state import Pending, TrainResult, TrainState


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run stopped without saving over its last checkpoint."""


# --------------------------------------------------------------------------------------------
# Set-up


def setup(model_config: ModelConfig, config: TrainConfig, saved: dict[str, Any] | None = None,
          model_source: ModelSource | None = None) -> TrainState:
    """The run's state, ready for its first step; with `saved` (the trainer state of
    config.out_dir/last), ready for the step after the saved one. `model_source`, when given, builds
    the model instead of `init_from` or a fresh initialization; a resumed run still loads last/."""
    processes = init_distributed(config.device)
    autocast_dtype = resolve_dtype(config.dtype, processes.device)
    context = model_config.max_position_embeddings
    if config.seq_len > context:
        raise UserError(f"seq_len {config.seq_len} is longer than the model's context "
                        f"(max_position_embeddings {context})")
    shares = batch_layout(config.batch_size, config.grad_accum, config.seq_len, processes.world_size)
    stage_type = stage_class(config.stage)
    tune_malloc()
    out = Path(config.out_dir)
    files = RunFiles(out, processes.is_main, config.tensorboard)  # refuses a missing tensorboard now
    # A LoRA run resumes from the frozen base it started from plus its saved adapters.
    if saved is not None and not config.lora_rank:
        source = ModelSource(out / "last")
    else:
        source = model_source or ModelSource(Path(config.init_from) if config.init_from else None)

    def prepare_data() -> Any:
        if saved is None:
            refuse_unfinished(out)
        return stage_type.prepare(config, source.tokenizer(config), context, progress=processes.is_main)

    # Rank 0 tokenizes, then the others find the cache; a user error stops every rank.
    stage = rank_zero_first(prepare_data, processes)
    # The length the stage chose (seq_len 0) is the run's: run.json, `qwen3 eval` and a resume read it.
    config = dataclasses.replace(config, seq_len=stage.seq_len)
    layout = dataclasses.replace(shares, seq_len=stage.seq_len, sequences_per_row=stage.sequences_per_row)
    seed_everything(config.seed)
    model = source.build(model_config, stage.tokenizer, processes.device)
    if config.lora_rank:
        model = add_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets)
    optimizers = build_optimizers(model, config.optimizer, config.muon_lr, config.adamw_lr, config.weight_decay,
                                  tuple(config.adamw_betas), config.embedding_lr)
    state = TrainState(
        config, processes, autocast_dtype, layout, stage, model,
        step_model=wrap_step_model(stage.objective(model), config.compile, processes),
        optimizers=optimizers,
        scaler=torch.amp.GradScaler(processes.device.type, enabled=autocast_dtype == torch.float16),
        batches=stage.batches(layout, config.seed, processes, model, autocast_for(processes.device, autocast_dtype)),
        pending=Pending.zeros(processes.device),
        files=files, peak_flops=config.peak_flops or peak_flops(processes.device, autocast_dtype),
        flops_per_token=flops_per_token(model.config, layout.seq_len),
        params=[p for p in model.parameters() if p.requires_grad])
    if saved is not None:
        state.load_state_dict(saved)
    state.files.start(state.describe(), state.step if saved is not None else None)
    return state


# --------------------------------------------------------------------------------------------
# The loop


def train(model_config: ModelConfig, config: TrainConfig, resume: bool = False,
          should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Train, or with `resume` continue the run in config.out_dir from its last/ checkpoint (whose
    configs `resume_configs` reads). `should_stop(step)` is asked after every step; True saves
    last/ and returns, like Ctrl-C. Under torchrun this runs in every process and the process group
    is torn down at the end."""
    saved = resume_state(config.out_dir) if resume else None
    try:
        return run(setup(model_config, config, saved), should_stop)
    finally:
        teardown_distributed()


def run(state: TrainState, should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Steps until max_steps: log every log_interval, evaluate and save every eval_interval and at
    the end; Ctrl-C or `should_stop` saves last/ and returns early."""
    config = state.config
    stop = threading.Event()
    final: Score | None = None
    plan = RunPlan(state.step + 1, config.max_steps, state.layout.tokens_per_step, config.eval_interval,
                   state.stage.eval_tokens, choices=state.stage.choices)
    announce(state, plan)
    # Into a file or a pipe (a log, CI) the bar is redrawn every 30 s rather than every step.
    bar = tqdm(total=config.max_steps, initial=state.step, unit="step", file=sys.stderr,
               disable=not state.processes.is_main, dynamic_ncols=True, desc="train",
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    with bar, graceful_stop(stop):
        while state.step < config.max_steps:
            with plan.timing(state.step + 1, state.device):
                train_step(state)
            bar.update(1)
            if state.step == plan.timed_until:
                report_estimate(state, plan)
            last = state.step == config.max_steps
            log_now = state.step % config.log_interval == 0 or last
            stopping = stop_requested(state, stop, should_stop, log_now)
            if log_now:
                bar.set_postfix(log_metrics(state), refresh=False)
            if state.step % config.eval_interval == 0 or last:
                result = evaluate_and_save(state)
                final = result if last else None
            elif stopping:
                stop_if_diverged(state)
                save_last(state)
            if stopping and not last:
                log(f"stopped at step {state.step}; {state.out / 'last'} saved. "
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
    divisor = loss_divisor([state.stage.units(batch) for batch in micro_batches], state.processes)
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


# --------------------------------------------------------------------------------------------
# What the run says: the plan, the log lines, divergence


def announce(state: TrainState, plan: RunPlan) -> None:
    """The run's first lines: what is trained where, and its plan with what the stage chose."""
    world, autocast = state.processes.world_size, str(state.autocast_dtype).removeprefix("torch.")
    log(f"training {state.model.num_parameters():,} parameters on {state.device} ({world} "
        f"process{'es' if world > 1 else ''}, autocast {autocast}), {state.layout.tokens_per_step:,} "
        f"tokens per step, steps {state.step + 1}..{state.config.max_steps} -> {state.out}")
    log(plan.describe())


def report_estimate(state: TrainState, plan: RunPlan) -> None:
    """Once the plan's steps are timed: the estimated wall-clock, logged and recorded."""
    elapsed = state.elapsed()
    estimate = plan.estimate(state.step, elapsed)
    state.write_event(estimate)
    log(plan.describe_estimate(state.step, elapsed, estimate))


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
        diverged(state.out, state.step, f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}",
                 "by")


def diverged(out: Path, step: int, what: str, preposition: str) -> None:
    last = out / "last"
    kept = (f"the last good checkpoint, {last}, is untouched" if last.exists()
            else "no checkpoint had been saved yet")
    raise TrainingDiverged(
        f"training diverged: {what} {preposition} step {step}; stopped without saving ({kept}). "
        f"Lower muon_lr/adamw_lr, raise warmup_steps or set grad_clip")


def log_metrics(state: TrainState) -> dict[str, str]:
    """Write the log event, with the stage's own metrics (and stop a diverged run); returns what the
    progress bar shows: loss, learning rate, the stage's first two metrics, tokens/s."""
    loss, grad_norm = means = means_since_log(state)
    stop_if_diverged(state, means)
    pending = state.pending
    tok_per_s = pending.steps * state.layout.tokens_per_step / max(pending.seconds, 1e-9)
    pending.reset()
    # MFU per device: each device processes 1/world of the tokens against its own peak.
    mfu = tok_per_s / state.processes.world_size * state.flops_per_token / state.peak_flops
    stage_metrics = state.stage.metrics(state.processes)
    state.write_event({"lr": state.lr, "loss": loss, "grad_norm": grad_norm, "tok_per_s": tok_per_s, "mfu": mfu,
                       **stage_metrics})
    return {"loss": f"{loss:.3f}", "lr": f"{state.lr:.2e}",
            **{name: f"{value:.3g}" for name, value in list(stage_metrics.items())[:2]}, "tok_s": f"{tok_per_s:,.0f}"}


# --------------------------------------------------------------------------------------------
# Evaluate and save


def evaluate_and_save(state: TrainState) -> Score:
    """Evaluate on the whole held-out split; show samples when due; save best/ when it improved,
    and last/."""
    stop_if_diverged(state)  # never checkpoint a diverged model
    processes = state.processes
    result = state.stage.evaluate(state.model, state.config.batch_size, state.device,
                                  autocast_for(state.device, state.autocast_dtype), processes.rank,
                                  processes.world_size)
    if not math.isfinite(result.loss):
        diverged(state.out, state.step, f"validation loss {result.loss}", "at")
    improved = result.loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_summary = result.loss, result.summary()
    state.write_event({**result.metrics(), "lr": state.lr})
    log(f"step {state.step}: validation {result.summary()}{' (best so far)' if improved else ''}")
    if processes.is_main and sample_due(state.step, state.config.sample_interval, state.config.max_steps):
        show_samples(state)
    if improved and processes.is_main:
        save_model(state.model, state.out / "best", tokenizer=state.stage.tokenizer)
    save_last(state)
    state.files.plot()
    return result


def show_samples(state: TrainState) -> None:
    """The samples of this step (rank 0): generated, logged and recorded."""
    prompts = state.config.sample_prompts or state.stage.sample_prompts()
    samples = generate_samples(state.model, state.stage.tokenizer, prompts, state.config.seed,
                               chat=state.stage.chat)
    state.write_event({"samples": samples})
    log(format_samples(state.step, samples))


def save_last(state: TrainState) -> None:
    """last/: the model, its tokenizer and everything `--resume` needs. Collective under DDP."""
    processes = state.processes
    ranks: list[Any] = [state.rank_state()]
    if processes.world_size > 1:
        ranks = [None] * processes.world_size
        dist.all_gather_object(ranks, state.rank_state())
    if processes.is_main:
        save_model(state.model, state.out / "last", tokenizer=state.stage.tokenizer,
                   trainer_state=state.state_dict(ranks))
    if processes.world_size > 1:
        dist.barrier()  # nobody reads last/ before it is complete
