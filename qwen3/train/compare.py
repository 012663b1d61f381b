"""`qwen3 compare RUN...`: training runs side by side, read from their run folders alone.

One PNG with each run's validation bits per byte against the optimizer step, the training tokens
and the wall-clock (three panels, one line per run, named by its folder), and a table of the final
metrics for the terminal. Bits per byte rather than loss, because it divides by the UTF-8 size of
the text instead of the number of tokens: runs with different tokenizers compare
(docs/evaluation.md). A run still in progress is read as far as it has got. Nothing here imports
torch, so comparing is instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3.errors import UserError, read_json_object
from qwen3.train.runfiles import format_duration, pyplot, read_events, save_png


@dataclass(frozen=True)
class ComparedRun:
    """A run as `qwen3 compare` reads it from its folder: its metrics events and run.json ({} when absent)."""

    folder: Path
    events: list[dict[str, Any]]
    info: dict[str, Any]

    @property
    def evaluations(self) -> list[dict[str, Any]]:
        return [event for event in self.events if "val_bpb" in event]


def read_run(folder: str | Path) -> ComparedRun:
    """The record of the run in `folder`; a folder that is not a run, or whose run has not
    evaluated yet, is a UserError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{folder} is not a run folder: it has no metrics.jsonl (qwen3 train --out DIR writes one)")
    events = read_events(metrics)
    info: dict[str, Any] = {}
    if (folder / "run.json").is_file():
        info = read_json_object(folder / "run.json")
    record = ComparedRun(folder, events, info)
    if not record.evaluations:
        every = info.get("train", {}).get("eval_interval")
        first = f" (the first is at step {every})" if every else ""
        raise UserError(f"{folder}: the run has no evaluation yet{first}; nothing to compare")
    return record


@dataclass(frozen=True)
class Summary:
    """A run's row of the table: how far it got, and its metrics at its last evaluation."""

    run: str
    step: int
    max_steps: int | None      # from run.json; above `step` while the run is in progress
    tokens: int
    elapsed_s: float           # wall-clock, evaluation and checkpoint saving included
    val_loss: float
    val_bpb: float
    val_acc: float
    best_val_loss: float
    parameters: int | None
    train_tok_per_s: float | None  # training steps only, evaluation and saving excluded


def summarize(record: ComparedRun, label: str) -> Summary:
    last, final = record.events[-1], record.evaluations[-1]
    return Summary(label, last["step"], record.info.get("train", {}).get("max_steps"), last["tokens"],
                   last["elapsed_s"], final["val_loss"], final["val_bpb"], final["val_acc"],
                   min(event["val_loss"] for event in record.evaluations), record.info.get("parameters"),
                   training_throughput(record.events))


def training_throughput(events: list[dict[str, Any]]) -> float | None:
    """Tokens per second of training over the whole run: each log event's tok_per_s covers the
    tokens since the previous log event, so the run's rate is their total over the summed times."""
    tokens = seconds = 0.0
    previous = 0
    for event in (event for event in events if "tok_per_s" in event):
        interval = event["tokens"] - previous
        tokens, seconds = tokens + interval, seconds + interval / event["tok_per_s"]
        previous = event["tokens"]
    return tokens / seconds if seconds > 0 else None


def labels(records: list[ComparedRun]) -> list[str]:
    """The run folders' names, or the paths as given where two runs share a name."""
    names = [record.folder.resolve().name for record in records]
    return names if len(set(names)) == len(names) else [str(record.folder) for record in records]


def table(summaries: list[Summary]) -> str:
    """The summaries as aligned columns (the run's name left, numbers right)."""
    header = ["run", "steps", "tokens", "wall-clock", "val loss", "val bits/byte", "val accuracy",
              "best val loss", "parameters", "train tok/s"]
    rows = [[s.run, f"{s.step:,}" + (f"/{s.max_steps:,}" if s.max_steps and s.max_steps != s.step else ""),
             f"{s.tokens:,}", format_duration(s.elapsed_s), f"{s.val_loss:.4f}", f"{s.val_bpb:.4f}",
             f"{s.val_acc:.2%}", f"{s.best_val_loss:.4f}", f"{s.parameters:,}" if s.parameters else "-",
             f"{s.train_tok_per_s:,.0f}" if s.train_tok_per_s else "-"] for s in summaries]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) if column == 0 else cell.rjust(width)
                               for column, (cell, width) in enumerate(zip(row, widths))).rstrip()
                     for row in [header, *rows])


def wall_clock_unit(seconds: float) -> tuple[str, float]:
    """The unit the wall-clock axis reads best in, and its length in seconds."""
    return ("h", 3600.0) if seconds > 3 * 3600 else ("min", 60.0) if seconds > 180 else ("s", 1.0)


def plot_runs(records: list[ComparedRun], names: list[str], image: Path) -> Any:
    """Validation bits per byte against step, tokens and wall-clock, written to `image`; returns
    the figure (closed: it can be read, not shown)."""
    unit, scale = wall_clock_unit(max(event["elapsed_s"] for record in records for event in record.evaluations))
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4.5), dpi=110, sharey=True)
    for record, name in zip(records, names):
        evaluations = record.evaluations
        for ax, key in zip(axes, ("step", "tokens", "elapsed_s")):
            ax.plot([event[key] / (scale if key == "elapsed_s" else 1) for event in evaluations],
                    [event["val_bpb"] for event in evaluations], "o-", label=name)
    axes[0].set_ylabel("validation bits per byte (whole split)")
    for ax, xlabel in zip(axes, ("optimizer step", "training tokens",
                                 f"wall-clock ({unit}; evaluation and checkpoint saving included)")):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("validation bits per byte: " + ", ".join(names))
    fig.tight_layout()
    save_png(fig, image)
    return fig


def compare(folders: list[str | Path], image: str | Path) -> tuple[list[Summary], Any]:
    """Read the runs in `folders`, draw them into `image` (a .png in an existing folder) and
    return their summaries and the figure."""
    image = Path(image)
    if image.suffix.lower() != ".png":
        raise UserError(f"--out {image}: the figure is a PNG; name it FILE.png")
    if not image.parent.is_dir():
        raise UserError(f"--out {image}: no such folder {image.parent}")
    records = [read_run(folder) for folder in folders]
    names = labels(records)
    return [summarize(record, name) for record, name in zip(records, names)], plot_runs(records, names, image)
