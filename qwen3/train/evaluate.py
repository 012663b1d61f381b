"""Evaluation on the whole validation split: loss, token accuracy, perplexity, bits per byte.

The seed scored a few overlapping windows drawn from the training stream. Here every validation
token is scored exactly once, as a target of the non-overlapping windows of `eval_windows`, so two
evaluations of the same checkpoint agree and runs can be compared. Bits per byte divides the total
loss by the UTF-8 size of the text instead of the number of tokens, which makes models with
different tokenizers comparable. Training calls `evaluate` at its evaluation steps; `qwen3 eval`
calls `evaluate_checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from qwen3.model.checkpoint import find_checkpoint, load_model
from qwen3.config import TrainConfig
from qwen3.errors import UserError, print_to_stderr
from qwen3.model.loss import loss_and_hits
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.runtime import autocast_for, resolve_device, resolve_dtype
from qwen3.data.store import prepare
from qwen3.data.tokenizer import load_tokenizer
from qwen3.data.windows import eval_windows


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


def evaluate(model: Qwen3ForCausalLM, tokens: np.ndarray, seq_len: int, batch_size: int, num_bytes: int,
             device: torch.device | str = "cpu",
             autocast: contextlib.AbstractContextManager | None = None,
             rank: int = 0, world_size: int = 1) -> EvalResult:
    """Score every token of `tokens` (the validation split, `num_bytes` UTF-8 bytes of text) with
    `model`'s body (`model.model`: ids -> hidden states) and head (`model.lm_head.weight`).

    With several processes, rank r scores batches r, r + world_size, ... and the sums are
    all-reduced, so every rank returns the same result.
    """
    result = score_batches(model, eval_windows(tokens, seq_len, batch_size), num_bytes, device, autocast,
                           rank, world_size)
    if result is None:
        raise UserError(f"the validation split has {len(tokens)} token(s): nothing to evaluate")
    return result


@torch.no_grad()
def score_batches(model: Qwen3ForCausalLM, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_bytes: int,
                  device: torch.device | str = "cpu",
                  autocast: contextlib.AbstractContextManager | None = None,
                  rank: int = 0, world_size: int = 1) -> EvalResult | None:
    """The metrics of `model` over (x, y) batches whose targets of -100 are not scored (None when no
    target is); `num_bytes` is the UTF-8 size of the scored text. Rank r scores batches r,
    r + world_size, ... and the sums are all-reduced."""
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


def run_config_of(checkpoint: Path) -> TrainConfig:
    """The training config of the run a checkpoint belongs to (its run.json beside or above it),
    else the defaults: evaluation then uses the same data split and window length as training."""
    for folder in (checkpoint, checkpoint.parent):
        file = folder / "run.json"
        if file.is_file():
            try:
                return TrainConfig(**json.loads(file.read_text(encoding="utf-8"))["train"])
            except (json.JSONDecodeError, KeyError, TypeError, UserError) as error:
                raise UserError(f"{file}: not a run description this version can read ({error})") from None
    return TrainConfig()


def evaluate_checkpoint(path: str | Path, sources: list[str] | None = None, device: str = "auto",
                        log: Callable[[str], None] = print_to_stderr) -> tuple[EvalResult, dict[str, Any]]:
    """Evaluate a checkpoint (or a run folder's best/) on the validation split of `sources`.

    The text is tokenized with the checkpoint's own tokenizer; `sources` default to the data the run
    trained on (from its run.json), else the embedded corpus. A chat fine-tuning run is scored as it
    was trained: on the replies of its held-out conversations (`sources` are then conversation
    files). Returns the result and a description of what was evaluated.
    """
    folder = find_checkpoint(path)
    run = run_config_of(folder)
    resolved = resolve_device(device)
    model = load_model(folder, device=resolved)
    seq_len = run.seq_len or model.config.max_position_embeddings
    vocab_size = load_tokenizer(folder).vocab_size
    if vocab_size > model.config.vocab_size:
        raise UserError(f"{folder}: the tokenizer has {vocab_size} tokens but the model only "
                        f"{model.config.vocab_size}")
    try:  # the autocast training used; a float16 run evaluated on the CPU gets this device's own
        dtype = resolve_dtype(run.dtype, resolved)
    except UserError:
        dtype = resolve_dtype("auto", resolved)
    autocast = autocast_for(resolved, dtype)
    data_sources = sources if sources is not None else run.data
    if run.stage == "sft":
        from qwen3.train.stages.sft import evaluate_conversations, prepare_conversations  # qwen3.train.stages.sft imports this module

        data = prepare_conversations(replace(run, data=data_sources), str(folder), seq_len, False, log)
        result = evaluate_conversations(model, data, seq_len, run.batch_size, resolved, autocast)
        split = f"held-out conversations, the replies' tokens, rows of {seq_len + 1}"
    else:
        data = prepare(data_sources, tokenizer=str(folder), val_fraction=run.val_fraction,
                       cache_dir=run.cache_dir, min_tokens=2, log=log)
        result = evaluate(model, data.val_tokens, seq_len, run.batch_size, data.val_bytes, resolved, autocast)
        split = f"validation split, windows of {seq_len}"
    info = {"checkpoint": str(folder), "sources": data.summary["sources"], "split": split, "seq_len": seq_len,
            "device": str(resolved), "autocast_dtype": str(dtype).removeprefix("torch.")}
    return result, info
