"""What a training run will do and how long it will take, said before it has gone far.

The plan is what the configuration fixes: steps, training tokens, evaluations. The estimate comes
from timing a few steps: the first step of the process is left out (it pays for allocations, and
under torch.compile for compiling), then steps are timed until three are or thirty seconds have
passed, whichever comes first: a tiny or seed-sized model is timed over three steps (one step
alone varies several-fold where other work shares the CPU), and a large one whose step takes
minutes after one. The device is synchronized around each timed step, since a GPU
step otherwise returns when its kernels are queued, not when they have run.

    whole run = wall-clock so far + steps left x seconds per step + evaluations left x one evaluation

An evaluation is estimated, not measured (the first may be many steps away): it is one forward
pass over `eval_tokens` validation tokens, and a forward pass costs about a third of a training
step per token (2 of the 6 FLOPs per weight and token of qwen3/train/parts.py's flops_per_token;
backward is the other 4), so one evaluation takes eval_tokens / (3 x training tokens/s). Saving
best/ and last/ and redrawing loss.png at each evaluation are not counted.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qwen3.train.runfiles import format_duration
from qwen3.runtime import synchronize

if TYPE_CHECKING:
    from qwen3.train.loop import TrainState

TIMED_STEPS = 3          # steps timed after the warm-up step, at most ...
TIMED_SECONDS = 30.0     # ... or fewer once their time reaches this
FORWARD_SHARE = 1 / 3    # a forward pass's cost per token, as a share of a training step's


@dataclass(frozen=True)
class RunPlan:
    """The steps this process will take and the work they are."""

    first_step: int       # 1, or the resumed step + 1
    max_steps: int
    tokens_per_step: int  # all processes together
    eval_interval: int
    eval_tokens: int      # tokens one evaluation passes through the model

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
                f"{evaluations(self.evaluations_after(self.first_step - 1))} of {self.eval_tokens:,} tokens")


class RunEstimate:
    """Logs what the run is (model, device, batch, steps) and its plan; times the first steps of
    `run` and, once they are timed, logs the estimated wall-clock of the whole run and records it
    in metrics.jsonl (keys estimated_*)."""

    def __init__(self, state: TrainState) -> None:
        config = state.config
        self.plan = RunPlan(state.step + 1, config.max_steps, state.layout.tokens_per_step,
                            config.eval_interval, state.data.eval_tokens)
        self.timed_steps, self.timed_seconds = 0, 0.0
        self.done = self.plan.steps < 2  # no step to time after the warm-up
        world, autocast = state.processes.world_size, str(state.autocast_dtype).removeprefix("torch.")
        state.log(f"training {state.model.num_parameters():,} parameters on {state.device} ({world} "
                  f"process{'es' if world > 1 else ''}, autocast {autocast}), {state.layout.tokens_per_step:,} "
                  f"tokens per step, steps {state.step + 1}..{config.max_steps} -> {state.out}")
        state.log(self.plan.describe())

    @contextlib.contextmanager
    def timing(self, state: TrainState) -> Iterator[None]:
        """Around one training step: time it when it is one of the measured ones."""
        if self.done or state.step < self.plan.first_step:
            yield
            return
        synchronize(state.device)
        start = time.perf_counter()
        yield
        synchronize(state.device)
        self.timed_steps += 1
        self.timed_seconds += time.perf_counter() - start
        if self.timed_steps == TIMED_STEPS or self.timed_seconds >= TIMED_SECONDS or state.step == self.plan.max_steps:
            self.done = True
            self.report(state)

    def report(self, state: TrainState) -> None:
        elapsed = state.elapsed()
        estimate = self.estimate(state.step, elapsed)
        state.write_event(estimate)
        left = self.plan.max_steps - state.step
        state.log(f"estimated wall-clock of the whole run: {format_duration(estimate['estimated_total_s'])} "
                  f"({format_duration(elapsed)} so far + {left:,} steps x "
                  f"{estimate['estimated_step_s']:.3g} s + {evaluations(estimate['estimated_evaluations'])} x "
                  f"{format_duration(estimate['estimated_eval_s'])}; timed on steps "
                  f"{state.step - self.timed_steps + 1}..{state.step}, saving checkpoints not counted)")

    def estimate(self, step: int, elapsed: float) -> dict[str, Any]:
        """The estimate once `step` steps are done after `elapsed` seconds, as metrics.jsonl keys."""
        plan = self.plan
        step_s = self.timed_seconds / self.timed_steps
        eval_s = plan.eval_tokens * FORWARD_SHARE / (plan.tokens_per_step / step_s)
        evaluations = plan.evaluations_after(step)
        return {"estimated_total_s": round(elapsed + (plan.max_steps - step) * step_s + evaluations * eval_s, 3),
                "estimated_step_s": step_s, "estimated_eval_s": eval_s, "estimated_evaluations": evaluations,
                "timed_steps": self.timed_steps}


def evaluations(count: int) -> str:
    return f"{count} evaluation{'' if count == 1 else 's'}"
