"""Draw the figures of bench/claims.py from its JSON alone: docs/img/claims_<claim>.png.

Measuring (training 30 small models, timing kernels) and drawing are separate steps, so a figure
can be redrawn, relabelled or rescaled without training anything: this script reads only the
claims.json that bench/claims.py wrote, and imports neither torch nor qwen3.

    python bench/claims_plot.py                            # every claim in docs/img/claims.json
    python bench/claims_plot.py rope --json other.json     # some claims; figures beside the JSON
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def moving_average(values: list[float], width: int) -> np.ndarray:
    return np.convolve(values, np.ones(width) / width, mode="valid")


def plot_training(ax_loss: plt.Axes, ax_delta: plt.Axes, entry: dict[str, Any]) -> None:
    """Left: training loss (mean over seeds). Right: each variant's training loss minus the
    baseline's at the same seed (thin: each seed, bold: their mean). 50-step moving averages."""
    train = entry["settings"]["train"]
    loss = entry["loss"]
    width = min(50, train["max_steps"] // 4)
    curves = {label: np.array([moving_average(curve, width) for curve in variant["train_loss"]])
              for label, variant in loss["variants"].items()}
    base = next(curves[label] for label, variant in loss["variants"].items() if variant["variant"] == "baseline")
    steps = np.arange(base.shape[1]) + width
    for i, (label, variant) in enumerate(loss["variants"].items()):
        ax_loss.plot(steps, curves[label].mean(0), color=f"C{i}", label=f"{label}: val {variant['val_loss_mean']:.3f}")
        for delta in curves[label] - base:
            ax_delta.plot(steps, delta, color=f"C{i}", alpha=0.35, linewidth=0.8)
        ax_delta.plot(steps, (curves[label] - base).mean(0), color=f"C{i}", linewidth=2,
                      label=f"{label}: val {variant['minus_baseline_mean']:+.3f}")
    seeds = loss["seeds"]
    ax_loss.set_title(f"Training loss at equal budget "
                      f"({f'mean of {len(seeds)} seeds' if len(seeds) > 1 else f'seed {seeds[0]}'})")
    ax_loss.set_ylabel(f"training loss (nats/token, {width}-step mean)")
    tails = [curve.mean(0)[len(steps) // 4:] for curve in curves.values()]
    ax_loss.set_ylim(min(map(min, tails)) - 0.1, max(map(max, tails)) + 0.1)
    ax_delta.set_title("Difference from the baseline, paired by seed")
    ax_delta.set_ylabel("training loss minus baseline's (nats/token)")
    for ax in (ax_loss, ax_delta):
        ax.set_xlabel(f"optimizer step (batch {train['batch_size']} x {train['seq_len']} tokens)")
        ax.legend(fontsize=9)
        ax.grid(alpha=0.3)


def plot_lr_sensitivity(ax: plt.Axes, entry: dict[str, Any]) -> None:
    """Validation loss of one seed at each peak learning rate, per variant."""
    sensitivity = entry["lr_sensitivity"]
    for i, (label, variant) in enumerate(sensitivity["variants"].items()):
        ax.plot(variant["lr"], variant["val_loss"], "o-", color=f"C{i}", label=label)
    ax.set_xscale("log")
    ax.set_title(f"Sensitivity to the learning rate (seed {sensitivity['seed']}, "
                 f"{entry['settings']['train']['max_steps']} steps)")
    ax.set_xlabel("peak learning rate (AdamW, warmup then cosine)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)


def threads(entry: dict[str, Any]) -> str:
    return f"{entry['environment']['torch_threads']} CPU thread(s)"


def draw_gqa(entry: dict[str, Any]) -> plt.Figure:
    s = entry["settings"]
    fig, axes = plt.subplot_mosaic([["memory", "speed"], ["loss", "delta"]], figsize=(15, 10))
    ax_mem, ax_speed = axes["memory"], axes["speed"]
    for name, rows in entry["memory"].items():
        ax_mem.plot([r["kv_heads"] for r in rows], [100 * r["kv_cache_vs_mha"] for r in rows], "o-",
                    label=f"{name}: {rows[0]['heads']} query heads, "
                          f"MHA cache {rows[-1]['kv_cache_bytes'] / 2**20:,.0f} MiB")
    ax_mem.set_xscale("log", base=2)
    ax_mem.set_title("KV-cache size (our KVCache, batch 1, full context)")
    ax_mem.set_xlabel("key/value heads")
    ax_mem.set_ylabel("KV cache, % of full multi-head")
    ax_mem.legend()
    ax_mem.grid(alpha=0.3)
    for batch in s["decode_batches"]:
        rows = [r for r in entry["decode"] if r["batch_size"] == batch]
        ax_speed.plot([r["kv_heads"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", label=f"batch {batch}")
    decode = s["decode"]
    ax_speed.set_xscale("log", base=2)
    ax_speed.set_title(f"Decode speed, {s['decode_context']} cached positions\n"
                       f"({decode['num_hidden_layers']} layers, {decode['num_attention_heads']} query heads x "
                       f"{decode['head_dim']}, {threads(entry)})")
    ax_speed.set_xlabel("key/value heads")
    ax_speed.set_ylabel("tokens/s")
    ax_speed.set_ylim(bottom=0)
    ax_speed.legend()
    ax_speed.grid(alpha=0.3)
    plot_training(axes["loss"], axes["delta"], entry)
    return fig


def draw_norm(entry: dict[str, Any]) -> plt.Figure:
    s = entry["settings"]
    timing = entry["timing"]
    norms = list(dict.fromkeys(t["norm"] for t in timing))
    fig, axes = plt.subplot_mosaic([["time", "time", "time"], ["loss", "delta", "lr"]], figsize=(21, 10))
    ax_time = axes["time"]
    labels = [f"{rows}x{width}" for rows, width in s["norm_shapes"]]
    bar = 0.8 / (2 * len(norms))
    for i, name in enumerate(norms):
        for j, key in enumerate(("forward_us", "forward_backward_us")):
            values = [t[key] for t in timing if t["norm"] == name]
            offsets = np.arange(len(labels)) + (2 * i + j - len(norms) + 0.5) * bar
            ax_time.bar(offsets, values, bar, color=f"C{i}", alpha=1.0 if j else 0.5,
                        label=f"{name}, {'forward+backward' if j else 'forward'}")
    ax_time.set_xticks(np.arange(len(labels)), labels)
    ax_time.set_yscale("log")
    ax_time.set_title(f"Time per call (median of {s['timing_repeats']}, float32, {threads(entry)})")
    ax_time.set_xlabel("input shape (rows x width)")
    ax_time.set_ylabel("microseconds per call (log scale)")
    ax_time.legend(fontsize=8)
    ax_time.grid(alpha=0.3, axis="y")
    plot_training(axes["loss"], axes["delta"], entry)
    plot_lr_sensitivity(axes["lr"], entry)
    return fig


def draw_swiglu(entry: dict[str, Any]) -> plt.Figure:
    fig, (ax_loss, ax_delta) = plt.subplots(1, 2, figsize=(15, 5))
    plot_training(ax_loss, ax_delta, entry)
    fig.suptitle("SwiGLU vs a GELU MLP of equal parameter count")
    return fig


def draw_rope(entry: dict[str, Any]) -> plt.Figure:
    s = entry["settings"]
    seq_len = s["train"]["seq_len"]
    window = seq_len * max(s["extrapolate"])
    fig, axes = plt.subplot_mosaic([["position", "position"], ["loss", "delta"]], figsize=(15, 10))
    ax_pos = axes["position"]
    width = max(1, seq_len // 8)
    for i, (label, curve) in enumerate(entry["extrapolation"].items()):
        loss = np.array(curve["position_loss"][1:])  # position 0 (no context) is far above the rest
        bins = len(loss) // width
        centers = 1 + width * np.arange(bins) + (width - 1) / 2
        ax_pos.plot(centers, loss[:bins * width].reshape(bins, width).mean(1), "o-", markersize=3,
                    color=f"C{i}", label=label)
    ax_pos.axvline(seq_len, color="gray", linestyle="--", label=f"training context ({seq_len})")
    ax_pos.text(seq_len * 1.02, 0.95, "learned table ends here:\nno embedding for later positions",
                transform=ax_pos.get_xaxis_transform(), va="top", fontsize=9, color="C1")
    ax_pos.set_title(f"Validation loss by position in {window}-token windows "
                     f"(mean of {len(s['seeds'])} seed(s), {width}-position bins, position 0 left out)")
    ax_pos.set_xlabel("token position in the window")
    ax_pos.set_ylabel("cross-entropy (nats/token)")
    ax_pos.legend(loc="lower right")
    ax_pos.grid(alpha=0.3)
    plot_training(axes["loss"], axes["delta"], entry)
    return fig


def draw_tying(entry: dict[str, Any]) -> plt.Figure:
    counts = entry["parameters"]
    fig, (ax_count, ax_loss, ax_delta) = plt.subplots(1, 3, figsize=(20, 5.5))
    x = np.arange(len(counts))
    ax_count.bar(x - 0.2, [c["tied"] / 1e6 for c in counts], 0.4, label="tied")
    ax_count.bar(x + 0.2, [c["untied"] / 1e6 for c in counts], 0.4, label="untied")
    for i, c in enumerate(counts):
        ax_count.text(i + 0.2, c["untied"] / 1e6, f"-{100 * c['saved_fraction_of_untied']:.0f}% tied",
                      ha="center", va="bottom")
    ax_count.set_xticks(x, [f"vocab {c['vocab_size']:,}" for c in counts])
    ax_count.set_title("Parameters of the seed's shape (128 wide, 3 layers)")
    ax_count.set_ylabel("parameters (millions)")
    ax_count.legend()
    ax_count.grid(alpha=0.3, axis="y")
    plot_training(ax_loss, ax_delta, entry)
    return fig


def draw_prenorm(entry: dict[str, Any]) -> plt.Figure:
    fig, (ax_loss, ax_delta, ax_lr) = plt.subplots(1, 3, figsize=(21, 5.5))
    plot_training(ax_loss, ax_delta, entry)
    plot_lr_sensitivity(ax_lr, entry)
    fig.suptitle("Pre-norm vs post-norm")
    return fig


def draw_muon(entry: dict[str, Any]) -> plt.Figure:
    scalar_map = entry["scalar_map"]
    fig, (ax_map, ax_sv) = plt.subplots(1, 2, figsize=(15, 5))
    ax_map.plot(scalar_map["sigma"], scalar_map["mapped"],
                label=f"{scalar_map['steps']} quintic steps, (a, b, c) = {tuple(scalar_map['coefficients'])}")
    ax_map.axhline(1.0, color="gray", linestyle="--", label="exact orthogonalization (U V^T)")
    ax_map.set_xscale("log")
    ax_map.set_title("Newton-Schulz on one singular value")
    ax_map.set_xlabel("singular value after dividing by the Frobenius norm")
    ax_map.set_ylabel(f"singular value after {scalar_map['steps']} steps")
    ax_map.legend()
    ax_map.grid(alpha=0.3)
    for i, (name, spectrum) in enumerate(entry["spectra"].items()):
        ranks = np.arange(1, len(spectrum["newton_schulz_sv"]) + 1)
        ax_sv.plot(ranks, spectrum["gradient_sv_over_max"], color=f"C{i}", linestyle=":",
                   label=f"{name} gradient {tuple(spectrum['shape'])} (/ its largest)")
        ax_sv.plot(ranks, spectrum["newton_schulz_sv"], color=f"C{i}", label=f"{name} after qwen3.train.muon.newton_schulz")
    ax_sv.set_yscale("log")
    ax_sv.set_title("Singular values of a real gradient (first batch, fresh model)")
    ax_sv.set_xlabel("singular value index (largest first)")
    ax_sv.set_ylabel("singular value")
    ax_sv.legend(fontsize=9)
    ax_sv.grid(alpha=0.3)
    return fig


DRAW: dict[str, Callable[[dict[str, Any]], plt.Figure]] = {
    "gqa": draw_gqa, "norm": draw_norm, "swiglu": draw_swiglu, "rope": draw_rope,
    "tying": draw_tying, "prenorm": draw_prenorm, "muon": draw_muon,
}


def draw(results: dict[str, Any], claims: list[str], out_dir: Path) -> list[Path]:
    """Save claims_<claim>.png in out_dir for each of `claims`; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for claim in claims:
        fig = DRAW[claim](results[claim])
        fig.tight_layout()
        paths.append(out_dir / f"claims_{claim}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # A string default: argparse checks a list default of nargs="*" against the choices, and fails.
    parser.add_argument("claims", nargs="*", choices=[*DRAW, "all"], default="all")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "img" / "claims.json")
    parser.add_argument("--out", type=Path, help="folder of the figures (default: the JSON's)")
    args = parser.parse_args(argv)
    if not args.json.is_file():
        parser.error(f"{args.json} does not exist: measure first (python bench/claims.py)")
    results = json.loads(args.json.read_text())
    claims = [c for c in DRAW if c in results] if "all" in args.claims else list(dict.fromkeys(args.claims))
    missing = [c for c in claims if c not in results]
    if missing:
        parser.error(f"{args.json} has no entry for {', '.join(missing)}: measure it first "
                     f"(python bench/claims.py {' '.join(missing)})")
    for path in draw(results, claims, args.out or args.json.parent):
        print(path)


if __name__ == "__main__":
    main()
