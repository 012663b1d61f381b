"""Muon + AdamW against AdamW alone: same model, data and step budget; learning rates from a sweep.

The seed claimed Muon converges "30-50% faster". This measures it with the real training loop
(`qwen3.train.loop.train`): the seed's model shape on the first books of the King James Bible (one
document per verse, so validation verses are spread through the text), windows of 128 tokens,
batch 8, warmup then cosine.

1. Sweep: each optimizer trains `--sweep-steps` steps at each learning rate of its grid
   (Muon: the Muon rate of the hidden matrices, with AdamW at 3e-3 on embeddings and norms;
   AdamW: one rate for everything); the rate with the lowest final validation loss wins.
2. Comparison: both train `--steps` steps at their best rate, evaluated every `--eval-every` steps.

Prints the validation curves, how many steps each needs to reach the other's final loss
(interpolated between evaluations), the seconds per step of each, and saves the curves to
docs/img/muon_vs_adamw.png.

    python bench/muon_vs_adamw.py [--steps 240] [--sweep-steps 80]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from qwen3.config import apply_overrides, preset
from qwen3.data.sources import kjv_books
from qwen3.train.loop import train
from qwen3.train.runfiles import pyplot, save_png

MUON_GRID = [0.005, 0.01, 0.02, 0.04]
ADAMW_GRID = [1e-3, 3e-3, 1e-2]
CORPUS_BYTES = 1_000_000
PLOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "muon_vs_adamw.png"


def write_corpus(folder: Path) -> str:
    """The first books of the KJV up to about CORPUS_BYTES, one verse per line."""
    text, books = "", kjv_books()
    while len(text) < CORPUS_BYTES:
        text += books.pop(0)
    path = folder / "kjv_first_books.txt"
    path.write_text(text, encoding="utf-8")
    return f"{path}:doc=line"


def run(source: str, out: Path, optimizer: str, lr: float, steps: int, eval_every: int,
        cache_dir: str) -> tuple[list[tuple[int, float]], float]:
    """Train one configuration; its validation curve [(step, loss)] and seconds per step."""
    values = dict(data=[source], cache_dir=cache_dir, out_dir=str(out), optimizer=optimizer,
                  max_steps=steps, eval_interval=eval_every, log_interval=10, seq_len=128,
                  max_position_embeddings=128, batch_size=8, grad_accum=1,
                  warmup_steps=max(1, steps // 12), min_lr_ratio=0.1, sample_interval=0)
    values["muon_lr" if optimizer == "muon" else "adamw_lr"] = lr
    start = time.perf_counter()
    train(*apply_overrides(*preset("seed"), values))
    seconds = time.perf_counter() - start
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Training time per step (evaluation excluded), from the throughput of each log interval.
    rates = [e["tok_per_s"] for e in events if "tok_per_s" in e]
    step_seconds = sum(8 * 128 / rate for rate in rates) / len(rates)
    curve = [(e["step"], e["val_loss"]) for e in events if "val_loss" in e]
    print(f"  {optimizer:5} lr {lr:<7g} final val loss {curve[-1][1]:.4f}  ({seconds:.0f} s)", flush=True)
    return curve, step_seconds


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step where the curve reaches `target`, interpolating linearly between evaluations."""
    previous = (0, float("inf"))
    for step, loss in curve:
        if loss <= target:
            if previous[1] == float("inf"):
                return float(step)
            return previous[0] + (previous[1] - target) / (previous[1] - loss) * (step - previous[0])
        previous = (step, loss)
    return None


def plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 4.2), dpi=110)
    for label, curve in curves.items():
        ax.plot(*zip(*curve), "o-", markersize=3, label=label)
    ax.set_xlabel("optimizer step (8 x 128 tokens)")
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title("Muon + AdamW vs AdamW, seed model, first KJV books")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=240, help="steps of the final comparison")
    parser.add_argument("--sweep-steps", type=int, default=80, help="steps of each sweep run")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--cache-dir", default=".cache/qwen3")
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="muon-vs-adamw-") as folder:
        root = Path(folder)
        source = write_corpus(root)
        best: dict[str, float] = {}
        for optimizer, grid in (("muon", MUON_GRID), ("adamw", ADAMW_GRID)):
            print(f"sweep: {optimizer}, {args.sweep_steps} steps per rate", flush=True)
            finals = {lr: run(source, root / f"sweep-{optimizer}-{lr}", optimizer, lr, args.sweep_steps,
                              args.sweep_steps, args.cache_dir)[0][-1][1] for lr in grid}
            best[optimizer] = min(finals, key=finals.get)
        print(f"comparison: {args.steps} steps at the best rates "
              f"(muon {best['muon']:g}, adamw {best['adamw']:g})", flush=True)
        results = {name: run(source, root / f"final-{name}", name, best[name], args.steps,
                             args.eval_every, args.cache_dir) for name in ("muon", "adamw")}

    curves = {name: curve for name, (curve, _) in results.items()}
    print(f"\n{'step':>6}{'muon':>10}{'adamw':>10}")
    for (step, muon_loss), (_, adamw_loss) in zip(curves["muon"], curves["adamw"]):
        print(f"{step:>6}{muon_loss:>10.4f}{adamw_loss:>10.4f}")
    for name, other in (("muon", "adamw"), ("adamw", "muon")):
        target = curves[other][-1][1]
        reached = steps_to_reach(curves[name], target)
        when = f"{reached:.0f} steps" if reached is not None else f"not within {args.steps} steps"
        print(f"{name} reaches {other}'s final loss {target:.4f} in {when}")
    muon_reach = steps_to_reach(curves["muon"], curves["adamw"][-1][1])
    seconds = {name: step_seconds for name, (_, step_seconds) in results.items()}
    print(f"seconds per step: muon {seconds['muon']:.3f}, adamw {seconds['adamw']:.3f}")
    if muon_reach:
        print(f"speed-up of Muon in steps: {args.steps / muon_reach:.2f}x; in training time: "
              f"{args.steps * seconds['adamw'] / (muon_reach * seconds['muon']):.2f}x")
    labels = {f"Muon {best['muon']:g} + AdamW {preset('seed')[1].adamw_lr:g}": curves["muon"],
              f"AdamW {best['adamw']:g}": curves["adamw"]}
    plot(labels, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
