"""Where a run stopped: reading `last/trainer_state.pt` to continue a run, and finding unfinished runs.

A resumed run continues with the configs it saved (overrides may extend it, e.g. a larger
max_steps, but not change the model's shape) in its own folder. `resume_point` reads the trainer
state once, whole, and hands it to the training loop with the configs; `resume_configs` and
`unfinished_run` only look at the configs or the step and map the file's tensors instead of reading
them, which costs nothing whatever the model's size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3.model.checkpoint import TRAINER_STATE_NAME, last_checkpoint, load_trainer_state, resume_state
from qwen3.config import ModelConfig, TrainConfig, apply_overrides, refuse_model_changes
from qwen3.errors import UserError


@dataclass
class ResumePoint:
    """A run's saved configs (with overrides applied) and the trainer state it continues from."""

    model_config: ModelConfig
    train_config: TrainConfig
    state: dict[str, Any]  # trainer_state.pt: optimizers, scaler, step, counters, RNG and data per rank


def resume_point(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> ResumePoint:
    """Read `run_dir/last/trainer_state.pt` (once) and the configs it holds, with `overrides` applied."""
    state = resume_state(run_dir)
    return ResumePoint(*saved_configs(state, run_dir, overrides), state)


def resume_configs(run_dir: str | Path, overrides: dict[str, Any] | None = None
                   ) -> tuple[ModelConfig, TrainConfig]:
    """The configs saved in `run_dir/last`, with `overrides` applied (e.g. a larger max_steps)."""
    return saved_configs(resume_state(run_dir, mmap=True), run_dir, overrides)


def saved_configs(state: dict[str, Any], run_dir: str | Path, overrides: dict[str, Any] | None
                  ) -> tuple[ModelConfig, TrainConfig]:
    """The configs of a trainer state with `overrides` applied; the model's shape cannot change and
    the output folder is `run_dir` whatever the saved one was."""
    saved_model = ModelConfig(**state["model_config"])
    saved_train = TrainConfig(**state["train_config"])
    model_config, train_config = apply_overrides(saved_model, saved_train, dict(overrides or {}))
    refuse_model_changes(saved_model, model_config, "the model's shape cannot change when resuming")
    return model_config, dataclasses.replace(train_config, out_dir=str(run_dir))


def unfinished_run(out_dir: Path) -> tuple[int, int] | None:
    """(step, max_steps) of the run in `out_dir` when it stopped before its last step, else None."""
    last = last_checkpoint(out_dir)
    if last is None or not (last / TRAINER_STATE_NAME).is_file():
        return None
    state = load_trainer_state(last, mmap=True)
    step, max_steps = state["step"], state["train_config"]["max_steps"]
    return (step, max_steps) if step < max_steps else None


def refuse_unfinished(out_dir: Path) -> None:
    """A new run may not overwrite a run that can still be continued."""
    if unfinished := unfinished_run(out_dir):
        raise UserError(f"{out_dir} holds an unfinished run (step {unfinished[0]} of {unfinished[1]}): "
                        f"continue it with --resume {out_dir}, or choose another --out")
