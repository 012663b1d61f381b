"""Wall-clock to a held-out bits per byte: the seed recipe against the speedrun recipe, in one run.

Each recipe (a preset of qwen3/config.py, optionally changed by --set) is trained by the project's
loop (`qwen3.train.loop.setup`, then `train_step`) on the same data, and scored on the whole held-out
split every `--evals`-th of its steps by the loop's own evaluation. Training time is the loop's
steps alone; the evaluations are timed apart, and data preparation (the tokenizer and token store,
cached after the first run of a vocabulary) is not counted. The target, for each seed, is the seed
recipe's final bits per byte of that seed; the candidate stops at the evaluation that reaches it,
and its time to target is interpolated linearly between that evaluation and the one before. Bits
per byte divides by the text's bytes, so recipes with different tokenizers compare.

    python bench/speedrun.py                                  # seed vs speedrun, seed 0
    python bench/speedrun.py --seeds 3                        # medians of seeds 0, 1, 2
    python bench/speedrun.py --data corpus.txt                # another corpus (any qwen3 data source)
    python bench/speedrun.py --ablate --seeds 3               # also the speedrun with each change undone
    python bench/speedrun.py --candidate seed --set muon_lr=0.02   # any recipe as the candidate
    python bench/speedrun.py --json docs/img/speedrun.json --plot docs/img/speedrun.png

On a machine shared with other work, run it with OMP_NUM_THREADS=1: two threads whose core is taken
away stall at every OpenMP barrier, which distorts the ratio far more than one thread does.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwen3.config import ModelConfig, TrainConfig, apply_overrides, parse_set_arguments, preset
from qwen3.errors import log
from qwen3.runtime import autocast_for
from qwen3.train.loop import setup, train_step
from qwen3.train.runfiles import pyplot, save_png
from qwen3.train.stages.pretrain import Pretraining

# What the speedrun preset changes from the seed recipe, by name: the fields each change sets. The
# ablation undoes one change at a time (those fields back to the seed's values).
CHANGES: dict[str, tuple[str, ...]] = {
    "untied head": ("tie_word_embeddings",),
    "learning rates x2": ("muon_lr", "adamw_lr"),
    "embedding LR 0.09": ("embedding_lr",),
    "Muon momentum warmup": ("muon_momentum_warmup",),
    "8 x 1 windows per step": ("grad_accum", "max_steps"),
    "warmup 20, decay to 0": ("warmup_steps", "min_lr_ratio"),
    "torch.compile": ("compile",),
}


@dataclass
class Point:
    step: int
    tokens: int
    train_seconds: float  # the loop's steps since the start, evaluation excluded
    bits_per_byte: float


@dataclass
class Run:
    recipe: str
    seed: int
    curve: list[Point] = field(default_factory=list)
    eval_seconds: float = 0.0
    target: float | None = None
    seconds_to_target: float | None = None  # None: the target was not reached

    @property
    def final(self) -> Point:
        return self.curve[-1]


def recipe(name: str, overrides: dict[str, Any], data: list[str], seed: int, out: Path
           ) -> tuple[ModelConfig, TrainConfig]:
    """A preset, then `overrides`, then this measurement's data, seed and a scratch run folder."""
    model_config, train_config = preset(name)
    return apply_overrides(model_config, train_config, {
        **overrides, "data": data, "seed": seed, "out_dir": str(out), "log_interval": 10 ** 9,
        "eval_interval": 10 ** 9})


def recipes_to_race(reference: str, candidate: str, overrides: dict[str, Any], ablate: bool
                    ) -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (preset, overrides): the reference, the candidate, and with `ablate` the candidate
    with each of CHANGES undone (its fields set back to the reference's values)."""
    reference_model, reference_train = preset(reference)
    reference_values = {**dataclasses.asdict(reference_model), **dataclasses.asdict(reference_train)}
    label = candidate + "".join(f" {key}={value}" for key, value in overrides.items())
    recipes = {reference: (reference, {}), label: (candidate, overrides)}
    if ablate:
        for change, names in CHANGES.items():
            recipes[f"{label} without {change}"] = (
                candidate, {**overrides, **{name: reference_values[name] for name in names}})
    return recipes


def crossing(previous: Point | None, point: Point, target: float) -> float:
    """Training seconds at which the bits per byte reached `target`, linear between two evaluations."""
    if previous is None or previous.bits_per_byte <= target:
        return point.train_seconds
    fraction = (previous.bits_per_byte - target) / (previous.bits_per_byte - point.bits_per_byte)
    return previous.train_seconds + fraction * (point.train_seconds - previous.train_seconds)


def train_to_target(name: str, model_config: ModelConfig, train_config: TrainConfig, seed: int,
                    evals: int, target: float | None) -> Run:
    """Train one recipe, evaluating `evals` times over its steps; stop once `target` is reached."""
    state = setup(model_config, train_config)
    device = state.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    every = max(1, train_config.max_steps // evals)
    run, seconds = Run(name, seed, target=target), 0.0
    while state.step < train_config.max_steps:
        start = time.perf_counter()
        train_step(state)
        sync()
        seconds += time.perf_counter() - start
        if state.step % every and state.step != train_config.max_steps:
            continue
        start = time.perf_counter()
        result = state.stage.evaluate(state.model, train_config.batch_size, device,
                                      autocast_for(device, state.autocast_dtype))
        state.model.train()
        run.eval_seconds += time.perf_counter() - start
        previous = run.curve[-1] if run.curve else None
        run.curve.append(Point(state.step, state.step * state.layout.tokens_per_step, seconds,
                               result.bits_per_byte))
        log(f"  {name} seed {seed}: step {state.step}, {seconds:.1f} s, {result.bits_per_byte:.4f} bits/byte")
        if target is not None and result.bits_per_byte <= target:
            run.seconds_to_target = crossing(previous, run.curve[-1], target)
            break
    return run


def race_one_seed(recipes: dict[str, tuple[str, dict[str, Any]]], data: list[str], evals: int,
                  target: float | None, seed: int) -> list[Run]:
    """Every recipe with one seed, in order; without a fixed `target` the first recipe (the
    reference) is trained to its end and its final value is the others' target."""
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for label, (name, overrides) in recipes.items():
            out = Path(scratch) / f"{len(runs)}"
            run = train_to_target(label, *recipe(name, overrides, data, seed, out), seed, evals, target)
            if target is None:
                target = run.target = run.final.bits_per_byte
                reached = next(i for i, point in enumerate(run.curve) if point.bits_per_byte <= target)
                run.seconds_to_target = crossing(run.curve[reached - 1] if reached else None,
                                                 run.curve[reached], target)
            runs.append(run)
    return runs


def median_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.median(values)


def report(runs: list[Run], reference: str) -> list[dict[str, Any]]:
    """One row per recipe: medians over seeds, and the ratio of the reference's time to its own."""
    rows = []
    reference_runs = {run.seed: run for run in runs if run.recipe == reference}
    for name in dict.fromkeys(run.recipe for run in runs):
        mine = [run for run in runs if run.recipe == name]
        ratios = [reference_runs[run.seed].seconds_to_target / run.seconds_to_target
                  if run.seconds_to_target else None for run in mine]
        rows.append({"recipe": name, "seeds": len(mine),
                     "seconds_to_target": median_or_none([run.seconds_to_target for run in mine]),
                     "speedup": median_or_none(ratios),
                     "steps": statistics.median(run.final.step for run in mine),
                     "tokens": statistics.median(run.final.tokens for run in mine),
                     "final_bits_per_byte": statistics.median(run.final.bits_per_byte for run in mine),
                     "eval_seconds": statistics.median(run.eval_seconds for run in mine)})
    print(f"\n{'recipe':<32} {'seeds':>5} {'to target':>10} {'speed-up':>9} {'steps':>6} {'tokens':>10} "
          f"{'bits/byte':>9} {'eval s':>7}")
    for row in rows:
        seconds = "not reached" if row["seconds_to_target"] is None else f"{row['seconds_to_target']:.1f} s"
        speedup = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        print(f"{row['recipe']:<32} {row['seeds']:>5} {seconds:>10} {speedup:>9} {row['steps']:>6.0f} "
              f"{row['tokens']:>10,.0f} {row['final_bits_per_byte']:>9.4f} {row['eval_seconds']:>7.1f}")
    return rows


def plot(runs: list[Run], image: Path) -> None:
    """Bits per byte against training wall-clock, one line per run of the reference and the
    candidate (an ablation's recipes are in the table, not drawn), the targets dashed."""
    fig, ax = pyplot().subplots(figsize=(7.5, 4.5), dpi=110)
    drawn = list(dict.fromkeys(run.recipe for run in runs))[:2]
    runs = [run for run in runs if run.recipe in drawn]
    colors = {}
    for run in runs:
        color = colors.setdefault(run.recipe, f"C{len(colors)}")
        ax.plot([p.train_seconds for p in run.curve], [p.bits_per_byte for p in run.curve], "o-", ms=2.5,
                color=color, alpha=0.8, label=run.recipe if run.seed == runs[0].seed else None)
    for target in sorted({run.target for run in runs if run.target is not None}):
        ax.axhline(target, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("training wall-clock (s), evaluation excluded")
    ax.set_ylabel("held-out bits per byte")
    ax.set_ylim(top=min(3.0, max(p.bits_per_byte for run in runs for p in run.curve)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    image.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, image)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1; medians are reported")
    parser.add_argument("--data", action="append", default=[], metavar="SRC", help="corpus (default: embedded)")
    parser.add_argument("--reference", default="seed", help="the preset whose final value is the target")
    parser.add_argument("--candidate", default="speedrun", help="the preset raced against it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change the candidate")
    parser.add_argument("--ablate", action="store_true", help="also the candidate with each of CHANGES undone")
    parser.add_argument("--jobs", type=int, default=1, help="seeds raced at once, each in its own process")
    parser.add_argument("--target", type=float, help="race to this bits per byte instead of the reference's")
    parser.add_argument("--evals", type=int, default=20, help="evaluations over a run's steps")
    parser.add_argument("--json", type=Path, help="write every run's curve and the table here")
    parser.add_argument("--plot", type=Path, help="draw bits per byte against wall-clock here")
    args = parser.parse_args(argv)

    recipes = recipes_to_race(args.reference, args.candidate, parse_set_arguments(args.set), args.ablate)
    if args.target is not None:  # a fixed target: the reference is not trained, the candidate is the yardstick
        del recipes[args.reference]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; recipes: {', '.join(recipes)}",
          file=sys.stderr)
    race = functools.partial(race_one_seed, recipes, args.data, args.evals, args.target)
    if args.jobs > 1:  # seeds side by side, each in a process of its own, from a token store built once
        for name, overrides in recipes.values():
            model_config, train_config = recipe(name, overrides, args.data, 0, Path("unused"))
            Pretraining.prepare(train_config, train_config.tokenizer, model_config.max_position_embeddings,
                                progress=True)
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=torch.set_num_threads,
                                                    initargs=(torch.get_num_threads(),)) as pool:
            runs = [run for seed_runs in pool.map(race, range(args.seeds)) for run in seed_runs]
    else:
        runs = [run for seed in range(args.seeds) for run in race(seed)]
    rows = report(runs, runs[0].recipe)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "runs": [dataclasses.asdict(run) for run in runs],
                                         "threads": torch.get_num_threads(), "data": args.data or ["builtin:kjv"]},
                                        indent=1) + "\n", encoding="utf-8")
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
