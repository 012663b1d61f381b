"""`qwen3 train --init-from DIR`: a run starts from any Hugging Face Qwen3 folder's weights and
tokenizer, here one written by transformers in an odd shape (head_dim unlike hidden/heads, one KV
head, an untied head), and what it saves loads in transformers with the same logits as ours."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config
from transformers import Qwen3ForCausalLM as ReferenceQwen3

from qwen3 import cli
from qwen3.data.tokenizer import train_tokenizer
from qwen3.model.checkpoint import load_model

ODD_SHAPE = dict(vocab_size=336, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                 tie_word_embeddings=False, rope_theta=1e6)


def sentences(count: int) -> list[str]:
    rng = random.Random(0)
    words = ["the king", "a shepherd", "went to", "looked at", "the city", "the river", "at night"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + "." for _ in range(count)]


@pytest.fixture(scope="module")
def transformers_folder(tmp_path_factory, one_thread) -> tuple[Path, str]:
    """A transformers-written Qwen3 of the odd shape with a tokenizer of ours, and a text source."""
    root = tmp_path_factory.mktemp("init_from")
    texts = sentences(400)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    tokenizer = train_tokenizer(texts, vocab_size=320)
    torch.manual_seed(0)
    reference = ReferenceQwen3(Qwen3Config(**ODD_SHAPE, eos_token_id=tokenizer.eos_token_id))
    reference.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    return root / "hf", f"{corpus}:doc=line"


def train_args(folder: Path, source: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--init-from", str(folder), "--data", source, "--out", str(out), "--max-steps", "6",
            "--optimizer", "adamw", "--set", f"cache_dir={out.parent / 'cache'}", "--set", "device=cpu",
            "--set", "dtype=float32", "--set", "batch_size=4", "--set", "grad_accum=1",
            "--set", "warmup_steps=2", "--set", "eval_interval=6", "--set", "log_interval=2",
            "--set", "seq_len=32", "--set", "peak_flops=1e11", *extra]


def test_init_from_a_transformers_folder_trains_and_transformers_loads_the_result(transformers_folder, tmp_path):
    folder, source = transformers_folder
    out = tmp_path / "run"
    cli.main(train_args(folder, source, out))  # returns on success
    run = json.loads((out / "run.json").read_text())
    assert {key: run["model"][key] for key in ODD_SHAPE} == ODD_SHAPE  # the shape came from the folder
    assert run["train"]["init_from"] == str(folder)
    start, trained = load_model(folder), load_model(out / "last")
    assert not torch.equal(start.lm_head.weight, trained.lm_head.weight)  # it trained, untied head too
    assert trained.lm_head.weight is not trained.model.embed_tokens.weight
    reference = AutoModelForCausalLM.from_pretrained(out / "last", attn_implementation="eager").eval()
    input_ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (reference(input_ids).logits - trained(input_ids)).abs().max() < 1e-4
    # The tokenizer is the folder's own.
    assert (out / "last" / "tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()


def cli_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen3 train: error: "), lines
    return lines[0]


def test_a_shape_set_against_the_checkpoint_is_an_error_that_says_so(transformers_folder, tmp_path, capsys):
    folder, source = transformers_folder
    line = cli_error(capsys, train_args(folder, source, tmp_path / "run", "--set", "hidden_size=64"))
    assert "comes from the --init-from checkpoint" in line and "hidden_size=64 (it has 48)" in line
    assert not (tmp_path / "run").exists()


def test_init_from_a_folder_that_is_not_a_qwen3_checkpoint_is_an_error(transformers_folder, tmp_path, capsys):
    folder, source = transformers_folder
    (tmp_path / "empty").mkdir()
    assert "not a Qwen3 checkpoint" in cli_error(capsys, train_args(tmp_path / "empty", source, tmp_path / "a"))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    line = cli_error(capsys, train_args(llama, source, tmp_path / "b"))
    assert "not a Qwen3 checkpoint" in line and "only 'qwen3'" in line
    untokenized = tmp_path / "weights_only"
    ReferenceQwen3(Qwen3Config(**ODD_SHAPE)).save_pretrained(untokenized)
    capsys.readouterr()  # transformers' progress bar
    assert "no tokenizer.json" in cli_error(capsys, train_args(untokenized, source, tmp_path / "c"))
    assert "give one of them" in cli_error(capsys, train_args(folder, source, tmp_path / "d", "--resume",
                                                                 str(tmp_path / "d")))
