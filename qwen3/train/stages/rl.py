"""Reinforcement learning with verifiable rewards (GRPO) as a stage of the one loop: `qwen3 rl DIR`.

The data are prompts (data/prompts.py: `--data` files, or without them the embedded book task of
data/kjv.py) rendered with the checkpoint's chat template and split into training and held-out
prompts, as chat fine-tuning splits conversations. Each optimizer step (or every
`updates_per_rollout` steps) the rollout source (`Rollouts`):

1. takes this process's share of the step's `batch_size` prompts (shuffled anew each epoch);
2. samples `group_size` completions of each with the inference engine at `rollout_temperature`, at
   most `max_completion_tokens` each, every completion from a generator seeded by (seed, rollout,
   prompt, sample): the rollouts depend on the step alone, so a resumed run draws what an
   uninterrupted one would;
3. scores them with the reward (train/rewards.py) and gives each its advantage against its group,
   A = (r - mean(r_group)) / (std(r_group) + 1e-6): a group whose rewards are all equal teaches
   nothing (A = 0) and is counted as such;
4. computes, without gradients, every completion token's log-probability under the policy that
   sampled it (the `old` of the clipped ratio), its entropy and, with a reference, its KL to the
   starting model;

then hands the loop its micro-batches: (x, y, advantages, old, ref) with y = -100 except on the
completion tokens, the end-of-turn token included, so the model learns to stop. The loss is
`PolicyGradientLoss` (train/objectives.py), averaged over every completion token of the step.
Evaluation decodes the held-out prompts greedily: pass@1 (a reward of 1 or more passes) and the
mean reward; the best checkpoint is the one with the highest mean reward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from qwen3.config import TrainConfig
from qwen3.data.conversations import Conversation, held_out, pad_id
from qwen3.data.kjv import book_task
from qwen3.data.prompts import read_prompts
from qwen3.data.tokenizer import Tokenizer, load_tokenizer
from qwen3.errors import UserError, log
from qwen3.infer.engine import Engine
from qwen3.infer.sampling import SamplingParams
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.model.lora import lora_layers
from qwen3.model.loss import IGNORE
from qwen3.runtime import Distributed
from qwen3.train.objectives import PolicyGradientLoss, token_logprobs
from qwen3.train.parallel import BatchLayout
from qwen3.train.rewards import Reward, load_reward, score
from qwen3.train.stages.base import Stage, drawn
from qwen3.train.start import StartingModel

EMBEDDED = "builtin:kjv-book"
PASS = 1.0  # a reward at least this is a pass
EVAL_BATCH = 64  # held-out prompts decoded together


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: its record (for the reward), its rendered token ids, and where it came from."""

    record: dict[str, Any]
    ids: list[int]
    where: str

    @property
    def text(self) -> str:
        return self.record["messages"][-1]["content"]


@dataclasses.dataclass
class RewardScore:
    """The held-out evaluation of a policy: greedy pass@1 and mean reward over `prompts` prompts."""

    mean_reward: float
    pass_at_1: float
    prompts: int

    @property
    def loss(self) -> float:
        """What the best checkpoint minimizes: the negated mean reward."""
        return -self.mean_reward

    def metrics(self) -> dict[str, float]:
        return {"val_reward": self.mean_reward, "val_pass_at_1": self.pass_at_1}

    def summary(self) -> str:
        return f"mean reward {self.mean_reward:.4f} | pass@1 {self.pass_at_1:.2%} | {self.prompts:,} prompts"

    def report(self) -> list[tuple[str, str]]:
        return [("mean reward", f"{self.mean_reward:.4f}"), ("pass@1", f"{self.pass_at_1:.2%}"),
                ("prompts", f"{self.prompts:,}")]


def render_prompts(tokenizer: Tokenizer, records: list[dict[str, Any]], wheres: list[str],
                   thinking: bool | None) -> list[Prompt]:
    """Each record's messages in the chat template, ready for the reply (with `enable_thinking`
    when `thinking` says, for templates that read it)."""
    if not tokenizer.chat_template:
        raise UserError("reinforcement learning renders its prompts with a chat template; this tokenizer has none")
    options = {} if thinking is None else {"enable_thinking": thinking}
    return [Prompt(record, tokenizer.encode(tokenizer.apply_chat_template(record["messages"], True, **options)),
                   where) for record, where in zip(records, wheres)]


class ReinforcementLearning(Stage):
    """The training and held-out prompts, the reward, and the rollout settings of a run."""

    name = "rl"
    chat = True

    def __init__(self, config: TrainConfig, tokenizer: Tokenizer, train: list[Prompt], val: list[Prompt],
                 sources: list[str], seq_len: int, choice: str, reward: Reward) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.train = train
        self.val = val
        self.sources = sources
        self.seq_len = seq_len
        self.choice = choice
        self.reward = reward
        self.sequences_per_row = config.group_size  # a row of the batch layout is a prompt's group
        self.rollouts: Rollouts | None = None  # made by `batches`; its statistics are the log's

    @classmethod
    def prepare(cls, config: TrainConfig, tokenizer: str, context: int, progress: bool = False,
                training: bool = True) -> ReinforcementLearning:
        reward = load_reward(config.reward)  # a reward that cannot be imported stops the run before any work
        if not tokenizer:
            raise UserError("reinforcement learning starts from a checkpoint: qwen3 rl DIR")
        loaded = load_tokenizer(tokenizer)
        if config.data:
            train, val = [], []
            for source in config.data:
                for index, record in enumerate(read_prompts(source), start=1):
                    (val if held_out(Conversation(record["messages"]), config.val_fraction) else train).append(
                        (record, f"prompt {index} of {source}"))
        else:
            embedded = book_task()
            train = [(record, f"embedded prompt {index}") for index, record in enumerate(embedded[0], start=1)]
            val = [(record, f"embedded held-out prompt {index}") for index, record in enumerate(embedded[1], start=1)]
        if not train or not val:
            raise UserError(f"{len(train) + len(val)} prompt(s) split into {len(train)} for training and {len(val)} "
                            f"held out (val_fraction {config.val_fraction}): both need some")
        rendered = [render_prompts(loaded, [r for r, _ in split], [w for _, w in split], config.thinking)
                    for split in (train, val)]
        longest = max(len(prompt.ids) for split in rendered for prompt in split)
        needed = longest + config.max_completion_tokens
        row = config.seq_len or needed
        choice = (f"sequences of up to {row:,} tokens: "
                  + ("seq_len as set" if config.seq_len else f"the longest prompt is {longest:,} tokens, "
                                                             f"and a completion at most {config.max_completion_tokens:,}"))
        if needed > min(row, context):
            raise UserError(f"the longest prompt is {longest:,} tokens: with max_completion_tokens "
                            f"{config.max_completion_tokens} it needs {needed:,} positions, more than "
                            f"{'seq_len ' + str(row) if needed > row else f'the model context of {context:,}'}")
        stage = cls(config, loaded, *rendered, list(config.data) or [EMBEDDED], row, choice, reward)
        log(f"prompts from {', '.join(stage.sources)}: {len(stage.train):,} training, {len(stage.val):,} held out, "
            f"the longest {longest} tokens; {config.group_size} completions of at most "
            f"{config.max_completion_tokens} tokens each, reward {config.reward}")
        return stage

    def objective(self, model: Qwen3ForCausalLM) -> nn.Module:
        return PolicyGradientLoss(model, self.config.clip_epsilon, self.config.kl_beta, self.config.rollout_temperature)

    def batches(self, layout: BatchLayout, seed: int, processes: Distributed, model: Qwen3ForCausalLM,
                autocast: contextlib.AbstractContextManager) -> Rollouts:
        self.rollouts = Rollouts(self, layout, seed, processes, model, autocast)
        return self.rollouts

    def metrics(self, processes: Distributed) -> dict[str, float]:
        return self.rollouts.metrics(processes) if self.rollouts is not None else {}

    def evaluate(self, model: Qwen3ForCausalLM, batch_size: int, device: torch.device,
                 autocast: contextlib.AbstractContextManager, rank: int = 0, world_size: int = 1) -> RewardScore:
        """Greedy replies to every held-out prompt (rank r decodes prompts r, r + world_size, ...)."""
        mine = self.val[rank::world_size]
        engine = Engine(model, self.tokenizer)
        greedy = SamplingParams(temperature=0.0, max_new_tokens=self.config.max_completion_tokens)
        rewards = []
        was_training = model.training
        try:  # the engine decodes in the weights' dtype, with a cache of it: no autocast
            for start in range(0, len(mine), EVAL_BATCH):
                chunk = mine[start:start + EVAL_BATCH]
                replies = engine.generate_batch([prompt.ids for prompt in chunk], greedy)
                rewards += [score(self.reward, reply.text, prompt.record, prompt.where)
                            for prompt, reply in zip(chunk, replies)]
        finally:
            model.train(was_training)
        totals = torch.tensor([sum(rewards), sum(r >= PASS for r in rewards), len(rewards)], dtype=torch.float64,
                              device=device)
        if world_size > 1:
            dist.all_reduce(totals)
        reward_sum, passed, count = totals.tolist()
        return RewardScore(reward_sum / count, passed / count, int(count))

    def sample_prompts(self) -> list[str]:
        return [prompt.text for prompt in self.val[:3]]

    def units(self, batch: tuple[torch.Tensor, ...]) -> int:
        return int((batch[1] != IGNORE).sum())

    @property
    def eval_tokens(self) -> int:
        return len(self.val) * self.config.max_completion_tokens

    @property
    def summary(self) -> dict[str, Any]:
        return {"sources": self.sources, "train_prompts": len(self.train), "val_prompts": len(self.val),
                "row_tokens": self.seq_len, "reward": self.config.reward}

    @property
    def scored_on(self) -> str:
        return (f"held-out prompts, greedy replies of at most {self.config.max_completion_tokens} tokens, reward "
                f"{self.config.reward}")

    @property
    def choices(self) -> list[str]:
        return [self.choice]


@dataclasses.dataclass
class Rollout:
    """The sampled completions of one rollout batch, as tensors, and their statistics."""

    x: torch.Tensor           # (N, T) prompt + completion, minus the last token
    y: torch.Tensor           # (N, T) the next tokens, -100 off the completion
    advantages: torch.Tensor  # (N,)
    old: torch.Tensor         # (N, T) log-probabilities of y under the sampling policy
    ref: torch.Tensor         # (N, T) ... under the starting model (zeros without a reference)
    stats: dict[str, float]   # sums: reward, passes, completions, completion tokens, all-equal groups, ...


class Rollouts:
    """The micro-batches of rollouts a GRPO run learns from: an endless stream, resumable by its
    count of micro-batches drawn (and, between the updates of one rollout batch, the batch itself)."""

    def __init__(self, stage: ReinforcementLearning, layout: BatchLayout, seed: int, processes: Distributed,
                 model: Qwen3ForCausalLM, autocast: contextlib.AbstractContextManager) -> None:
        config = stage.config
        self.stage, self.seed, self.processes, self.model, self.autocast = stage, seed, processes, model, autocast
        self.micro_steps = layout.micro_steps
        self.prompts_per_step = layout.micro_steps * layout.rows  # this process's share of batch_size
        self.group, self.updates = config.group_size, config.updates_per_rollout
        self.sampling = SamplingParams(temperature=config.rollout_temperature, max_new_tokens=config.max_completion_tokens)
        was_training = model.training
        self.engine = Engine(model, stage.tokenizer)  # one engine: its cache serves every rollout
        model.train(was_training)
        # The starting model, for the KL term and its metric: free under LoRA, a second model otherwise.
        self.reference = StartingModel(model, config.init_from) if config.kl_beta > 0 or lora_layers(model) else None
        self.drawn = 0  # micro-batches handed out
        self.current: tuple[int, Rollout] | None = None  # (rollout index, its tensors)
        self.totals: dict[str, float] = {}  # statistics since the last log

    def __iter__(self) -> Rollouts:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        step, micro = divmod(self.drawn, self.micro_steps)
        index = step // self.updates
        if self.current is None or self.current[0] != index:
            start = time.perf_counter()
            self.current = (index, self.generate(index))
            self.current[1].stats.update(rollouts=1.0, rollout_seconds=time.perf_counter() - start)
            for key, value in self.current[1].stats.items():
                self.totals[key] = self.totals.get(key, 0.0) + value
        rollout = self.current[1]
        self.drawn += 1
        rows = slice(micro * len(rollout.x) // self.micro_steps, (micro + 1) * len(rollout.x) // self.micro_steps)
        return rollout.x[rows], rollout.y[rows], rollout.advantages[rows], rollout.old[rows], rollout.ref[rows]

    def prompts_of(self, index: int) -> list[tuple[int, Prompt]]:
        """(global index, prompt) of this process's share of rollout `index`: the epochs' shuffles
        of the training prompts, read in order, every process its slice of each rollout's."""
        train = self.stage.train
        return [(position, train[item]) for position, item in drawn(
            self.seed, len(train), self.prompts_per_step, index, self.processes.rank, self.processes.world_size)]

    def generate(self, index: int) -> Rollout:
        """Sample, score and tensorize rollout `index` with the current policy."""
        prompts = self.prompts_of(index)
        params = [dataclasses.replace(self.sampling, seed=hash_seed(self.seed, index, position, sample))
                  for position, _ in prompts for sample in range(self.group)]
        was_training = self.model.training
        self.model.eval()
        try:  # sampled in the weights' dtype (the engine's cache is theirs); scored below under autocast
            replies = self.engine.generate_batch([prompt.ids for _, prompt in prompts for _ in range(self.group)],
                                                 params)
        finally:
            self.model.train(was_training)
        expanded = [prompt for _, prompt in prompts for _ in range(self.group)]  # prompt i's samples, in order
        rewards = torch.tensor([score(self.stage.reward, reply.text, prompt.record, prompt.where)
                                for prompt, reply in zip(expanded, replies)],
                               dtype=torch.float64).view(len(prompts), self.group)
        advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).flatten()
        x, y = pad_rows([prompt.ids + reply.token_ids for prompt, reply in zip(expanded, replies)],
                        [len(prompt.ids) for prompt in expanded], self.stage.tokenizer)
        old, ref, entropy, kl = self.logprobs(x, y)
        tokens = int((y != IGNORE).sum())
        stats = {"reward": float(rewards.sum()), "passes": float((rewards >= PASS).sum()),
                 "completions": float(rewards.numel()), "completion_tokens": float(tokens),
                 "equal_groups": float((rewards.std(1) == 0).sum()), "groups": float(len(prompts)),
                 "entropy": entropy, "kl": kl}
        return Rollout(x, y, advantages.float(), old, ref, stats)

    @torch.no_grad()
    def logprobs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """Per-token log-probabilities of y under the policy and the reference (N, T), and the sums
        of the entropy and the KL (k3) over the completion tokens."""
        device = self.model.model.embed_tokens.weight.device
        temperature = self.stage.config.rollout_temperature
        old, ref = torch.zeros(x.shape), torch.zeros(x.shape)
        entropy = kl = 0.0
        learned = y != IGNORE
        for start in range(0, len(x), EVAL_BATCH):
            rows = slice(start, start + EVAL_BATCH)
            xs, ys = x[rows].to(device), y[rows].to(device)
            with self.autocast:
                logp, token_entropy = token_logprobs(self.model, xs, ys, temperature)
                old[rows][learned[rows]] = logp.float().cpu()
                entropy += float(token_entropy.sum())
                if self.reference is not None:
                    with self.reference() as reference:
                        reference_logp, _ = token_logprobs(reference, xs, ys, temperature)
                    ref[rows][learned[rows]] = reference_logp.float().cpu()
                    log_ratio = reference_logp - logp
                    kl += float((log_ratio.exp() - log_ratio - 1).sum())
        return old, ref, entropy, kl

    def metrics(self, processes: Distributed) -> dict[str, float]:
        """The rollouts' statistics since the last call, over every process (a collective under DDP)."""
        keys = ["reward", "passes", "completions", "completion_tokens", "equal_groups", "groups", "entropy", "kl",
                "rollouts", "rollout_seconds"]
        totals = torch.tensor([self.totals.get(key, 0.0) for key in keys], dtype=torch.float64,
                              device=processes.device)
        if processes.world_size > 1:
            dist.all_reduce(totals)
        self.totals = {}
        sums = dict(zip(keys, totals.tolist()))
        if not sums["completions"]:
            return {}
        tokens = max(sums["completion_tokens"], 1.0)
        values = {"reward": sums["reward"] / sums["completions"], "pass_rate": sums["passes"] / sums["completions"],
                  "completion_tokens": sums["completion_tokens"] / sums["completions"],
                  "equal_groups": sums["equal_groups"] / sums["groups"], "entropy": sums["entropy"] / tokens,
                  # seconds to sample, score and take the log-probabilities of one rollout batch (the
                  # slowest process's share is what a step waits for; this is their mean)
                  "rollout_s": sums["rollout_seconds"] / sums["rollouts"]}
        if self.reference is not None:
            values["kl"] = sums["kl"] / tokens
        return values

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"seed": self.seed, "drawn": self.drawn}
        if self.updates > 1 and self.current is not None:  # the rollout batch its next updates reuse
            state["current"] = (self.current[0], dataclasses.asdict(self.current[1]))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.drawn = state["seed"], state["drawn"]
        if "current" in state:
            index, tensors = state["current"]
            self.current = (index, Rollout(**tensors))


def hash_seed(*parts: int) -> int:
    """A seed for one completion from the run's seed and its place (rollout, prompt, sample)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))


def pad_rows(sequences: list[list[int]], prompt_lengths: list[int], tokenizer: Tokenizer
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (N, T) of prompt + completion sequences: y is -100 on the prompt's targets and the padding."""
    pad = pad_id(tokenizer)
    width = max(len(sequence) for sequence in sequences) - 1
    x = torch.full((len(sequences), width), pad, dtype=torch.long)
    y = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    for row, (sequence, prompt) in enumerate(zip(sequences, prompt_lengths)):
        ids = torch.tensor(sequence)
        x[row, :len(sequence) - 1] = ids[:-1]
        y[row, prompt - 1:len(sequence) - 1] = ids[prompt:]
    return x, y


def pass_at_k(passes: int, samples: int, k: int) -> float:
    """The unbiased estimate of pass@k from `passes` of `samples` (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if samples - passes < k:
        return 1.0
    return 1.0 - math.comb(samples - passes, k) / math.comb(samples, k)
