"""The record of a training run beside its checkpoints: run.json, metrics.jsonl, loss.png and, when
asked for, TensorBoard event files.

    OUT/run.json        the resolved configuration and environment, written when the run starts
    OUT/metrics.jsonl   one JSON object per event (log, evaluation, samples, estimate), appended
    OUT/loss.png        training and validation loss against the step, redrawn at each evaluation
    OUT/tensorboard/    with `tensorboard=true`, the same events as TensorBoard event files: each
                        number a scalar under its metrics.jsonl key, the samples a text table

Only the main process writes them; in the others every method does nothing, so the loop calls
them without asking which process it is. A resumed run cuts metrics.jsonl back to its step, and
its TensorBoard writer purges the events after that step (`purge_step`), so neither shows the
steps of the interrupted part twice. `qwen3 compare` (qwen3/train/compare.py) reads them back and draws
with the same matplotlib set-up.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from qwen3.atomic import remove_checkpoint
from qwen3.errors import UserError
from qwen3.model.checkpoint import CHECKPOINT_NAMES


class RunFiles:
    """The run folder's record files (written only when `enabled`: rank 0)."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool = False) -> None:
        self.out = out
        self.enabled = enabled
        self.metrics = out / "metrics.jsonl"
        # Imported in every process, so that a missing package stops them all before training.
        self.summary_writer = summary_writer_class() if tensorboard else None
        self.tensorboard: Any = None  # the writer, opened by `start`

    def start(self, description: dict[str, Any], resumed_step: int | None) -> None:
        """run.json; metrics.jsonl cut back to the resumed step, or for a new run emptied (and the
        checkpoints, plot and event files of a finished earlier run in the same folder removed); the
        TensorBoard writer, when asked for, opened."""
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        kept = []
        if resumed_step is not None and self.metrics.is_file():
            kept = [line for line in self.metrics.read_text(encoding="utf-8").splitlines()
                    if line and json.loads(line)["step"] <= resumed_step]
        self.metrics.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        if resumed_step is None:
            for stale in CHECKPOINT_NAMES:
                remove_checkpoint(self.out / stale)
            (self.out / "loss.png").unlink(missing_ok=True)
            shutil.rmtree(self.out / "tensorboard", ignore_errors=True)
        if self.summary_writer is not None:
            self.tensorboard = self.summary_writer(
                str(self.out / "tensorboard"), purge_step=None if resumed_step is None else resumed_step + 1)
        run = {**description, "resumed_from_step": resumed_step}
        (self.out / "run.json").write_text(json.dumps(run, indent=2, default=str) + "\n", encoding="utf-8")

    def write_event(self, event: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.metrics, "a", encoding="utf-8") as file:
                file.write(json.dumps(event) + "\n")
            if self.tensorboard is not None:
                write_summaries(self.tensorboard, event)

    def plot(self) -> None:
        if self.enabled:
            plot_losses(self.metrics, self.out / "loss.png")


def summary_writer_class() -> type:
    """torch's TensorBoard SummaryWriter (it needs only the tensorboard package), or a UserError."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("tensorboard=true needs the tensorboard package: pip install tensorboard "
                        "(or pip install -e '.[tensorboard]' in a clone)") from None
    return SummaryWriter


def write_summaries(writer: Any, event: dict[str, Any]) -> None:
    """One metrics.jsonl event at its step: each number a scalar named by its key, each list of
    records (the samples) a Markdown table; flushed, as metrics.jsonl is, so a reader sees it now."""
    step = event["step"]
    for key, value in event.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            writer.add_scalar(key, value, step)
        elif isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            writer.add_text(key, markdown_table(value), step)
    writer.flush()


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Records with the same keys as a Markdown table (TensorBoard renders text summaries as Markdown)."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def read_events(metrics_file: Path) -> list[dict[str, Any]]:
    """The events of a metrics.jsonl. A last line without its newline is being written by a run in
    progress and is left out; any other line that is not a JSON object is a UserError."""
    text = metrics_file.read_text(encoding="utf-8")
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()
    events = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{metrics_file} line {number} is not JSON ({error.msg}): {line[:80]!r}") from None
        if not isinstance(event, dict) or not isinstance(event.get("step"), int):
            raise UserError(f"{metrics_file} line {number} is not a metrics event (an object with a step): "
                            f"{line[:80]!r}")
        events.append(event)
    return events


def pyplot() -> Any:
    """matplotlib.pyplot drawing to files only (the Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, image: Path) -> None:
    """Write `fig` to `image` whole or not at all (a reader never sees half a PNG), and free it."""
    temporary = image.with_name(f".{image.name}.tmp.png")
    fig.savefig(temporary)
    pyplot().close(fig)
    temporary.replace(image)


def plot_losses(metrics_file: Path, image: Path) -> None:
    """Training and validation loss against the optimizer step, from metrics.jsonl, as a PNG."""
    events = read_events(metrics_file)
    train = [(e["step"], e["loss"]) for e in events if "loss" in e]
    val = [(e["step"], e["val_loss"]) for e in events if "val_loss" in e]
    fig, ax = pyplot().subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="training (mean since the previous log step)", color="tab:blue")
    if val:
        ax.plot(*zip(*val), "o-", label="validation (whole split)", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.set_title(f"{metrics_file.parent.name}: loss")
    ax.grid(alpha=0.3)
    if train or val:  # a run stopped before its first log has nothing to name
        ax.legend()
    fig.tight_layout()
    save_png(fig, image)


def format_duration(seconds: float) -> str:
    """A wall-clock as people read it: 0.0164 s, 8.21 s, 4 min 43 s, 2 h 05 min."""
    if seconds < 59.5:
        return f"{seconds:.3g} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
