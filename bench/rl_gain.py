"""What reinforcement learning gains on the embedded book task, measured from a fine-tuned checkpoint.

On the held-out prompts (the book questions of the verses the embedded sets hold out): the
checkpoint's greedy pass@1, and its pass@8 (8 completions at the rollout temperature; a prompt
passes when one of them is right), the room RL has to grow into. Then `qwen3 rl` from it, once per
seed, each run's greedy pass@1 at its end; the median, and the share of the pass@1 -> pass@8 gap it
closed. And where an RL step's time goes: sampling the rollouts (with their scoring and
log-probabilities) against the update, from the runs' metrics.jsonl.

    python bench/rl_gain.py runs/seed-sft [--seeds 3] [--max-steps 200] [--set key=value ...] [--plot FILE.png]

`--plot` draws each run's training reward and held-out greedy pass@1 against the step and the
wall-clock, beside the starting checkpoint's pass@1 and pass@8 (docs/img/rl_book.png).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qwen3.config import apply_overrides, parse_set_arguments, preset
from qwen3.data.kjv import book_task
from qwen3.infer.engine import load_engine
from qwen3.infer.sampling import SamplingParams
from qwen3.train.rewards import book_reward
from qwen3.train.runfiles import pyplot, read_events, save_png
from qwen3.train.stages.rl import PASS, pass_at_k

ROOT = Path(__file__).resolve().parent.parent


def held_out_pass_rates(folder: Path, samples: int, temperature: float, max_tokens: int) -> tuple[float, float]:
    """(greedy pass@1, pass@`samples` at `temperature`; 0 samples skip it) of a checkpoint on the
    held-out book questions."""
    engine = load_engine(folder, device="cpu")
    prompts = book_task()[1]
    ids = [engine.tokenizer.encode(engine.tokenizer.apply_chat_template(p["messages"], True)) for p in prompts]
    greedy = engine.generate_batch(ids, SamplingParams(temperature=0.0, max_new_tokens=max_tokens))
    pass_1 = statistics.mean(book_reward(reply.text, prompt) >= PASS for reply, prompt in zip(greedy, prompts))
    passes = []
    for index, (prompt_ids, prompt) in enumerate(zip(ids, prompts) if samples else []):
        params = [SamplingParams(temperature=temperature, max_new_tokens=max_tokens, seed=index * samples + sample)
                  for sample in range(samples)]
        replies = engine.generate_batch([prompt_ids] * samples, params)
        passes.append(sum(book_reward(reply.text, prompt) >= PASS for reply in replies))
    return pass_1, statistics.mean(pass_at_k(c, samples, samples) for c in passes) if samples else float("nan")


def rl_run(folder: Path, out: Path, seed: int, max_steps: int, overrides: list[str]) -> dict[str, float]:
    """One `qwen3 rl` run: its final held-out pass@1, wall-clock, and the split of a step's time."""
    command = [sys.executable, "-m", "qwen3", "rl", str(folder), "--out", str(out), "--max-steps", str(max_steps),
               "--set", f"seed={seed}", *[arg for pair in overrides for arg in ("--set", pair)]]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logs = [event for event in events if "rollout_s" in event]
    run = json.loads((out / "run.json").read_text())
    step_s = statistics.median(run["tokens_per_step"] / event["tok_per_s"] for event in logs)
    return {"pass_at_1": [event["val_pass_at_1"] for event in events if "val_pass_at_1" in event][-1],
            "seconds": seconds, "step_s": step_s, "rollout_s": statistics.median(event["rollout_s"] for event in logs)}


def plot_runs(runs: list[Path], pass_1: float, pass_k: float, samples: int, image: Path) -> None:
    """Training reward (sampled) and held-out greedy pass@1 of each run against the step and the
    wall-clock, with the start's greedy pass@1 and pass@`samples` as horizontal lines."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.2), dpi=110, sharey=True)
    for seed, run in enumerate(runs):
        events = read_events(run / "metrics.jsonl")
        logs = [e for e in events if "reward" in e]
        evals = [e for e in events if "val_pass_at_1" in e and "samples" not in e]
        for ax, x in zip(axes, ("step", "elapsed_s")):
            ax.plot([e[x] for e in logs], [e["reward"] for e in logs], color=f"C{seed}", alpha=0.35,
                    label=f"seed {seed}: training reward (sampled)")
            ax.plot([e[x] for e in evals], [e["val_pass_at_1"] for e in evals], "o-", color=f"C{seed}",
                    label=f"seed {seed}: held-out greedy pass@1")
    for ax, label in zip(axes, ("optimizer step", "wall-clock (s)")):
        ax.axhline(pass_1, color="black", linestyle="--", label="start: held-out greedy pass@1")
        ax.axhline(pass_k, color="gray", linestyle=":", label=f"start: held-out pass@{samples}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of right answers")
    axes[1].legend(fontsize=7)
    fig.suptitle("qwen3 rl on the embedded book task")
    fig.tight_layout()
    save_png(fig, image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a fine-tuned run folder or checkpoint (qwen3 sft runs/seed)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=preset("rl")[1].max_steps)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to qwen3 rl")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--plot", type=Path, help="draw the runs' reward and pass@1 into this PNG")
    args = parser.parse_args()
    config = apply_overrides(*preset("rl"), parse_set_arguments(args.set))[1]  # the runs' sampling settings
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.checkpoint}, held-out book questions; "
          f"qwen3 rl {args.max_steps} steps, {' '.join(args.set) or 'the rl preset'}")
    pass_1, pass_k = held_out_pass_rates(args.checkpoint, config.group_size, config.rollout_temperature,
                                         config.max_completion_tokens)
    print(f"before: greedy pass@1 {pass_1:.2%}, pass@{config.group_size} {pass_k:.2%} "
          f"(temperature {config.rollout_temperature})")
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.out or Path(scratch)
        runs = [rl_run(args.checkpoint, folder / f"rl-seed{seed}", seed, args.max_steps, args.set)
                for seed in range(args.seeds)]
        if args.plot:
            plot_runs([folder / f"rl-seed{seed}" for seed in range(args.seeds)], pass_1, pass_k, config.group_size,
                      args.plot)
    for seed, run in enumerate(runs):
        print(f"seed {seed}: pass@1 {run['pass_at_1']:.2%}, {run['seconds'] / 60:.1f} min; a step "
              f"{run['step_s']:.2f} s, of which rollouts {run['rollout_s']:.2f} s ({run['rollout_s'] / run['step_s']:.0%})")
    median = statistics.median(run["pass_at_1"] for run in runs)
    gap = pass_k - pass_1
    print(f"after: median greedy pass@1 {median:.2%} over {args.seeds} seeds: "
          f"{(median - pass_1) / gap:.0%} of the pass@1 -> pass@{config.group_size} gap closed" if gap > 0 else
          f"after: median greedy pass@1 {median:.2%} (no gap to close)")


if __name__ == "__main__":
    main()
