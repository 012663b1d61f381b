"""The plan `qwen3 train` prints first, and the wall-clock it estimates from a few timed steps and
records in metrics.jsonl."""

from __future__ import annotations

import json

from test_train import write_corpus

from qwen3 import cli
from qwen3.train.plan import RunPlan


def test_the_plan_counts_evaluations_at_each_interval_and_the_end():
    plan = RunPlan(first_step=1, max_steps=65, tokens_per_step=256, eval_interval=30, eval_tokens=1000)
    assert [plan.evaluations_after(step) for step in (0, 29, 30, 59, 60, 64, 65)] == [3, 3, 2, 2, 1, 1, 0]
    assert plan.describe() == "plan: 65 steps x 256 tokens = 16,640 training tokens, 3 evaluations of 1,000 tokens"
    resumed = RunPlan(first_step=61, max_steps=60 + 5, tokens_per_step=256, eval_interval=30, eval_tokens=1000)
    assert resumed.describe().startswith("plan: 5 steps x 256 tokens = 1,280 training tokens, 1 evaluation ")


def events(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_estimate_is_logged_recorded_and_near_the_actual_wall_clock(tmp_path, capsys, one_thread):
    """A 60-step tiny run, then resumed to 70. Loose bounds: the machine may be shared, and a tiny
    run's checkpoint saving (not estimated) weighs about as much as its steps; a wrong unit or a
    missing term still falls far outside them."""
    out = tmp_path / "run"
    settings = [arg for setting in ("eval_interval=30", f"cache_dir={tmp_path / 'cache'}", "device=cpu",
                                    "dtype=float32", "peak_flops=1e11") for arg in ("--set", setting)]
    cli.main(["train", "--preset", "tiny", "--data", write_corpus(tmp_path / "corpus.txt"), "--out", str(out),
              "--max-steps", "60", *settings])
    log = capsys.readouterr().err
    val_tokens = json.loads((out / "run.json").read_text())["data"]["val_tokens"]
    assert f"plan: 60 steps x 256 tokens = 15,360 training tokens, 2 evaluations of {val_tokens:,} tokens" in log
    assert log.count("estimated wall-clock of the whole run: ") == 1
    (estimate,) = [e for e in events(out) if "estimated_total_s" in e]
    assert estimate["step"] == 4 and estimate["timed_steps"] == 3 and estimate["estimated_evaluations"] == 2
    actual = events(out)[-1]["elapsed_s"]  # at the last evaluation
    assert actual / 5 < estimate["estimated_total_s"] < actual * 5, (estimate, actual)

    cli.main(["train", "--resume", str(out), "--max-steps", "70"])
    log = capsys.readouterr().err
    assert "plan: 10 steps x 256 tokens = 2,560 training tokens, 1 evaluation of " in log
    (resumed,) = [e for e in events(out) if "estimated_total_s" in e and e["step"] > 60]
    assert resumed["step"] == 64 and resumed["estimated_evaluations"] == 1
    assert resumed["estimated_total_s"] > actual  # the whole run, its first part included
