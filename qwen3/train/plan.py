"""What a training run will do and how long it will take, said before it has gone far.

The plan is what the configuration fixes: steps, training tokens, evaluations, and the FLOPs of a
training token (`flops_per_token`, what MFU is measured with); below it, a line for each choice the
stage made from its data (the sequence length, the split: `Stage.choices`). The estimate comes
from timing a few steps: the first step of the process is left out (it pays for allocations, and
under torch.compile for compiling), then steps are timed until three are or thirty seconds have
passed, whichever comes first: a tiny or seed-sized model is timed over three steps (one step
alone varies several-fold where other work shares the CPU), and a large one whose step takes
minutes after one. The device is synchronized around each timed step, since a GPU
step otherwise returns when its kernels are queued, not when they have run.

    whole run = wall-clock so far + steps left x seconds per step + evaluations left x one evaluation

An evaluation is estimated, not measured (the first may be many steps away): it is one forward
pass over `eval_tokens` validation tokens, and a forward pass costs about a third of a training
step per token (2 of the 6 FLOPs per weight and token of `flops_per_token`; backward is the
other 4), so one evaluation takes eval_tokens / (3 x training tokens/s). Saving
best/ and last/ and redrawing loss.png at each evaluation are not counted.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from qwen3.config import ModelConfig
from qwen3.runtime import synchronize
from qwen3.train.runfiles import format_duration

TIMED_STEPS = 3          # steps timed after the warm-up step, at most ...
TIMED_SECONDS = 30.0     # ... or fewer once their time reaches this
FORWARD_SHARE = 1 / 3    # a forward pass's cost per token, as a share of a training step's


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight of every matmul (2 forward, 4 backward), plus the
    attention scores and weighted sums, 12 * layers * heads * head_dim * seq_len (PaLM, appendix B;
    the causal mask's halving is not discounted). The embedding lookup is free; the LM head is not."""
    c, d = config.hidden_size, config.head_dim
    attention = c * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)  # q, o, k, v
    mlp = 3 * c * config.intermediate_size  # gate, up, down
    matmul_weights = config.num_hidden_layers * (attention + mlp) + config.vocab_size * c  # + LM head
    return 6.0 * matmul_weights + 12.0 * config.num_hidden_layers * config.num_attention_heads * d * seq_len


@dataclass
class RunPlan:
    """The steps this process will take and the work they are; once a few are timed, the estimate
    of the whole run's wall-clock."""

    first_step: int       # 1, or the resumed step + 1
    max_steps: int
    tokens_per_step: int  # all processes together
    eval_interval: int
    eval_tokens: int      # tokens one evaluation passes through the model
    timed_steps: int = 0
    timed_seconds: float = 0.0
    timed_until: int | None = None  # the step whose timing completed the measurement
    choices: list[str] = field(default_factory=list)  # what the stage chose, and why, a line each

    @property
    def steps(self) -> int:
        return self.max_steps - self.first_step + 1

    def evaluations_after(self, step: int) -> int:
        """Evaluations still to come once `step` steps are done: every eval_interval and at the end."""
        if step >= self.max_steps:
            return 0
        return self.max_steps // self.eval_interval - step // self.eval_interval + bool(self.max_steps % self.eval_interval)

    def describe(self) -> str:
        return (f"plan: {self.steps:,} steps x {self.tokens_per_step:,} tokens = "
                f"{self.steps * self.tokens_per_step:,} training tokens, "
                f"{evaluations(self.evaluations_after(self.first_step - 1))} of {self.eval_tokens:,} tokens"
                + "".join(f"\n  {choice}" for choice in self.choices))

    @contextlib.contextmanager
    def timing(self, step: int, device: torch.device) -> Iterator[None]:
        """Around optimizer step `step`: time it when it is one of the measured ones (not the
        process's first, and only until the measurement is complete: `timed_until`)."""
        if self.timed_until is not None or self.steps < 2 or step == self.first_step:
            yield
            return
        synchronize(device)
        start = time.perf_counter()
        yield
        synchronize(device)
        self.timed_steps += 1
        self.timed_seconds += time.perf_counter() - start
        if self.timed_steps == TIMED_STEPS or self.timed_seconds >= TIMED_SECONDS or step == self.max_steps:
            self.timed_until = step

    def estimate(self, step: int, elapsed: float) -> dict[str, Any]:
        """The estimate once `step` steps are done after `elapsed` seconds, as metrics.jsonl keys."""
        step_s = self.timed_seconds / self.timed_steps
        eval_s = self.eval_tokens * FORWARD_SHARE / (self.tokens_per_step / step_s)
        evaluations_left = self.evaluations_after(step)
        return {"estimated_total_s": round(elapsed + (self.max_steps - step) * step_s + evaluations_left * eval_s, 3),
                "estimated_step_s": step_s, "estimated_eval_s": eval_s, "estimated_evaluations": evaluations_left,
                "timed_steps": self.timed_steps}

    def describe_estimate(self, step: int, elapsed: float, estimate: dict[str, Any]) -> str:
        return (f"estimated wall-clock of the whole run: {format_duration(estimate['estimated_total_s'])} "
                f"({format_duration(elapsed)} so far + {self.max_steps - step:,} steps x "
                f"{estimate['estimated_step_s']:.3g} s + {evaluations(estimate['estimated_evaluations'])} x "
                f"{format_duration(estimate['estimated_eval_s'])}; timed on steps "
                f"{step - self.timed_steps + 1}..{step}, saving checkpoints not counted)")


def evaluations(count: int) -> str:
    return f"{count} evaluation{'' if count == 1 else 's'}"
