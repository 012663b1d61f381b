"""Where a run starts: a fresh initialization, a checkpoint's weights (`--init-from`), or the run's
own last/ checkpoint (`--resume`).

`ModelSource` builds the run's model: the shape of the config with the tokenizer's vocabulary, or
the weights (and tokenizer) of a checkpoint folder. A resumed run continues with the configs it
saved (overrides may extend it, e.g. a larger max_steps, but not change the model's shape) in its
own folder: `resume_configs` reads them, the loop then reads the rest of trainer_state.pt once.
`StartingModel` is the model a run started from, for the stages that compare the policy with it.
`resume_configs` and `unfinished_run` only look at the configs or the step and map the file's
tensors instead of reading them, which costs nothing whatever the model's size.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from qwen3.config import ModelConfig, TrainConfig, apply_overrides, refuse_model_changes
from qwen3.data.tokenizer import Tokenizer
from qwen3.errors import UserError
from qwen3.model.checkpoint import (TRAINER_STATE_NAME, CheckpointError, find_checkpoint, last_checkpoint, load_config,
                                    load_model, load_trainer_state, resume_state)
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.model.lora import adapters_off, lora_layers


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


def resume_configs(run_dir: str | Path, overrides: dict[str, Any] | None = None
                   ) -> tuple[ModelConfig, TrainConfig]:
    """The configs saved in `run_dir/last`, with `overrides` applied (e.g. a larger max_steps); the
    model's shape cannot change and the output folder is `run_dir` whatever the saved one was."""
    state = resume_state(run_dir, mmap=True)
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


class StartingModel:
    """The model a run started from, to compare the policy with (RL's KL term, DPO's reference):
    under LoRA the model itself with its adapters off; while no step has changed it (`unchanged`),
    the model itself; else a frozen copy of `init_from`, loaded once. `with starting() as model:`."""

    def __init__(self, model: Qwen3ForCausalLM, init_from: str, unchanged: bool = False) -> None:
        self.model = model
        self.lora = bool(lora_layers(model))
        self.copy: Qwen3ForCausalLM | None = None
        if not self.lora and not unchanged:
            weight = model.model.embed_tokens.weight
            self.copy = load_model(init_from, device=weight.device, dtype=weight.dtype).requires_grad_(False)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[Qwen3ForCausalLM]:
        if self.copy is not None:
            yield self.copy
        elif self.lora:
            with adapters_off(self.model):
                yield self.model
        else:
            yield self.model
