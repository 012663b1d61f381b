"""`qwen3 compare` on two tiny runs: the figure, the table, a run in progress, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from matplotlib.image import imread
from test_train import write_corpus

from qwen3 import cli
from qwen3.config import apply_overrides, preset
from qwen3.train.compare import compare, table
from qwen3.train.loop import train


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread) -> dict[str, Path]:
    """Two 40-step tiny runs, Muon and AdamW, evaluated at steps 20 and 40."""
    root = tmp_path_factory.mktemp("compare")
    source = write_corpus(root / "corpus.txt")
    for name, optimizer in (("muon-run", "muon"), ("adamw-run", "adamw")):
        train(*apply_overrides(*preset("tiny"), dict(
            data=[source], cache_dir=str(root / "cache"), out_dir=str(root / name), max_steps=40,
            eval_interval=20, optimizer=optimizer, device="cpu", dtype="float32", peak_flops=1e11)))
    return {name: root / name for name in ("muon-run", "adamw-run")}


def test_compare_draws_each_run_in_three_panels(runs, tmp_path):
    folders = [runs["muon-run"], runs["adamw-run"]]
    image = tmp_path / "both.png"
    _, fig = compare(folders, image)
    assert len(fig.axes) == 3
    for ax, key in zip(fig.axes, ("step", "tokens", "elapsed_s")):
        assert [line.get_label() for line in ax.lines] == ["muon-run", "adamw-run"]
        for line, folder in zip(ax.lines, folders):
            evaluations = [e for e in events(folder) if "val_bpb" in e]
            assert list(line.get_ydata()) == [e["val_bpb"] for e in evaluations]
            if key != "elapsed_s":  # the wall-clock axis may be in minutes or hours
                assert list(line.get_xdata()) == [e[key] for e in evaluations]
    assert "evaluation and checkpoint saving included" in fig.axes[2].get_xlabel()
    pixels = imread(image)
    assert pixels.shape[:2] == (round(4.5 * 110), 15 * 110)  # figsize x dpi: the PNG decodes whole


def test_the_table_holds_each_runs_final_numbers(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli.main(["compare", str(runs["muon-run"]), str(runs["adamw-run"])])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "steps", "tokens"]
    assert lines[-1] == "wrote compare.png" and (tmp_path / "compare.png").stat().st_size > 10_000
    for name, line in zip(("muon-run", "adamw-run"), lines[1:3]):
        out = runs[name]
        final = [e for e in events(out) if "val_loss" in e][-1]
        best = min(e["val_loss"] for e in events(out) if "val_loss" in e)
        parameters = json.loads((out / "run.json").read_text())["parameters"]
        cells = line.split()
        assert cells[:3] == [name, "40", f"{40 * 4 * 64:,}"]  # steps, steps x batch x seq_len
        assert [f"{final['val_loss']:.4f}", f"{final['val_bpb']:.4f}", f"{final['val_acc']:.2%}",
                f"{best:.4f}", f"{parameters:,}"] == cells[-6:-1]
        assert float(cells[-1].replace(",", "")) > 0  # training tokens/s


def test_a_run_in_progress_is_read_as_far_as_it_got(runs, tmp_path):
    """A copy cut after its first evaluation, with half a line being written: steps 20 of 40."""
    source = runs["muon-run"]
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(source / "run.json", partial / "run.json")
    lines = (source / "metrics.jsonl").read_text().splitlines(keepends=True)
    first_eval = next(i for i, line in enumerate(lines) if "val_loss" in line)
    (partial / "metrics.jsonl").write_text("".join(lines[:first_eval + 1]) + lines[first_eval + 1][:15])
    summaries, fig = compare([partial], tmp_path / "one.png")
    assert (summaries[0].step, summaries[0].max_steps) == (20, 40)
    assert table(summaries).splitlines()[1].split()[1] == "20/40"
    assert [len(ax.lines) for ax in fig.axes] == [1, 1, 1]


def bad_compare(capsys, *arguments: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", *arguments])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1
    return message


def test_bad_input_is_one_clear_line(runs, tmp_path, capsys):
    out = str(tmp_path / "out.png")
    (tmp_path / "empty").mkdir()
    assert "is not a run folder: it has no metrics.jsonl" in bad_compare(capsys, str(tmp_path / "empty"), "--out", out)
    assert "no such folder" in bad_compare(capsys, str(tmp_path / "missing"), "--out", out)
    early = tmp_path / "early"
    early.mkdir()
    log_event = next(line for line in (runs["muon-run"] / "metrics.jsonl").read_text().splitlines()
                     if '"loss"' in line)
    (early / "metrics.jsonl").write_text(log_event + "\n")
    assert "has no evaluation yet" in bad_compare(capsys, str(early), "--out", out)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text(log_event + "\n{not json\n" + log_event + "\n")
    assert "metrics.jsonl line 2 is not JSON" in bad_compare(capsys, str(broken), "--out", out)
    assert "name it FILE.png" in bad_compare(capsys, str(runs["muon-run"]), "--out", str(tmp_path / "x.jpg"))
