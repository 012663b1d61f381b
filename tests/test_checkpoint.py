"""Checkpoint folders: transformers loads ours, we load transformers', saves are atomic and durable and
leave nothing stale, and broken folders or runs with nothing to resume say what is wrong."""

import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config
from transformers import Qwen3ForCausalLM as ReferenceQwen3

from qwen3 import cli
from qwen3.atomic import recover
from qwen3.config import ModelConfig
from qwen3.model.checkpoint import CheckpointError, find_checkpoint, load_model, resume_state, save_model
from qwen3.model.decoder import Qwen3ForCausalLM


def small_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                  max_position_embeddings=64, eos_token_id=1, bos_token_id=0)
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture
def input_ids():
    return torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_our_folder(tmp_path, input_ids, tied):
    torch.manual_seed(0)
    ours = Qwen3ForCausalLM(small_config(tie_word_embeddings=tied, rope_theta=1e6)).eval()
    save_model(ours, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["rope_parameters"]["rope_theta"] == 1e6
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (reference(input_ids).logits - ours(input_ids)).abs().max() < 1e-4


@pytest.mark.parametrize("tied", [True, False])
def test_we_load_a_transformers_folder(tmp_path, input_ids, tied):
    torch.manual_seed(0)
    config = small_config(tie_word_embeddings=tied)
    reference = ReferenceQwen3(Qwen3Config(**config.to_hf_dict())).eval()
    reference.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert not ours.training
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    with torch.no_grad():
        assert (reference(input_ids).logits - ours(input_ids)).abs().max() < 1e-4


def test_round_trip_in_bfloat16_and_dtype_on_load(tmp_path, input_ids):
    model = Qwen3ForCausalLM(small_config()).to(torch.bfloat16)
    save_model(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_model(tmp_path / "bf16", dtype=torch.float32)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(loaded.model.embed_tokens.weight.bfloat16(), model.model.embed_tokens.weight)


LOAD_PEAK = """
import sys
import torch
from qwen3.model.checkpoint import load_model
from qwen3.runtime import peak_rss_mb

def resident_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

with torch.device("meta"):  # the meta kernels' first use imports ~70 MB of Python: before measuring
    torch.nn.Embedding(8, 8)
before = resident_mb()
model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
print(peak_rss_mb() - before, sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from Linux's /proc")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_a_bfloat16_checkpoint_costs_its_weights_in_the_chosen_dtype_and_no_second_copy(tmp_path, dtype):
    """48M parameters stored in bfloat16 (96 MB), loaded as float32 (192 MB) or as they are: memory
    grows by the loaded weights and the 16 MB conversion buffer, where reading the whole file first
    and converting it after held both copies (and converting tensor by tensor held each twice, with
    the allocator free to keep the freed copies)."""
    torch.manual_seed(0)
    config = small_config(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    save_model(Qwen3ForCausalLM(config).to(torch.bfloat16), tmp_path / "bf16")
    completed = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(tmp_path / "bf16"), dtype],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    grown, weights = map(float, completed.stdout.split())
    assert weights == pytest.approx(48.5 * (4 if dtype == "float32" else 2), rel=0.05)
    assert grown < weights * 1.05 + 16, f"loading grew the process by {grown:.0f} MB for {weights:.0f} MB of weights"


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_save_is_atomic_and_replaces(tmp_path):
    save_model(Qwen3ForCausalLM(small_config()), tmp_path / "ckpt")
    first = os.readlink(tmp_path / "ckpt")
    second = Qwen3ForCausalLM(small_config())
    save_model(second, tmp_path / "ckpt", trainer_state={"step": 7})
    # ckpt is a relative link to its one version: no temporary or previous version left behind.
    target = os.readlink(tmp_path / "ckpt")
    assert target != first and target.startswith(".ckpt.") and "/" not in target
    assert listing(tmp_path) == [target, "ckpt"]
    assert listing(tmp_path / "ckpt") == listing(tmp_path / target)  # no link left inside either
    loaded = load_model(tmp_path / "ckpt")
    assert torch.equal(loaded.model.norm.weight, second.model.norm.weight)
    assert torch.load(tmp_path / "ckpt" / "trainer_state.pt")["step"] == 7


def test_failed_save_leaves_the_old_checkpoint(tmp_path):
    model = Qwen3ForCausalLM(small_config())
    save_model(model, tmp_path / "ckpt")
    before = listing(tmp_path)

    class BrokenTokenizer:
        stop_token_ids = [1]
        pad_token_id = None

        def save_pretrained(self, folder):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_model(Qwen3ForCausalLM(small_config()), tmp_path / "ckpt", tokenizer=BrokenTokenizer())
    assert listing(tmp_path) == before
    assert torch.equal(load_model(tmp_path / "ckpt").model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_every_file_and_the_folder_are_fsynced_before_the_link_switches(tmp_path, monkeypatch):
    synced, switches = set(), []
    original_fsync, original_replace = os.fsync, os.replace

    def fsync(descriptor):
        synced.add(os.fstat(descriptor).st_ino)
        original_fsync(descriptor)

    def replace(source, target):
        if os.path.basename(target) == "ckpt":
            version = os.path.dirname(source)  # the link is made inside the new version
            inodes = {os.stat(os.path.join(version, name)).st_ino for name in os.listdir(version)
                      if name != os.path.basename(source)}
            switches.append(inodes | {os.stat(version).st_ino} <= synced)
        original_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_model(Qwen3ForCausalLM(small_config()), tmp_path / "ckpt", trainer_state={"step": 1})
    assert switches == [True]


def test_leftovers_of_killed_saves_go_but_a_live_writer_is_left_alone(tmp_path):
    save_model(Qwen3ForCausalLM(small_config()), tmp_path / "ckpt")
    # What a SIGKILL leaves: a half-written temporary and a written but never linked version,
    # both unlocked (the kernel drops a dead process's flock).
    for name in (".ckpt.tmp-0badf00d", ".ckpt.0badcafe"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    live = tmp_path / ".ckpt.tmp-5afe5afe"  # a folder another live process is writing
    live.mkdir()
    lock = os.open(live, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        save_model(Qwen3ForCausalLM(small_config()), tmp_path / "ckpt")
        assert listing(tmp_path) == sorted([os.readlink(tmp_path / "ckpt"), live.name, "ckpt"])
    finally:
        os.close(lock)
    recover(tmp_path / "ckpt")  # its writer is gone now
    assert listing(tmp_path) == [os.readlink(tmp_path / "ckpt"), "ckpt"]


def test_a_plain_folder_is_replaced_and_a_kill_while_it_was_moved_aside_is_recovered(tmp_path):
    model = Qwen3ForCausalLM(small_config())
    save_model(model, tmp_path / "linked")
    shutil.copytree(tmp_path / "linked", tmp_path / "ckpt")  # follows the link: a plain folder
    assert not (tmp_path / "ckpt").is_symlink()
    save_model(model, tmp_path / "ckpt", trainer_state={"step": 2})
    assert (tmp_path / "ckpt").is_symlink() and not (tmp_path / ".ckpt.old").exists()
    # A kill between moving the plain folder aside and linking the new version leaves no ckpt:
    target = os.readlink(tmp_path / "ckpt")
    shutil.copytree(tmp_path / target, tmp_path / ".ckpt.old")
    (tmp_path / "ckpt").unlink()
    recover(tmp_path / "ckpt")  # the plain folder comes back, the unlinked version goes
    assert listing(tmp_path) == sorted(["ckpt", "linked", os.readlink(tmp_path / "linked")])
    assert torch.load(tmp_path / "ckpt" / "trainer_state.pt")["step"] == 2


@pytest.mark.parametrize("how", ["move", "copy with links", "copy following links"])
def test_a_run_folder_moved_or_copied_still_loads_and_saves(tmp_path, input_ids, how):
    model = Qwen3ForCausalLM(small_config()).eval()
    for name in ("best", "last"):
        save_model(model, tmp_path / "run" / name)
    if how == "move":
        shutil.move(tmp_path / "run", tmp_path / "elsewhere")
    else:
        shutil.copytree(tmp_path / "run", tmp_path / "elsewhere", symlinks=how == "copy with links")
    for name in ("best", "last"):
        with torch.no_grad():
            assert torch.equal(load_model(tmp_path / "elsewhere" / name)(input_ids), model(input_ids))
        AutoModelForCausalLM.from_pretrained(tmp_path / "elsewhere" / name)
    save_model(model, tmp_path / "elsewhere" / "last")
    assert sorted(name for name in listing(tmp_path / "elsewhere") if name.startswith(".last")) == [
        os.readlink(tmp_path / "elsewhere" / "last")]


def test_run_folder_resolves_to_best(tmp_path):
    save_model(Qwen3ForCausalLM(small_config()), tmp_path / "run" / "best")
    assert find_checkpoint(tmp_path / "run") == tmp_path / "run" / "best"


@pytest.fixture
def saved(tmp_path):
    save_model(Qwen3ForCausalLM(small_config()), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_model(tmp_path / "nope")


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_model(saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_weights(saved, damage):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable or truncated"):
        load_model(saved)


def test_config_mismatching_weights(saved):
    config = json.loads((saved / "config.json").read_text())
    config["intermediate_size"] = 128
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight has shape \(96, 64\)"):
        load_model(saved)


def test_config_not_json_or_wrong_model(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(saved)
    (saved / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="only 'qwen3'"):
        load_model(saved)


def test_resume_says_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder, nothing to resume"):
        resume_state(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match=f"nothing to resume in {tmp_path / 'run'}: it holds no last/"):
        resume_state(tmp_path / "run")
    save_model(Qwen3ForCausalLM(small_config()), tmp_path / "run" / "last")
    with pytest.raises(CheckpointError, match=r"last has no trainer_state\.pt: it holds a model but not"):
        resume_state(tmp_path / "run")
    with pytest.raises(CheckpointError, match=f"checkpoint folder; --resume takes the run folder that "
                                              f"holds last/ \\({tmp_path / 'run'}\\)"):
        resume_state(tmp_path / "run" / "last")


def test_resume_on_a_folder_without_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--resume", str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"qwen3 train: error: nothing to resume in {tmp_path / 'empty'}: it holds no last/ checkpoint "
        f"(a run saves one at every evaluation and when it is stopped)"]


class Killed(BaseException):
    """Stands for a SIGKILL: once raised, every later filesystem step raises too, so no clean-up runs."""


@pytest.mark.parametrize("before", ["link", "plain folder"])
def test_a_kill_between_any_two_filesystem_steps_of_a_save_leaves_a_checkpoint(tmp_path, monkeypatch, before):
    old, new = Qwen3ForCausalLM(small_config()), Qwen3ForCausalLM(small_config())
    steps = {"rename": os.rename, "replace": os.replace, "symlink": os.symlink, "fsync": os.fsync,
             "mkdir": os.mkdir, "rmtree": shutil.rmtree}
    kill_at = 0
    while True:
        kill_at += 1
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        save_model(old, tmp_path / "run" / "ckpt")
        if before == "plain folder":  # as an older save, or a copy that followed the link, left it
            shutil.copytree(tmp_path / "run" / "ckpt", tmp_path / "run" / "plain")
            (tmp_path / "run" / "ckpt").unlink()
            os.rename(tmp_path / "run" / "plain", tmp_path / "run" / "ckpt")
        calls = 0

        def step(name):
            def call(*args, **kwargs):
                nonlocal calls
                calls += 1
                if calls >= kill_at:
                    raise Killed
                return steps[name](*args, **kwargs)
            return call

        with monkeypatch.context() as patch:
            for name in steps:
                patch.setattr(shutil if name == "rmtree" else os, name, step(name))
            try:
                save_model(new, tmp_path / "run" / "ckpt")
                finished = True
            except Killed:
                finished = False
        if before == "link":  # never a moment without a complete checkpoint
            assert (tmp_path / "run" / "ckpt").is_dir(), kill_at
        recover(tmp_path / "run" / "ckpt")
        weights = load_model(tmp_path / "run" / "ckpt").model.embed_tokens.weight
        assert any(torch.equal(weights, m.model.embed_tokens.weight) for m in (old, new)), kill_at
        if finished:
            break
    assert torch.equal(weights, new.model.embed_tokens.weight)
    assert kill_at > 8  # each step of the save was interrupted once
    assert listing(tmp_path / "run") == sorted(["ckpt", os.readlink(tmp_path / "run" / "ckpt")])
