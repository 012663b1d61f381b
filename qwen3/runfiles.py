"""The record of a training run beside its checkpoints: run.json, metrics.jsonl and loss.png.

    OUT/run.json        the resolved configuration and environment, written when the run starts
    OUT/metrics.jsonl   one JSON object per log or evaluation event, appended as the run goes
    OUT/loss.png        training and validation loss against the step, redrawn at each evaluation

Only the main process writes them; in the others every method does nothing, so the loop calls
them without asking which process it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwen3.atomic import remove_checkpoint


class RunFiles:
    """The run folder's record files (written only when `enabled`: rank 0)."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.out = out
        self.enabled = enabled
        self.metrics = out / "metrics.jsonl"

    def start(self, description: dict[str, Any], resumed_step: int | None) -> None:
        """run.json; metrics.jsonl cut back to the resumed step, or for a new run emptied (and the
        checkpoints and plot of a finished earlier run in the same folder removed)."""
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        kept = []
        if resumed_step is not None and self.metrics.is_file():
            kept = [line for line in self.metrics.read_text(encoding="utf-8").splitlines()
                    if line and json.loads(line)["step"] <= resumed_step]
        self.metrics.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        if resumed_step is None:
            for stale in ("best", "last"):
                remove_checkpoint(self.out / stale)
            (self.out / "loss.png").unlink(missing_ok=True)
        run = {**description, "resumed_from_step": resumed_step}
        (self.out / "run.json").write_text(json.dumps(run, indent=2, default=str) + "\n", encoding="utf-8")

    def write_event(self, event: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.metrics, "a", encoding="utf-8") as file:
                file.write(json.dumps(event) + "\n")

    def plot(self) -> None:
        if self.enabled:
            plot_losses(self.metrics, self.out / "loss.png")


def plot_losses(metrics_file: Path, image: Path) -> None:
    """Training and validation loss against the optimizer step, from metrics.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line]
    train = [(e["step"], e["loss"]) for e in events if "loss" in e]
    val = [(e["step"], e["val_loss"]) for e in events if "val_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="training (mean since the previous log step)", color="tab:blue")
    if val:
        ax.plot(*zip(*val), "o-", label="validation (whole split)", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.set_title(f"{metrics_file.parent.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    temporary = image.with_name(f".{image.name}.tmp.png")
    fig.savefig(temporary)
    plt.close(fig)
    temporary.replace(image)
