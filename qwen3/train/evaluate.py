"""`qwen3 eval DIR`: a checkpoint scored on the held-out data of the run that made it.

The checkpoint's run.json (beside or above it) says which stage trained it, on which data, split
how and in windows of what length; the run's stage prepares that data again (from the token
store's cache, or the conversations) with the checkpoint's own tokenizer, and scores it as training
did (train/metrics.py). Without a run.json, the defaults: pretraining on the embedded corpus.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from qwen3.config import TrainConfig
from qwen3.data.tokenizer import load_tokenizer
from qwen3.errors import UserError, read_json_object
from qwen3.model.checkpoint import find_checkpoint, load_model
from qwen3.runtime import autocast_for, resolve_device, resolve_dtype
from qwen3.train.metrics import EvalResult
from qwen3.train.stages import stage_class


def run_config_of(checkpoint: Path) -> TrainConfig:
    """The training config of the run a checkpoint belongs to (its run.json beside or above it),
    else the defaults: evaluation then uses the same data split and window length as training."""
    for folder in (checkpoint, checkpoint.parent):
        file = folder / "run.json"
        if file.is_file():
            try:
                return TrainConfig(**read_json_object(file)["train"])
            except (KeyError, TypeError, UserError) as error:
                raise UserError(f"{file}: not a run description this version can read ({error})") from None
    return TrainConfig()


def evaluate_checkpoint(path: str | Path, sources: list[str] | None = None,
                        device: str = "auto") -> tuple[EvalResult, dict[str, Any]]:
    """Evaluate a checkpoint (or a run folder's best/) on the held-out split of `sources`.

    `sources` default to the data the run trained on (from its run.json), else the embedded corpus;
    they are of the run's stage (text for pretraining, conversation files for chat fine-tuning).
    Returns the result and a description of what was evaluated.
    """
    folder = find_checkpoint(path)
    run = run_config_of(folder)
    stage_type = stage_class(run.stage)
    resolved = resolve_device(device)
    model = load_model(folder, device=resolved)
    vocab_size = load_tokenizer(folder).vocab_size
    if vocab_size > model.config.vocab_size:
        raise UserError(f"{folder}: the tokenizer has {vocab_size} tokens but the model only "
                        f"{model.config.vocab_size}")
    try:  # the autocast training used; a float16 run evaluated on the CPU gets this device's own
        dtype = resolve_dtype(run.dtype, resolved)
    except UserError:
        dtype = resolve_dtype("auto", resolved)
    data = replace(run, data=sources if sources is not None else run.data)
    stage = stage_type.prepare(data, str(folder), model.config.max_position_embeddings, progress=True,
                               training=False)
    result = stage.evaluate(model, run.batch_size, resolved, autocast_for(resolved, dtype))
    info = {"checkpoint": str(folder), "sources": stage.summary["sources"], "split": stage.scored_on,
            "seq_len": stage.seq_len, "device": str(resolved), "autocast_dtype": str(dtype).removeprefix("torch.")}
    return result, info
