"""Training defaults that fit the data and the checkpoint: with seq_len 0 chat fine-tuning packs rows
as long as its longest conversation (rounded up to 64), continued pretraining takes windows of at
most 2,048 tokens from a long-context checkpoint and no longer than a small corpus's splits hold,
one text file is split leak-free, every choice is printed with the plan and recorded, and the
samples continue the user's own held-out data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_sft import arithmetic

from qwen3 import cli
from qwen3.config import ModelConfig, TrainConfig
from qwen3.data.conversations import Rendered, held_out, read_conversations, render
from qwen3.data.sources import kjv_books
from qwen3.data.tokenizer import load_tokenizer, train_tokenizer
from qwen3.model.checkpoint import save_model
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.train.evaluate import evaluate_checkpoint
from qwen3.train.stages.sft import row_length

QUICK = ["--set", "device=cpu", "--set", "dtype=float32", "--set", "peak_flops=1e11", "--set", "log_interval=1"]


@pytest.fixture(scope="module")
def long_context(tmp_path_factory, one_thread) -> Path:
    """One of our own folders with a released model's context (40,960 positions), tiny otherwise."""
    folder = tmp_path_factory.mktemp("defaults") / "base"
    tokenizer = train_tokenizer(kjv_books()[:6], vocab_size=512)
    torch.manual_seed(0)
    save_model(Qwen3ForCausalLM(ModelConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=40960, eos_token_id=tokenizer.eos_token_id)),
        folder, tokenizer=tokenizer)
    return folder


def run_files(out: Path) -> tuple[dict, list[dict]]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "run.json").read_text()), events


def plan_lines(err: str) -> list[str]:
    """The plan line and the choice lines under it."""
    lines = err.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("plan: "))
    end = next(index for index in range(start + 1, len(lines) + 1) if index == len(lines)
               or not lines[index].startswith("  "))
    return [line.strip() for line in lines[start:end]]


def test_sft_rows_fit_the_longest_conversation_and_the_run_says_so(long_context, tmp_path, capsys):
    data = arithmetic(tmp_path / "sums.jsonl")
    out = tmp_path / "run"
    cli.main(["sft", str(long_context), "--data", data, "--lora-rank", "4", "--max-steps", "2", "--out", str(out),
              *QUICK])
    tokenizer = load_tokenizer(long_context)
    conversations = read_conversations(data)
    longest = max(len(render(tokenizer, c.messages).ids) for c in conversations)
    assert longest <= 65
    assert plan_lines(capsys.readouterr().err)[1:] == [
        f"rows of 65 tokens: the longest conversation is {longest} tokens, rounded up to a multiple of 64"]
    run, events = run_files(out)
    assert run["train"]["seq_len"] == run["seq_len"] == 64 and run["data"]["row_tokens"] == 65
    assert run["data"]["train_dropped_too_long"] == run["data"]["val_dropped_too_long"] == 0
    # The samples continue the first user turns of held-out conversations.
    held = [c.messages[0]["content"] for c in conversations if held_out(c, 0.1)][:3]
    assert [row["prompt"] for row in events[-1]["samples"]] == held
    # `qwen3 eval` packs the held-out rows the run chose, so it scores what training scored.
    result, info = evaluate_checkpoint(out / "last")
    assert info["seq_len"] == 64
    assert result.loss == pytest.approx([e["val_loss"] for e in events if "val_loss" in e][-1], abs=1e-6)


def rendered(*lengths: int) -> list[Rendered]:
    return [Rendered([0] * length, [True] * length, 0) for length in lengths]


def test_row_length_rules():
    from_checkpoint = TrainConfig(init_from="ckpt", data=["chats.jsonl"])
    assert row_length(from_checkpoint, 40960, rendered(12, 30)) == (
        64, "the longest conversation is 30 tokens, rounded up to a multiple of 64")
    assert row_length(from_checkpoint, 40960, rendered(65))[0] == 64  # 65 tokens predict 64
    assert row_length(from_checkpoint, 40960, rendered(66))[0] == 128
    assert row_length(from_checkpoint, 40960, rendered(30, 5000, 3000)) == (
        2048, "the longest conversation is 5,000 tokens; the checkpoint's context of 40,960 capped at 2,048, "
              "so 2 longer conversation(s) are dropped")
    assert row_length(from_checkpoint, 1000, rendered(5000))[1].endswith("the model's context of 1,000, so 1 "
                                                                         "longer conversation(s) are dropped")
    # The embedded set keeps its rows of 257 tokens (on the seed's model, context 256, and on a long one).
    embedded = TrainConfig(init_from="runs/seed")
    assert row_length(embedded, 256, []) == row_length(embedded, 40960, []) == (256, "the embedded set's rows")
    assert row_length(embedded, 128, [])[0] == 128
    assert row_length(TrainConfig(seq_len=100, data=["c"]), 40960, rendered(300)) == (100, "seq_len 100 as set")


def poem(path: Path, lines: int = 1500) -> Path:
    """One text file of lines without blank lines, like the input.txt people start with."""
    words = "the king went to a city by the river and spoke unto his people at night with joy".split()
    path.write_text("".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(8)).capitalize() + f" {i}.\n"
                            for i in range(lines)))
    return path


def test_continued_pretraining_on_one_text_file_holds_out_its_tail_in_windows_it_fits(long_context, tmp_path,
                                                                                      capsys):
    notes = poem(tmp_path / "notes.txt", lines=700)
    out = tmp_path / "run"
    cli.main(["train", "--init-from", str(long_context), "--data", str(notes), "--out", str(out), "--max-steps", "2",
              "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "sample_interval=1", *QUICK])
    plan = plan_lines(capsys.readouterr().err)
    run, events = run_files(out)
    held = run["data"]["val_tokens"]
    window = (held - 1) // 64 * 64
    assert 64 <= window < 2048 and run["train"]["seq_len"] == window
    assert plan[1:] == [
        f"windows of {window:,} tokens: the longest multiple of 64 that a window of both splits fits in (the "
        f"shorter holds {held:,} tokens; the checkpoint's context of 40,960 capped at 2,048)",
        "the last 10% of the text held out: 1 document of 1 paragraph, too few to split by document or paragraph"]
    # The samples continue the first three lines of the held-out tail (five words each).
    lines = notes.read_text().splitlines()
    openings = [" ".join(line.split()[:5]) for line in lines[int(0.85 * len(lines)):]]
    prompts = [row["prompt"] for row in events[-1]["samples"]]
    assert any(openings[index:index + 3] == prompts for index in range(len(openings))), prompts


def test_pretraining_from_scratch_on_one_file_keeps_the_models_context(tmp_path, capsys):
    notes = poem(tmp_path / "input.txt", lines=600)
    out = tmp_path / "tiny"
    cli.main(["train", "--preset", "tiny", "--data", str(notes), "--out", str(out), "--max-steps", "2",
              "--set", f"cache_dir={tmp_path / 'cache'}", *QUICK])
    assert plan_lines(capsys.readouterr().err)[1] == "windows of 64 tokens: the model's context of 64"
    run, _ = run_files(out)
    assert run["seq_len"] == 64 and run["data"]["split"].startswith("the last 10% of the text held out")


def test_sft_on_a_released_folder_uses_short_rows_by_default(released_folder, tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["sft", str(released_folder), "--data", arithmetic(tmp_path / "sums.jsonl"), "--lora-rank", "4",
              "--max-steps", "2", "--out", str(out), *QUICK])
    rows = plan_lines(capsys.readouterr().err)[1]
    assert re.fullmatch(r"rows of 65 tokens: the longest conversation is \d\d tokens, rounded up to a multiple of 64",
                        rows), rows
    run, _ = run_files(out)
    assert run["seq_len"] == 64 and run["model"]["max_position_embeddings"] == 40960
