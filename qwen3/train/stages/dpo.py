"""Direct preference optimization (DPO) as a stage of the one loop: `qwen3 dpo DIR --data PAIRS.jsonl`.

The pairs (data/prompts.py, TRL's preference format; without `--data` the embedded book pairs of
data/kjv.py: the right book chosen, another rejected) are split by a hash of their prompt into
training and held-out pairs, and each side rendered with the checkpoint's chat template: the prompt
and its reply, only the reply's tokens (and its end-of-turn token) learned. The reference is the
starting model: before the first step it scores the held-out replies and the training pairs the
run's steps will draw (a 10-step trial scores 80 pairs, not the whole set), each pair once, kept
with the run's saved state so that a resumed run compares with the same numbers; a resumed run
that goes further scores the rest from the base with the adapters off (LoRA) or a copy of the
starting checkpoint. A micro-batch is B pairs: the B chosen rows, then their B rejected
ones; the loss is `PreferenceLoss` (train/objectives.py), averaged over the step's pairs.
Evaluation: the held-out pairs' DPO loss, preference accuracy (the share whose implicit reward
beta [(logp(c) - ref(c)) - (logp(r) - ref(r))] is positive) and mean reward margin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from qwen3.config import TrainConfig
from qwen3.data.conversations import Conversation, Messages, held_out, pad_id, render
from qwen3.data.kjv import book_pairs
from qwen3.data.prompts import read_pairs
from qwen3.data.tokenizer import Tokenizer, load_tokenizer
from qwen3.errors import UserError, log
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.model.loss import IGNORE
from qwen3.runtime import Distributed
from qwen3.train.objectives import PreferenceLoss, sequence_logprobs
from qwen3.train.parallel import BatchLayout
from qwen3.train.stages.base import Stage, drawn, longest_sequence
from qwen3.train.stages.rl import EVAL_BATCH
from qwen3.train.start import StartingModel

EMBEDDED = "builtin:kjv-book-pairs"


@dataclasses.dataclass
class Pairs:
    """Rendered pairs: rows (2, N, T) of inputs and targets, [0] chosen, [1] rejected; the prompts' texts."""

    x: torch.Tensor
    y: torch.Tensor
    prompts: list[str]
    too_long: int  # pairs dropped: a side longer than a row


def render_side(tokenizer: Tokenizer, prompt: Messages, reply: Messages) -> tuple[list[int], list[bool]]:
    """The conversation's ids and which of them are learned: the reply's, and its end-of-turn token."""
    rendered = render(tokenizer, prompt + reply)
    learned = list(rendered.learned)
    last_start = max((i for i in range(1, len(learned)) if learned[i] and not learned[i - 1]), default=0)
    return rendered.ids, [flag and index >= last_start for index, flag in enumerate(learned)]


def render_pairs(tokenizer: Tokenizer, pairs: list[dict[str, Messages]], row_tokens: int) -> Pairs:
    """Both sides of every pair as rows of `row_tokens` + 1 tokens (x and y shifted by one)."""
    kept, too_long = [], 0
    for pair in pairs:
        sides = [render_side(tokenizer, pair["prompt"], pair[side]) for side in ("chosen", "rejected")]
        if max(len(ids) for ids, _ in sides) > row_tokens + 1:
            too_long += 1
            continue
        kept.append((pair["prompt"][-1]["content"], sides))
    pad = pad_id(tokenizer)
    x = torch.full((2, len(kept), row_tokens), pad, dtype=torch.long)
    y = torch.full((2, len(kept), row_tokens), IGNORE, dtype=torch.long)
    for row, (_, sides) in enumerate(kept):
        for side, (ids, learned) in enumerate(sides):
            ids_tensor = torch.tensor(ids)
            x[side, row, :len(ids) - 1] = ids_tensor[:-1]
            y[side, row, :len(ids) - 1] = torch.where(torch.tensor(learned[1:]), ids_tensor[1:], IGNORE)
    return Pairs(x, y, [prompt for prompt, _ in kept], too_long)


class PreferenceOptimization(Stage):
    """The rendered training and held-out pairs, and (once computed) the reference's log-probabilities."""

    name = "dpo"
    chat = True

    def __init__(self, config: TrainConfig, tokenizer: Tokenizer, train: Pairs, val: Pairs, sources: list[str],
                 seq_len: int, choice: str) -> None:
        self.config, self.tokenizer, self.train, self.val, self.sources, self.seq_len, self.choice = (
            config, tokenizer, train, val, sources, seq_len, choice)
        self.reference: dict[str, torch.Tensor] = {}  # "train", "val": (2, N) summed log-probabilities, NaN: not yet

    @classmethod
    def prepare(cls, config: TrainConfig, tokenizer: str, context: int, progress: bool = False,
                training: bool = True) -> PreferenceOptimization:
        if not tokenizer:
            raise UserError("preference optimization starts from a checkpoint: qwen3 dpo DIR")
        loaded = load_tokenizer(tokenizer)
        if not loaded.chat_template:
            raise UserError("DPO renders its pairs with a chat template; this tokenizer has none")
        if config.data:
            pairs = [pair for source in config.data for pair in read_pairs(source)]
            val_prompts = [held_out(Conversation(pair["prompt"]), config.val_fraction) for pair in pairs]
            train = [pair for pair, held in zip(pairs, val_prompts) if not held]
            val = [pair for pair, held in zip(pairs, val_prompts) if held]
        else:
            train, val = book_pairs()
        if not train or not val:
            raise UserError(f"{len(train) + len(val)} pair(s) split into {len(train)} for training and {len(val)} "
                            f"held out (val_fraction {config.val_fraction}): both need some")
        longest = max(len(render_side(loaded, pair["prompt"], pair[side])[0])
                      for pair in train + val for side in ("chosen", "rejected"))
        bound, why = longest_sequence(config, context)
        row = config.seq_len or min(longest - 1, bound)
        choice = (f"rows of {row + 1:,} tokens: " + ("seq_len as set" if config.seq_len else
                  f"the longest side of a pair is {longest:,} tokens" + ("" if longest - 1 <= bound else f", {why}")))
        stage = cls(config, loaded, render_pairs(loaded, train, row), render_pairs(loaded, val, row),
                    list(config.data) or [EMBEDDED], row, choice)
        if not len(stage.train.prompts) or not len(stage.val.prompts):
            raise UserError(f"every {'training' if not len(stage.train.prompts) else 'held-out'} pair is longer than "
                            f"seq_len + 1 = {row + 1} tokens: raise seq_len")
        log(f"pairs from {', '.join(stage.sources)}: {len(stage.train.prompts):,} training, "
            f"{len(stage.val.prompts):,} held out, rows of {row + 1} tokens; "
            f"{stage.train.too_long + stage.val.too_long:,} longer than a row dropped")
        return stage

    def objective(self, model: Qwen3ForCausalLM) -> nn.Module:
        return PreferenceLoss(model, self.config.dpo_beta)

    def batches(self, layout: BatchLayout, seed: int, processes: Distributed, model: Qwen3ForCausalLM,
                autocast: contextlib.AbstractContextManager) -> PairBatches:
        return PairBatches(self, layout.rows, seed, processes, model, autocast,
                           planned=self.config.max_steps * layout.micro_steps)

    def reference_logprobs(self, model: Qwen3ForCausalLM, autocast: contextlib.AbstractContextManager, split: str,
                           indices: list[int], unchanged: bool) -> torch.Tensor:
        """The starting model's summed log-probabilities of the chosen and rejected replies of the
        pairs `indices` of `split` ("train" or "val"), (2, len(indices)); each pair is scored once and
        kept. `unchanged`: `model` is still the starting model (no step yet); else the starting model
        is its base with the adapters off (LoRA) or a copy of init_from, loaded for the call."""
        pairs = self.train if split == "train" else self.val
        known = self.reference.setdefault(split, torch.full((2, pairs.x.shape[1]), math.nan, dtype=torch.float64))
        missing = sorted({index for index in indices if math.isnan(known[0, index])})
        if missing:
            log(f"reference log-probabilities of {len(missing):,} {'training' if split == 'train' else 'held-out'} "
                f"pairs from the starting model (once; saved with the run)")
            with StartingModel(model, self.config.init_from, unchanged)() as reference, autocast:
                known[:, missing] = logprobs_of(reference, Pairs(pairs.x[:, missing], pairs.y[:, missing], [], 0))
        return known[:, indices]

    def evaluate(self, model: Qwen3ForCausalLM, batch_size: int, device: torch.device,
                 autocast: contextlib.AbstractContextManager, rank: int = 0, world_size: int = 1) -> PreferenceScore:
        """The held-out pairs' loss, accuracy and margin (rank r scores pairs r, r + world_size, ...)."""
        mine = list(range(rank, self.val.x.shape[1], world_size))
        # scored before the first step in a run; under `qwen3 eval`, from the checkpoint the run started from
        reference = self.reference_logprobs(model, autocast, "val", mine, unchanged=False)
        with autocast:
            policy = logprobs_of(model, Pairs(self.val.x[:, mine], self.val.y[:, mine], [], 0))
        chosen, rejected = (policy - reference).float()  # each (N,): log pi - log ref
        margins = self.config.dpo_beta * (chosen - rejected)
        totals = torch.tensor([float(-F.logsigmoid(margins).sum()), float((margins > 0).sum()), float(margins.sum()),
                               len(margins)], dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(totals)
        loss, right, margin, count = totals.tolist()
        return PreferenceScore(loss / count, right / count, margin / count, int(count))

    def sample_prompts(self) -> list[str]:
        return self.val.prompts[:3]

    def units(self, batch: tuple[torch.Tensor, ...]) -> int:
        return len(batch[0]) // 2  # pairs: each is a chosen and a rejected row

    @property
    def eval_tokens(self) -> int:
        return 2 * len(self.val.prompts) * self.seq_len

    @property
    def summary(self) -> dict[str, Any]:
        return {"sources": self.sources, "train_pairs": len(self.train.prompts), "val_pairs": len(self.val.prompts),
                "row_tokens": self.seq_len + 1, "dropped_too_long": self.train.too_long + self.val.too_long}

    @property
    def scored_on(self) -> str:
        return f"held-out preference pairs, the replies' tokens, rows of {self.seq_len + 1}"

    @property
    def choices(self) -> list[str]:
        return [self.choice]


@dataclasses.dataclass
class PreferenceScore:
    """The held-out evaluation of a DPO run."""

    loss: float       # the DPO loss, what the best checkpoint minimizes
    accuracy: float   # pairs whose implicit reward margin is positive
    margin: float     # mean implicit reward margin
    pairs: int

    def metrics(self) -> dict[str, float]:
        return {"val_loss": self.loss, "val_preference_accuracy": self.accuracy, "val_reward_margin": self.margin}

    def summary(self) -> str:
        return (f"loss {self.loss:.4f} | preference accuracy {self.accuracy:.2%} | reward margin "
                f"{self.margin:.4f} | {self.pairs:,} pairs")

    def report(self) -> list[tuple[str, str]]:
        return [("loss", f"{self.loss:.4f}"), ("preference accuracy", f"{self.accuracy:.2%}"),
                ("reward margin", f"{self.margin:.4f}"), ("pairs", f"{self.pairs:,}")]


@torch.no_grad()
def logprobs_of(model: Qwen3ForCausalLM, pairs: Pairs) -> torch.Tensor:
    """(2, N) summed log-probabilities of each side's learned tokens."""
    device = model.model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    rows = []
    for side in range(2):
        rows.append(torch.cat([sequence_logprobs(model, pairs.x[side, start:start + EVAL_BATCH].to(device),
                                                 pairs.y[side, start:start + EVAL_BATCH].to(device)).double().cpu()
                               for start in range(0, pairs.x.shape[1], EVAL_BATCH)]))
    model.train(was_training)
    return torch.stack(rows)


class PairBatches:
    """An endless stream of pair micro-batches, shuffled anew each epoch as PackedRows does. The
    first draw of a run scores, with the model as it is then (the starting one), the held-out pairs
    and every training pair its `planned` micro-batches will draw on any process."""

    def __init__(self, stage: PreferenceOptimization, rows: int, seed: int, processes: Distributed,
                 model: Qwen3ForCausalLM, autocast: contextlib.AbstractContextManager, planned: int) -> None:
        self.stage, self.rows, self.seed, self.processes, self.model, self.autocast = (
            stage, rows, seed, processes, model, autocast)
        self.planned = planned
        self.steps = 0

    def __iter__(self) -> PairBatches:
        return self

    def pairs_of(self, step: int, rank: int) -> list[int]:
        """The training pairs of micro-batch `step` of process `rank`."""
        return [pair for _, pair in drawn(self.seed, self.stage.train.x.shape[1], self.rows, step, rank,
                                          self.processes.world_size)]

    def __next__(self) -> tuple[torch.Tensor, ...]:
        indices = self.pairs_of(self.steps, self.processes.rank)
        reference = self.stage.reference.get("train")
        if reference is None or any(math.isnan(reference[0, index]) for index in indices):
            # score what the rest of the run draws, on every process alike, in one pass
            ahead = sorted({index for step in range(self.steps, max(self.planned, self.steps + 1))
                            for rank in range(self.processes.world_size) for index in self.pairs_of(step, rank)})
            unchanged = self.steps == 0
            if unchanged:
                self.stage.reference_logprobs(self.model, self.autocast, "val", list(range(self.stage.val.x.shape[1])),
                                              unchanged)
            self.stage.reference_logprobs(self.model, self.autocast, "train", ahead, unchanged)
        reference = self.stage.reference_logprobs(self.model, self.autocast, "train", indices, unchanged=False)
        self.steps += 1
        train = self.stage.train
        return (torch.cat([train.x[0, indices], train.x[1, indices]]), torch.cat([train.y[0, indices],
                                                                                  train.y[1, indices]]),
                torch.cat([reference[0], reference[1]]).float())

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "steps": self.steps, "reference": self.stage.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.steps, self.stage.reference = state["seed"], state["steps"], state["reference"]

