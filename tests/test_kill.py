"""A training run SIGKILLed again and again, at random moments and inside evaluation and saving, and
resumed after each kill: its checkpoints are never lost or corrupt, and it ends exactly where an
uninterrupted run ends.

The run is `python -m qwen3 train` on the tiny preset and the generated corpus of test_train.py,
evaluating and saving every 2 steps. Each attempt is killed at one kind of moment, drawn in turn:

* starting   a random delay after the start: imports, recovery, data and model loading;
* training   a random delay after one of its first steps: training, evaluation or saving;
* evaluating as soon as the log line of an evaluation step appears, while it evaluates;
* saving     a random delay after a `.last.tmp-*` or `.best.tmp-*` folder appears;
* stopping   SIGTERM (the run saves last/ and stops), then SIGKILL while that save runs.

After every kill `last/` (and `best/`) must load in ours and in transformers and must not have
gone back in steps; the next attempt resumes it (or starts afresh while none was saved). Kills
make at most one save of progress each, and none near the end, so the quota of kills is reached
before the last step; then one attempt runs to the end.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import run_env, write_corpus
from transformers import AutoModelForCausalLM
from transformers.utils import logging as transformers_logging

from qwen3.model.checkpoint import load_model, load_trainer_state

KILLS = 20
SETTINGS = dict(max_steps=30, eval_interval=2, log_interval=1, warmup_steps=4, device="cpu",
                dtype="float32", peak_flops=1e11)
MOMENTS = ["starting", "training", "evaluating", "saving", "stopping"]
PHASES = ["starting", "training", "evaluating", "saving"]  # where a kill can land
POLL = 0.002  # seconds between looks at the run folder


def command(source: str, cache: Path, out: Path, resume: bool) -> list[str]:
    train = [sys.executable, "-m", "qwen3", "train"]
    if resume:  # the saved configuration carries the settings
        return [*train, "--resume", str(out)]
    settings = {**SETTINGS, "cache_dir": cache}
    return [*train, "--preset", "tiny", "--data", source, "--out", str(out),
            *[arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]]


def events(out: Path) -> list[dict]:
    """metrics.jsonl as far as it is complete (a line being written is skipped)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.endswith("\n")]


def temporaries(out: Path) -> set[str]:
    try:
        return {name for name in os.listdir(out) if ".tmp-" in name}
    except FileNotFoundError:
        return set()


def unlinked_versions(out: Path) -> set[str]:
    """Versions of best/ or last/ that are not their link's target: a kill inside a save left them."""
    targets = {os.readlink(out / name) for name in ("best", "last") if (out / name).is_symlink()}
    return {name for name in os.listdir(out) if name.startswith((".best.", ".last."))} - targets


def saved_step(out: Path) -> int:
    return load_trainer_state(out / "last", mmap=True)["step"] if (out / "last").exists() else 0


def stamp(file: Path) -> int | None:
    return file.stat().st_mtime_ns if file.exists() else None


class Attempt:
    """One `qwen3 train` process on the run folder, resumed from `resumed_from` (0: a new run)."""

    def __init__(self, argv: list[str], out: Path, log: Path) -> None:
        self.out, self.log = out, log
        self.resumed_from = saved_step(out)
        self.run_json = stamp(out / "run.json")
        with open(log, "w") as file:
            self.process = subprocess.Popen(argv, env=run_env(), stdout=file, stderr=subprocess.STDOUT)

    def new_steps(self) -> list[int]:
        """The steps this process logged: none until it rewrote run.json (after it cut
        metrics.jsonl back to the resumed step, dropping the lines a killed attempt logged past it)."""
        if stamp(self.out / "run.json") == self.run_json:
            return []
        return [e["step"] for e in events(self.out) if "loss" in e and e["step"] > self.resumed_from]

    def wait_until(self, condition, timeout: float = 120) -> bool:
        """Poll `condition` until it holds (True) or the process ends (False)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                return False
            assert time.monotonic() < deadline, f"no progress: {self.log.read_text()[-2000:]}"
            time.sleep(POLL)
        return True

    def kill_at(self, moment: str, progress: bool, startup: float, rng: random.Random) -> bool:
        """Wait for `moment` and SIGKILL the process there; False when it ended first."""
        interval = SETTINGS["eval_interval"]
        # With `progress` the kill may come one save after the resumed step, else before any.
        occurrence = rng.randint(1, 2) if progress else 1
        reached = True
        if moment == "starting":
            time.sleep(rng.uniform(0, startup))
        elif moment == "training":
            reached = self.wait_until(lambda: len(self.new_steps()) >= occurrence)
            time.sleep(rng.uniform(0, 0.2))
        elif moment == "evaluating":
            target = (self.resumed_from // interval + occurrence) * interval
            reached = self.wait_until(lambda: target in self.new_steps())
        else:
            if moment == "stopping":
                if not self.wait_until(self.new_steps):
                    return False
                self.process.send_signal(signal.SIGTERM)
                occurrence = 1
            seen: set[str] = set()

            def saving() -> bool:
                current = temporaries(self.out)
                seen.update(current)
                return len(seen) >= occurrence and bool(current)

            reached = self.wait_until(saving)
            time.sleep(rng.uniform(0, 0.02))
        if not reached or self.process.poll() is not None:
            return False
        self.process.kill()
        self.process.wait()
        return True

    def phase(self) -> str:
        """Where the kill landed, read from what it left behind."""
        if temporaries(self.out) or unlinked_versions(self.out):
            return "saving"
        steps = self.new_steps()
        if not steps:
            return "starting"
        evaluated = {e["step"] for e in events(self.out) if "val_loss" in e}
        if steps[-1] % SETTINGS["eval_interval"] == 0 and steps[-1] not in evaluated:
            return "evaluating"
        return "training"


def check_checkpoints(out: Path, expect_last: bool, previous_step: int) -> list[str]:
    """What is wrong with best/ and last/ right after a kill (nothing repaired them first)."""
    if expect_last and not (out / "last").is_dir():
        return ["last/ is missing"]
    problems = []
    for name in ("best", "last"):
        folder = out / name
        if not folder.exists():
            continue
        try:
            load_model(folder)
            AutoModelForCausalLM.from_pretrained(folder)
        except Exception as error:  # any failure to load is a corrupt checkpoint
            problems.append(f"{name}/: {error}")
    if (out / "last").exists() and saved_step(out) < previous_step:
        problems.append(f"last/ went back from step {previous_step} to {saved_step(out)}")
    return problems


@pytest.fixture
def quiet_transformers():
    """No "Loading weights" bar for each of the many loads."""
    transformers_logging.disable_progress_bar()
    yield
    transformers_logging.enable_progress_bar()


@pytest.mark.slow
def test_sigkill_at_any_moment_never_loses_the_run(tmp_path, quiet_transformers):
    started = time.monotonic()
    source = write_corpus(tmp_path / "corpus.txt")
    cache = tmp_path / "cache"
    reference = tmp_path / "reference"
    completed = subprocess.run(command(source, cache, reference, resume=False), env=run_env(),
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]

    out = tmp_path / "run"
    rng = random.Random(int(os.environ.get("KILL_SEED", "0")))
    moments: list[str] = []
    kills, attempts, corrupt, lost = 0, 0, [], []
    drawn = {name: 0 for name in MOMENTS}
    landed = {name: 0 for name in PHASES}
    stops = 0  # stopping attempts whose save ended before the kill came
    startup = 4.0  # seconds to the first step, measured on the way
    attempt = None
    try:
        while not lost:
            has_last = (out / "last").exists()
            attempts += 1
            attempt = Attempt(command(source, cache, out, resume=has_last), out,
                              tmp_path / f"attempt-{attempts}.log")
            if kills >= KILLS:  # the last attempt runs to the end
                attempt.process.wait(timeout=600)
                if attempt.process.returncode != 0:
                    lost.append(f"attempt {attempts}: {attempt.log.read_text()[-2000:]}")
                break
            assert attempt.resumed_from < SETTINGS["max_steps"], "finished before the quota of kills"
            if not moments:
                moments = rng.sample(MOMENTS, len(MOMENTS))
            moment = moments.pop()
            # No progress near the end, so the run is still unfinished when the quota is reached.
            progress = attempt.resumed_from + 3 * SETTINGS["eval_interval"] < SETTINGS["max_steps"]
            begun = time.monotonic()
            if moment != "starting" and attempt.wait_until(attempt.new_steps):
                startup = time.monotonic() - begun
            if attempt.kill_at(moment, progress, startup, rng):
                kills += 1
                drawn[moment] += 1
                landed[attempt.phase()] += 1
                corrupt += check_checkpoints(out, has_last, attempt.resumed_from)
            elif attempt.process.wait(timeout=600) == 0:  # a stop that saved in time
                stops += 1
            else:
                lost.append(f"attempt {attempts}: {attempt.log.read_text()[-2000:]}")
    finally:  # a failed check leaves no process running
        if attempt is not None and attempt.process.poll() is None:
            attempt.process.kill()

    wall = time.monotonic() - started
    print(f"\n{kills} SIGKILLs in {attempts} attempts; drawn: "
          f"{', '.join(f'{n} {name}' for name, n in drawn.items())}; landed: "
          f"{', '.join(f'{n} {name}' for name, n in landed.items())}; {stops} clean stops; "
          f"corrupt checkpoints {len(corrupt)}, runs lost {len(lost)}; {wall:.0f} s")
    assert not corrupt and not lost, (corrupt, lost)
    assert kills >= KILLS and landed["saving"] and landed["evaluating"], landed
    assert saved_step(out) == SETTINGS["max_steps"]
    # The same run as the uninterrupted one: losses, evaluations and weights, bit for bit.
    ours, theirs = events(out), events(reference)
    assert [(e["step"], e["loss"]) for e in ours if "loss" in e] == [
        (e["step"], e["loss"]) for e in theirs if "loss" in e]
    assert [(e["step"], e["val_loss"]) for e in ours if "val_loss" in e] == [
        (e["step"], e["val_loss"]) for e in theirs if "val_loss" in e]
    for (name, a), b in zip(load_model(out / "last").state_dict().items(),
                            load_model(reference / "last").state_dict().values()):
        assert torch.equal(a, b), name
    # Nothing stale left: each checkpoint is one link and its one version.
    hidden = sorted(name for name in os.listdir(out) if name.startswith("."))
    assert hidden == sorted(os.readlink(out / name) for name in ("best", "last"))
