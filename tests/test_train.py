"""The training loop: loss falls, steps are optimizer steps, the schedule, exact resume, Ctrl-C, NaN,
torchrun DDP against one process, and clear errors for bad configuration.

Runs use the `tiny` preset on a generated corpus, with one thread per process: on a small shared
machine two OpenMP threads per tiny step spin against each other (measured 10x slower).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qwen3 import cli
from qwen3.allocator import tune_malloc
from qwen3.config import apply_overrides, preset
from qwen3.errors import UserError
from qwen3.model.checkpoint import load_model, load_trainer_state
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.model.loss import CausalLMLoss
from qwen3.train.loop import TrainingDiverged, train
from qwen3.train.muon import build_optimizers
from qwen3.train.plan import flops_per_token
from qwen3.train.schedule import apply_schedule, lr_factor
from qwen3.train.start import resume_configs

REPO = Path(__file__).resolve().parents[1]


def write_corpus(path: Path, documents: int = 240) -> str:
    """Short paragraphs from a small grammar: learnable in a few dozen tiny steps."""
    rng = random.Random(0)
    subjects = ["the king", "a shepherd", "the people", "my brother", "the old woman", "a child"]
    verbs = ["went to", "looked at", "spoke unto", "gave bread to", "walked with", "remembered"]
    objects = ["the city", "the river", "the mountain", "his father", "the temple", "the sea"]
    tails = ["in the morning", "at night", "with great joy", "for many days", "without fear"]
    paragraphs = [" ".join(f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} "
                           f"{rng.choice(objects)} {rng.choice(tails)}."
                           for _ in range(rng.randint(4, 10)))
                  for _ in range(documents)]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return f"{path}:doc=paragraph"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    return {"source": write_corpus(folder / "corpus.txt"), "cache": str(folder / "cache"),
            "root": folder}


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # module scope: set before the module-scoped reference run starts
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(shared, out: Path, **values):
    """The tiny preset on the test corpus, float32 on the CPU, with `values` applied."""
    model_config, train_config = preset("tiny")
    settings = dict(data=[shared["source"]], cache_dir=shared["cache"], out_dir=str(out),
                    device="cpu", dtype="float32", peak_flops=1e11)
    settings.update(values)
    return apply_overrides(model_config, train_config, settings)


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events(out) if "loss" in e}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


REFERENCE = dict(max_steps=40, log_interval=5, eval_interval=20, warmup_steps=10, min_lr_ratio=0.1)


@pytest.fixture(scope="module")
def reference_run(shared):
    """40 uninterrupted steps: the run the other tests compare against."""
    out = shared["root"] / "reference"
    result = train(*tiny(shared, out, **REFERENCE))
    return out, result


def test_loss_falls_and_the_run_folder_is_complete(reference_run):
    out, result = reference_run
    assert result.step == 40 and not result.interrupted
    losses = train_losses(out)
    assert sorted(losses) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert losses[40] < losses[5] - 1.5
    evaluations = [e for e in events(out) if "val_loss" in e]
    assert [e["step"] for e in evaluations] == [20, 40]
    assert evaluations[1]["val_loss"] < evaluations[0]["val_loss"]
    final = evaluations[1]
    assert math.isclose(final["val_ppl"], math.exp(final["val_loss"]), rel_tol=1e-9)
    assert 0 < final["val_acc"] < 1 and 0 < final["val_bpb"] < final["val_loss"]
    log = next(e for e in events(out) if "loss" in e)
    assert {"step", "tokens", "lr", "loss", "grad_norm", "tok_per_s", "mfu", "elapsed_s"} <= set(log)
    assert log["tokens"] == 5 * 4 * 1 * 64  # steps * batch * accumulation * seq_len
    run = json.loads((out / "run.json").read_text())
    assert run["parameters"] == result_model_parameters(out)
    assert run["train"]["max_steps"] == 40 and run["versions"]["torch"] == torch.__version__
    assert (out / "loss.png").stat().st_size > 10_000


def result_model_parameters(out: Path) -> int:
    return load_model(out / "last").num_parameters()


def test_checkpoints_are_hugging_face_folders_our_loader_reads(reference_run, shared):
    out, result = reference_run
    for name in ("best", "last"):
        folder = out / name
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
        for file in ("model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json"):
            assert (folder / file).is_file(), file
    assert not (out / "best" / "trainer_state.pt").exists()
    state = load_trainer_state(out / "last")
    assert state["step"] == 40 and len(state["optimizers"]) == 2
    assert state["best_val_loss"] == result.best_val_loss
    # The best checkpoint reproduces the best validation loss.
    from qwen3.data.store import prepare
    from qwen3.train.metrics import score_tokens

    model = load_model(out / "best")
    data = prepare([shared["source"]], tokenizer=str(out / "best"), cache_dir=shared["cache"],
                   progress=False)
    score = score_tokens(model, data.val_tokens, 64, 4, data.val_bytes)
    assert score.loss == pytest.approx(result.best_val_loss, abs=1e-6)


def test_lr_schedule_reaches_the_warmup_peak_and_the_cosine_floor(reference_run):
    assert lr_factor(1, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(10, 10, 100, 0.1) == 1.0
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)  # half way down the cosine
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    factors = [lr_factor(s, 10, 100, 0.1) for s in range(1, 101)]
    assert factors.index(max(factors)) == 9
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))  # never rises after warmup
    out, _ = reference_run
    lrs = {e["step"]: e["lr"] for e in events(out) if "loss" in e}
    muon_lr = preset("tiny")[1].muon_lr
    assert lrs[10] == pytest.approx(muon_lr)
    assert lrs[40] == pytest.approx(0.1 * muon_lr)


@pytest.mark.parametrize("warmup", [0, 4])
def test_muon_momentum_warmup_rises_linearly_to_muons_own(warmup):
    model = Qwen3ForCausalLM(preset("tiny")[0])
    optimizers = build_optimizers(model, "muon", muon_lr=0.02, adamw_lr=1e-3)
    config = apply_overrides(*preset("tiny"), {"muon_momentum_warmup": warmup, "warmup_steps": 2,
                                               "max_steps": 10})[1]
    momenta = []
    for step in range(1, 8):
        apply_schedule(optimizers, step, config)
        momenta.append(optimizers[0].param_groups[0]["momentum"])
        assert optimizers[0].param_groups[0]["lr"] == pytest.approx(0.02 * lr_factor(step, 2, 10, 0.1))
        assert "momentum" not in optimizers[1].param_groups[0]  # AdamW's betas stay as they are
    expected = [0.95] * 7 if not warmup else [0.85, 0.875, 0.9, 0.925, 0.95, 0.95, 0.95]
    assert momenta == pytest.approx(expected)


def test_gradient_accumulation_runs_that_many_micro_batches_per_step(shared, tmp_path, monkeypatch):
    calls = []
    original = CausalLMLoss.forward

    def counting(self, x, y, divisor=None):
        calls.append(tuple(x.shape))
        return original(self, x, y, divisor)

    monkeypatch.setattr(CausalLMLoss, "forward", counting)
    result = train(*tiny(shared, tmp_path / "run", grad_accum=4, max_steps=3, log_interval=1,
                         eval_interval=3))
    assert result.step == 3
    assert calls == [(4, 64)] * 12
    assert [e["tokens"] for e in events(tmp_path / "run") if "loss" in e] == [1024, 2048, 3072]


def test_resume_continues_exactly_like_an_uninterrupted_run(reference_run, shared, tmp_path):
    reference, _ = reference_run
    out = tmp_path / "run"
    stopped = train(*tiny(shared, out, **REFERENCE), should_stop=lambda step: step == 17)
    assert stopped.interrupted and stopped.step == 17
    assert load_trainer_state(out / "last")["step"] == 17
    with pytest.raises(UserError, match="unfinished run.*--resume"):
        train(*tiny(shared, out, **REFERENCE))  # a new run may not overwrite an unfinished one
    resumed = train(*resume_configs(out), resume=True)
    assert resumed.step == 40 and not resumed.interrupted
    # Same losses at every log step (17 was mid-interval: the pending sums were restored too),
    # the same evaluations, the same final weights.
    assert train_losses(out) == train_losses(reference)
    val = [(e["step"], e["val_loss"]) for e in events(out) if "val_loss" in e]
    assert val == [(e["step"], e["val_loss"]) for e in events(reference) if "val_loss" in e]
    ours, theirs = load_model(out / "last"), load_model(reference / "last")
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_may_extend_the_run_but_not_change_the_model(reference_run):
    out, _ = reference_run
    model_config, train_config = resume_configs(out, {"max_steps": "60"})
    assert train_config.max_steps == 60 and train_config.out_dir == str(out)
    with pytest.raises(UserError, match="shape cannot change.*hidden_size"):
        resume_configs(out, {"hidden_size": "32"})
    with pytest.raises(UserError, match="optimizer 'muon'; it cannot change to 'adamw'"):
        train(*resume_configs(out, {"optimizer": "adamw"}), resume=True)
    with pytest.raises(UserError, match="embedding_lr .* cannot be turned on or off when resuming"):
        train(*resume_configs(out, {"embedding_lr": "0.05"}), resume=True)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shared, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(*tiny(shared, out, max_steps=6, eval_interval=3, log_interval=3))
    weights = digest(out / "last" / "model.safetensors")
    original = CausalLMLoss.forward
    monkeypatch.setattr(CausalLMLoss, "forward", lambda self, x, y, divisor: original(self, x, y, divisor) * math.nan)
    with pytest.raises(TrainingDiverged, match=r"loss nan by step 9; stopped without saving "
                                               r"\(the last good checkpoint, .*last, is untouched\)"):
        train(*resume_configs(out, {"max_steps": 12}), resume=True)
    assert load_trainer_state(out / "last")["step"] == 6
    assert digest(out / "last" / "model.safetensors") == weights
    assert max(e["step"] for e in events(out)) == 6


def test_flops_per_token_counts_every_matmul_weight():
    model_config = preset("seed")[0]
    model = Qwen3ForCausalLM(dataclasses.replace(model_config, vocab_size=8192))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 12 * 3 * 4 * 32 * 256
    assert flops_per_token(model.config, 256) == 6 * linear + attention


def test_malloc_tuning_applies_on_glibc():
    assert tune_malloc() is (sys.platform == "linux")


def cli_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0]
    return lines[0]


@pytest.mark.parametrize("argv,message", [
    (["--set", "bogus=1"], "unknown config key 'bogus'"),
    (["--set", "batch_size=many"], "batch_size: expected an integer, got 'many'"),
    (["--set", "warmup_steps=-3"], "warmup_steps must be a non-negative integer"),
    (["--set", "sample_interval=-1"], "sample_interval must be a non-negative integer"),
    (["--set", "optimizer=sgd"], "optimizer must be 'muon' or 'adamw'"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--resume", "/nonexistent/run"], "/nonexistent/run: no such folder, nothing to resume"),
    (["--set", "dtype=float16", "--set", "device=cpu"], "float16 trains on CUDA devices only"),
])
def test_bad_configuration_is_a_one_line_error(capsys, shared, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, ["train", "--preset", "tiny", "--data", shared["source"], *argv])
    assert line.startswith("qwen3 train: error: ") and message in line


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_ctrl_c_saves_last_and_exits_cleanly(shared, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "qwen3", "train", "--preset", "tiny", "--data", shared["source"],
         "--out", str(out), "--max-steps", "100000", "--set", f"cache_dir={shared['cache']}",
         "--set", "log_interval=1", "--set", "device=cpu", "--set", "dtype=float32"],
        cwd=tmp_path, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").is_file() and len(events(out)) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (0, 130), stderr
    assert "Traceback" not in stderr and f"--resume {out}" in stderr
    step = load_trainer_state(out / "last")["step"]
    assert 3 <= step < 100000
    resumed = train(*resume_configs(out, {"max_steps": step + 2}), resume=True)
    assert resumed.step == step + 2


def test_torchrun_two_processes_match_one_process(shared, tmp_path):
    settings = dict(grad_accum=2, max_steps=8, log_interval=1, eval_interval=8)
    single = train(*tiny(shared, tmp_path / "single", **settings))
    completed = torchrun(shared, tmp_path / "ddp", *set_arguments(settings))
    assert completed.returncode == 0, completed.stderr[-3000:]
    # Each rank ran one micro-batch per step on its half of the same global batch.
    assert_same_run(tmp_path / "ddp", tmp_path / "single", single, steps=8)


def torchrun(shared, out: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`qwen3 train --preset tiny` in 2 processes on the CPU, with `args` added."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "qwen3", "train", "--preset", "tiny", "--data", shared["source"], "--out", str(out),
               "--set", f"cache_dir={shared['cache']}", "--set", "device=cpu", "--set", "dtype=float32",
               "--set", "peak_flops=1e11", *args]
    return subprocess.run(command, cwd=out.parent, env=run_env(), capture_output=True, text=True,
                          timeout=timeout)


def set_arguments(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def assert_same_run(ddp: Path, single_out: Path, single, steps: int) -> None:
    """The torchrun run in `ddp` logged the losses of the one-process run, within 2e-3."""
    ours, theirs = train_losses(ddp), train_losses(single_out)
    assert sorted(ours) == sorted(theirs) == list(range(1, steps + 1))
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], abs=2e-3), step
    ddp_val = [e["val_loss"] for e in events(ddp) if "val_loss" in e]
    assert ddp_val == [pytest.approx(single.best_val_loss, abs=2e-3)]
    assert load_trainer_state(ddp / "last")["step"] == steps


def test_command_line_precedence_preset_then_toml_then_set_then_flags(shared, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.toml").write_text(
        f'preset = "tiny"\n[train]\ndata = ["{shared["source"]}"]\ncache_dir = "{shared["cache"]}"\n'
        f'max_steps = 5\nlog_interval = 5\neval_interval = 2\ndevice = "cpu"\ndtype = "float32"\n'
        f'peak_flops = 1e11\n[model]\nhidden_size = 32\n', encoding="utf-8")
    cli.main(["train", "--config", "run.toml", "--set", "log_interval=1", "--max-steps", "2",
              "--out", "cli-run"])
    assert "step 2: validation loss" in capsys.readouterr().out
    run = json.loads((tmp_path / "cli-run" / "run.json").read_text())
    assert run["model"]["hidden_size"] == 32 and run["model"]["num_hidden_layers"] == 2  # toml, preset
    assert run["train"]["max_steps"] == 2 and run["train"]["log_interval"] == 1  # flag, --set
    assert sorted(train_losses(tmp_path / "cli-run")) == [1, 2]


def test_torchrun_shares_the_rows_when_accumulation_cannot_be_split(shared, tmp_path):
    # The tiny preset: batch 4, no accumulation; 2 processes take 2 rows each of the same batch.
    settings = dict(max_steps=6, log_interval=1, eval_interval=6)
    single = train(*tiny(shared, tmp_path / "single", **settings))
    completed = torchrun(shared, tmp_path / "ddp", *set_arguments(settings))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert_same_run(tmp_path / "ddp", tmp_path / "single", single, steps=6)
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["micro_batch"] == {"rows_per_process": 2, "micro_steps": 1}
    assert run["tokens_per_step"] == 4 * 64
    # MFU per device: each of the 2 devices did half the tokens, against its own peak.
    for event in (e for e in events(tmp_path / "ddp") if "mfu" in e):
        per_device = event["tok_per_s"] / 2 * run["flops_per_token"] / run["peak_flops"]
        assert event["mfu"] == pytest.approx(per_device, rel=1e-9)


@pytest.mark.parametrize("case", ["unfinished run", "batch that cannot be shared"])
def test_a_user_error_under_torchrun_stops_every_process_promptly_with_one_message(shared, tmp_path, case):
    out = tmp_path / "run"
    args = []
    if case == "unfinished run":
        train(*tiny(shared, out, max_steps=10, eval_interval=10), should_stop=lambda step: step == 2)
        expected = "holds an unfinished run (step 2 of 10)"
    else:
        args = ["--set", "batch_size=3"]
        expected = "2 processes cannot share a global batch of batch_size 3"
    started = time.monotonic()
    completed = torchrun(shared, out, *args, timeout=120)
    assert time.monotonic() - started < 60
    assert completed.returncode != 0
    assert completed.stderr.count(expected) == 1, completed.stderr[-3000:]
    assert completed.stderr.count("qwen3 train: error:") == 1
    assert "qwen3/" not in completed.stderr  # no traceback through our code in any process


def test_a_failed_compilation_says_so_and_trains_eagerly(shared, tmp_path, monkeypatch, capsys):
    settings = dict(max_steps=2, log_interval=1, eval_interval=2)
    eager = train(*tiny(shared, tmp_path / "eager", **settings))

    def failing_compile(function):
        def compiled(*args):
            raise RuntimeError("no compiler here\nmore detail")
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    fallback = train(*tiny(shared, tmp_path / "compiled", compile=True, **settings))
    assert "torch.compile failed (RuntimeError: no compiler here); continuing without compilation" \
        in capsys.readouterr().err
    assert train_losses(tmp_path / "compiled") == train_losses(tmp_path / "eager")
    assert fallback.best_val_loss == eager.best_val_loss


def test_targets_of_minus_100_are_left_out_of_the_loss():
    torch.manual_seed(0)
    model_config = dataclasses.replace(preset("tiny")[0], vocab_size=32)
    loss = CausalLMLoss(Qwen3ForCausalLM(model_config))
    x = torch.randint(0, 32, (2, 8))
    y = torch.randint(0, 32, (2, 8))
    masked = y.clone()
    masked[:, :5] = -100  # e.g. a prompt: only the reply's 3 tokens are learned
    logits = loss.model(x)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].flatten(0, 1), y[:, 5:].flatten())
    assert loss(x, masked).item() == pytest.approx(expected.item(), rel=1e-6)
