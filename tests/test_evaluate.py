"""Evaluation: the metrics' arithmetic on a model with known outputs, and `qwen3 eval` on a run."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from qwen3 import cli
from qwen3.config import apply_overrides, preset
from qwen3.train.loop import train
from qwen3.train.metrics import score_tokens


class Uniform(nn.Module):
    """Equal logits for every token: loss ln(V), and argmax is always token 0. Like the real model
    it has a body (token ids -> hidden states, here zeros) and a head (a zero matrix)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.lm_head = nn.Linear(1, vocab_size, bias=False)
        nn.init.zeros_(self.lm_head.weight)
        self.calls: list[tuple[int, int]] = []

    def model(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return torch.zeros(*x.shape, 1)


def test_metrics_of_a_uniform_model_cover_every_token_once():
    tokens = np.arange(103, dtype=np.uint16) % 7  # token 0 is the target 14 times (positions 7, 14, ...)
    model = Uniform(vocab_size=16)
    result = score_tokens(model, tokens, seq_len=10, batch_size=4, num_bytes=500)
    assert result.tokens == 102  # every token but the first is a target once
    assert model.calls == [(4, 10), (4, 10), (2, 10), (1, 2)]
    assert result.loss == pytest.approx(math.log(16))
    assert result.perplexity == pytest.approx(16)
    assert result.accuracy == pytest.approx(14 / 102)
    assert result.bits_per_byte == pytest.approx(102 * 4 / 500)  # 4 bits per token, 500 bytes
    assert result.metrics() == {"val_loss": result.loss, "val_acc": result.accuracy,
                                "val_ppl": result.perplexity, "val_bpb": result.bits_per_byte}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: the lamp was lit and the door was shut {i % 5} times."
                                  for i in range(120)) + "\n", encoding="utf-8")
    model_config, train_config = apply_overrides(*preset("tiny"), dict(
        data=[f"{corpus}:doc=paragraph"], cache_dir=str(folder / "cache"), out_dir=str(folder / "run"),
        max_steps=4, eval_interval=4, device="cpu", dtype="float32", peak_flops=1e11))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(model_config, train_config)
    finally:
        torch.set_num_threads(threads)
    return folder / "run"


def test_eval_command_reproduces_the_runs_validation_metrics(run, capsys):
    cli.main(["eval", str(run)])
    printed = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert printed["checkpoint"].strip() == str(run / "best")
    assert float(printed["loss"].split()[0]) == pytest.approx(logged["val_loss"], abs=1e-4)
    assert float(printed["perplexity"]) == pytest.approx(logged["val_ppl"], rel=1e-3)
    assert float(printed["bits/byte"]) == pytest.approx(logged["val_bpb"], abs=1e-4)
    assert float(printed["accuracy"].strip().rstrip("%")) == pytest.approx(100 * logged["val_acc"], abs=0.01)


def test_eval_of_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"qwen3 eval: error: {tmp_path / 'nothing'}: no such folder"


def test_eval_uses_the_autocast_the_run_trained_with(run, tmp_path):
    from qwen3.train.evaluate import evaluate_checkpoint

    float32_result, info = evaluate_checkpoint(run, device="cpu")
    assert info["autocast_dtype"] == "float32"
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    description = json.loads((copy / "run.json").read_text())
    description["train"]["dtype"] = "bfloat16"
    (copy / "run.json").write_text(json.dumps(description))
    bfloat16_result, info = evaluate_checkpoint(copy, device="cpu")
    assert info["autocast_dtype"] == "bfloat16"
    assert bfloat16_result.loss != float32_result.loss
    assert bfloat16_result.loss == pytest.approx(float32_result.loss, abs=0.05)
