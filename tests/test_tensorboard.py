"""TensorBoard event files: the same numbers as metrics.jsonl, read back with TensorBoard's own
reader, after a crash and a resume too; and a clear error when the package is missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import cli_error, events, tiny, write_corpus

from qwen3.train.loop import train
from qwen3.train.start import resume_configs

SETTINGS = dict(max_steps=30, log_interval=5, eval_interval=10, sample_interval=10, tensorboard=True,
                sample_prompts=["The king"])


@pytest.fixture(scope="module")
def shared(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("tensorboard")
    return {"source": write_corpus(folder / "corpus.txt"), "cache": str(folder / "cache"), "root": folder}


def crash_at(step: int):
    def should_stop(current: int) -> bool:
        if current == step:
            raise RuntimeError("killed")
        return False
    return should_stop


def test_event_files_hold_the_metrics_once_after_a_crash_and_a_resume(shared, tmp_path):
    out = tmp_path / "run"
    # Logged up to step 25, checkpointed at 20: the resumed run repeats steps 21-25.
    with pytest.raises(RuntimeError, match="killed"):
        train(*tiny(shared, out, **SETTINGS), should_stop=crash_at(27))
    assert max(e["step"] for e in events(out)) == 25
    train(*resume_configs(out), resume=True)
    recorded = events(out)
    assert max(e["step"] for e in recorded) == 30

    board = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    board.Reload()
    numbers = {key for event in recorded for key, value in event.items()
               if key != "step" and isinstance(value, (int, float))}
    assert set(board.Tags()["scalars"]) == numbers >= {"loss", "val_loss", "lr", "grad_norm", "tokens"}
    for tag in numbers:
        # Scalars are stored as float32; the purged steps 21-25 of the crashed part appear once.
        expected = [(e["step"], float(np.float32(e[tag]))) for e in recorded if tag in e]
        assert [(s.step, s.value) for s in board.Scalars(tag)] == expected, tag
    texts = board.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [e["step"] for e in recorded if "samples" in e] == [10, 20, 30]
    table = texts[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| prompt | greedy | sampled |") and "| The king |" in table


def test_a_new_run_in_the_folder_starts_a_new_record(shared, tmp_path):
    out = tmp_path / "run"
    train(*tiny(shared, out, **{**SETTINGS, "max_steps": 10}))
    train(*tiny(shared, out, **{**SETTINGS, "max_steps": 5, "eval_interval": 5}))
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    assert [s.step for s in board.Scalars("loss")] == [5]


def test_tensorboard_without_the_package_is_a_one_line_error_before_training(shared, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` then raises
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    out = tmp_path / "run"
    line = cli_error(capsys, ["train", "--preset", "tiny", "--data", shared["source"], "--out", str(out),
                              "--set", f"cache_dir={shared['cache']}", "--set", "tensorboard=true"])
    assert line == ("qwen3 train: error: tensorboard=true needs the tensorboard package: pip install tensorboard "
                    "(or pip install -e '.[tensorboard]' in a clone)")
    assert not out.exists()
