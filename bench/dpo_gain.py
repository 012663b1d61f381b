"""What DPO gains on the embedded book task, measured from a fine-tuned checkpoint: on the held-out
pairs (each book question with the right book and another), the share whose chosen reply the
model finds more likely than the rejected one, and the held-out greedy pass@1 of the book task,
before and after `qwen3 dpo` (one run per seed; medians).

    python bench/dpo_gain.py runs/seed-sft [--seeds 3] [--max-steps 200] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rl_gain import ROOT, held_out_pass_rates

from qwen3.config import TrainConfig, preset
from qwen3.model.checkpoint import find_checkpoint, load_model
from qwen3.train.stages.dpo import PreferenceOptimization, logprobs_of


def prefers_chosen(folder: Path) -> float:
    """The share of held-out pairs whose chosen reply the checkpoint finds more likely."""
    folder = find_checkpoint(folder)
    model = load_model(folder)
    stage = PreferenceOptimization.prepare(TrainConfig(stage="dpo"), str(folder), model.config.max_position_embeddings)
    chosen, rejected = logprobs_of(model, stage.val)
    return float((chosen > rejected).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a fine-tuned run folder or checkpoint (qwen3 sft runs/seed)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=preset("dpo")[1].max_steps)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to qwen3 dpo")
    args = parser.parse_args()
    tokens = preset("rl")[1].max_completion_tokens
    print(f"torch {torch.__version__}; {args.checkpoint}, held-out book pairs and questions; qwen3 dpo "
          f"{args.max_steps} steps, {' '.join(args.set) or 'the dpo preset'}")
    print(f"before: prefers the chosen reply {prefers_chosen(args.checkpoint):.2%}, greedy pass@1 "
          f"{held_out_pass_rates(args.checkpoint, 0, 1.0, tokens)[0]:.2%}")
    after = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(args.seeds):
            out = Path(scratch) / f"dpo-seed{seed}"
            subprocess.run([sys.executable, "-m", "qwen3", "dpo", str(args.checkpoint), "--out", str(out),
                            "--max-steps", str(args.max_steps), "--set", f"seed={seed}",
                            *[arg for pair in args.set for arg in ("--set", pair)]], check=True, cwd=ROOT)
            after.append((prefers_chosen(out), held_out_pass_rates(out, 0, 1.0, tokens)[0]))
            print(f"seed {seed}: prefers the chosen reply {after[-1][0]:.2%}, greedy pass@1 {after[-1][1]:.2%}")
    print(f"after: median prefers the chosen reply {statistics.median(a for a, _ in after):.2%}, greedy pass@1 "
          f"{statistics.median(p for _, p in after):.2%} over {args.seeds} seeds")


if __name__ == "__main__":
    main()
