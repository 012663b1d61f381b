"""Reinforcement learning and DPO as stages of the loop, on tiny models: a learnable reward is
learned, a resumed run ends as an uninterrupted one, mistakes are one-line errors that lose no
checkpoint, and DPO makes the policy prefer the chosen replies it was not trained on."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3 import cli
from qwen3.config import ModelConfig, apply_overrides, preset
from qwen3.data.tokenizer import train_tokenizer
from qwen3.model.checkpoint import load_model, save_model
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.train.loop import train
from qwen3.train.start import init_checkpoint, resume_configs

WORDS = "the seed tree green leaves fell here when evening came then we sang yes no eleven every".split()
REWARDS = '''
def letter_e(completion, record):
    """The share of the reply's characters that are an "e": dense, so a tiny model learns it at once."""
    return sum(c == "e" for c in completion) / max(len(completion), 1)

def broken(completion, record):
    return record["missing"]
'''


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny model with a tokenizer of these words and our chat template."""
    folder = tmp_path_factory.mktemp("rl") / "base"
    text = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(200)]
    tokenizer = train_tokenizer(text, vocab_size=300)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    save_model(Qwen3ForCausalLM(config), folder, tokenizer=tokenizer)
    return folder


@pytest.fixture
def rewards_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "tiny_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "tiny_rewards"
    sys.modules.pop("tiny_rewards", None)


def prompts_file(folder: Path, count: int = 40) -> Path:
    file = folder / "prompts.jsonl"
    file.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{WORDS[i % len(WORDS)]} {i}"}]})
                            + "\n" for i in range(count)))
    return file


def rl_configs(base: Path, out: Path, data: Path, **values: object):
    folder, model = init_checkpoint(base)
    model_config, config = preset("rl")
    settings = {"init_from": str(folder), "data": [str(data)], "out_dir": str(out), "max_completion_tokens": 8,
                "batch_size": 4, "group_size": 8, "adamw_lr": 1e-2, "warmup_steps": 2, "max_steps": 40,
                "eval_interval": 40, "log_interval": 5, "sample_interval": 0, "cache_dir": str(out.parent / "cache"),
                **values}
    return apply_overrides(model, config, settings)


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_tiny_model_learns_a_dense_reward_within_a_few_dozen_steps(base, rewards_module, tmp_path):
    model_config, config = rl_configs(base, tmp_path / "run", prompts_file(tmp_path), reward="tiny_rewards:letter_e")
    result = train(model_config, config)
    rewards = [event["reward"] for event in events(tmp_path / "run") if "reward" in event]
    assert rewards[0] < 0.25 and rewards[-1] > rewards[0] + 0.25, rewards  # the share of "e" rose
    assert result.final_eval.mean_reward > 0.4
    logged = [event for event in events(tmp_path / "run") if "reward" in event][-1]
    assert {"pass_rate", "completion_tokens", "equal_groups", "entropy"} <= set(logged)


@pytest.mark.slow
def test_an_interrupted_run_resumed_ends_equal_to_an_uninterrupted_one(base, rewards_module, tmp_path):
    data = prompts_file(tmp_path)
    whole = train(*rl_configs(base, tmp_path / "whole", data, reward="tiny_rewards:letter_e", max_steps=6,
                              eval_interval=3, updates_per_rollout=2))
    rl_configs_cut = rl_configs(base, tmp_path / "cut", data, reward="tiny_rewards:letter_e", max_steps=6,
                                eval_interval=3, updates_per_rollout=2)
    stopped = train(*rl_configs_cut, should_stop=lambda step: step == 3)
    assert stopped.interrupted and stopped.step == 3
    resumed = train(*resume_configs(tmp_path / "cut"), resume=True)
    assert resumed.step == whole.step == 6
    ours, theirs = load_model(tmp_path / "cut" / "last"), load_model(tmp_path / "whole" / "last")
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.final_eval.mean_reward == whole.final_eval.mean_reward


def test_mistakes_are_one_line_errors(base, rewards_module, tmp_path, capsys):
    data = prompts_file(tmp_path)
    for argv, message in [
        (["--reward", "no_such_module:reward"], "--reward no_such_module:reward: cannot import no_such_module"),
        (["--reward", "tiny_rewards:nothing"], "tiny_rewards has no function nothing"),
        (["--reward", "tiny_rewards:broken", "--set", "max_steps=2"],
         "the reward raised KeyError: 'missing' on prompt "),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["rl", str(base), "--data", str(data), "--out", str(tmp_path / "out"), *argv,
                      "--set", f"cache_dir={tmp_path / 'cache'}"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        assert message in err.splitlines()[-1], err
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(SystemExit):
        cli.main(["rl", str(base), "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "bad")])
    assert "a prompt ends with the user's turn" in capsys.readouterr().err


def dpo_configs(base: Path, out: Path, pairs: int = 60, **values: object):
    data = out.parent / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{WORDS[i % len(WORDS)]} {i}", "chosen": "yes green tree",
                                        "rejected": "no evening"}) + "\n" for i in range(pairs)))
    folder, model = init_checkpoint(base)
    return apply_overrides(model, preset("dpo")[1], {
        "init_from": str(folder), "data": [str(data)], "out_dir": str(out), "max_steps": 20, "batch_size": 4,
        "eval_interval": 20, "adamw_lr": 3e-3, "warmup_steps": 2, "sample_interval": 0, "val_fraction": 0.25,
        "cache_dir": str(out.parent / "cache"), **values})


@pytest.mark.slow
def test_dpo_makes_the_policy_prefer_the_chosen_replies_of_held_out_pairs(base, tmp_path):
    result = train(*dpo_configs(base, tmp_path / "dpo", batch_size=8))
    assert result.final_eval.accuracy == 1.0 and result.final_eval.margin > 0
    assert result.final_eval.loss < 0.6931  # below log 2, where every margin is 0


def scored_pairs(run: Path) -> int:
    reference = torch.load(run / "last" / "trainer_state.pt", weights_only=False)["ranks"][0]["windows"]["reference"]["train"]
    return int((~reference[0].isnan()).sum())


@pytest.mark.slow
def test_dpo_scores_only_the_pairs_its_steps_draw_and_a_resumed_run_ends_equal(base, tmp_path):
    """A 3-step run of 4 pairs a step scores 12 training pairs before its first step, not all 45;
    stopped and resumed with more steps, it scores the next ones from the starting checkpoint and ends
    equal to a run planned that long."""
    constant = {"eval_interval": 3, "min_lr_ratio": 1.0}  # the same learning rates whatever max_steps
    whole = train(*dpo_configs(base, tmp_path / "whole", max_steps=6, **constant))
    short = train(*dpo_configs(base, tmp_path / "cut", max_steps=3, **constant))
    assert short.step == 3 and scored_pairs(tmp_path / "cut") == 12 and scored_pairs(tmp_path / "whole") == 24
    model_config, config = resume_configs(tmp_path / "cut")
    resumed = train(model_config, dataclasses.replace(config, max_steps=6), resume=True)
    assert resumed.step == 6 and scored_pairs(tmp_path / "cut") == 24
    ours, theirs = load_model(tmp_path / "cut" / "last"), load_model(tmp_path / "whole" / "last")
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert resumed.final_eval.loss == pytest.approx(whole.final_eval.loss, abs=1e-6)


@pytest.mark.slow
def test_two_processes_under_torchrun_share_the_groups_and_learn_like_one(base, rewards_module, tmp_path):
    """Each rank samples its share of every step's prompts; the seeds of the completions depend on
    their place alone, so the two ranks together draw what one process draws, and the step's loss,
    averaged over all their completion tokens, is one process's."""
    data = prompts_file(tmp_path)
    settings = dict(max_steps=3, eval_interval=3, log_interval=1, reward="tiny_rewards:letter_e", dtype="float32")
    train(*rl_configs(base, tmp_path / "single", data, **settings))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "qwen3",
               "rl", str(base), "--data", str(data), "--out", str(tmp_path / "ddp"), "--reward", "tiny_rewards:letter_e",
               *[arg for key, value in rl_configs(base, tmp_path / "x", data, **settings)[1].__dict__.items()
                 if key in ("max_completion_tokens", "batch_size", "group_size", "adamw_lr", "warmup_steps",
                            "max_steps", "eval_interval", "log_interval", "sample_interval", "dtype")
                 for arg in ("--set", f"{key}={value}")]]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                               env={**os.environ, "OMP_NUM_THREADS": "1",
                                    "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    assert completed.returncode == 0, completed.stderr[-3000:]
    ours = {e["step"]: e for e in events(tmp_path / "ddp") if "loss" in e}
    theirs = {e["step"]: e for e in events(tmp_path / "single") if "loss" in e}
    assert sorted(ours) == sorted(theirs) == [1, 2, 3]
    for step in ours:
        assert ours[step]["reward"] == pytest.approx(theirs[step]["reward"], abs=1e-6), step
        assert ours[step]["completion_tokens"] == pytest.approx(theirs[step]["completion_tokens"]), step
        assert ours[step]["loss"] == pytest.approx(theirs[step]["loss"], abs=1e-5), step


@pytest.mark.slow
def test_fine_tuned_to_think_then_reinforced_with_thinking_on(base, tmp_path):
    """SFT on conversations whose replies carry reasoning teaches the template's <think> format;
    RL with thinking on then samples thoughts before answers, and the reward sees the answer
    after them."""
    chats = tmp_path / "think.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"{WORDS[i % len(WORDS)]} {i}"},
        {"role": "assistant", "reasoning_content": "seed tree", "content": "yes"}]}) + "\n" for i in range(80)))
    folder, model = init_checkpoint(base)
    sft = apply_overrides(model, preset("sft")[1], {
        "init_from": str(folder), "data": [str(chats)], "out_dir": str(tmp_path / "sft"), "max_steps": 60,
        "adamw_lr": 3e-3, "warmup_steps": 2, "eval_interval": 60, "sample_interval": 0})
    train(*sft)
    prompts = prompts_file(tmp_path)
    (tmp_path / "yes_rewards.py").write_text(
        "from qwen3.train.rewards import answer_text\n"
        "def thought_then_yes(completion, record):\n"
        "    return float('</think>' in completion and answer_text(completion) == 'yes')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        rl = rl_configs(tmp_path / "sft", tmp_path / "rl", prompts, reward="yes_rewards:thought_then_yes",
                        thinking=True, max_completion_tokens=40, max_steps=4, eval_interval=4, adamw_lr=1e-4,
                        sample_interval=0, rollout_temperature=0.3)
        result = train(*rl)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("yes_rewards", None)
    # The greedy replies think, then answer; some sampled ones do too (the tiny model is not sharp
    # at any temperature), so the groups have something to learn from.
    logged = [event["reward"] for event in events(tmp_path / "rl") if "reward" in event]
    assert result.final_eval.pass_at_1 == 1.0 and logged[0] > 0
