"""A released-style Qwen3 folder (tests/released.py) as users bring it: loaded, generated from and
sampled as the model's own generation_config.json asks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from qwen3.infer.engine import load_engine
from qwen3.infer.sampling import SamplingParams, generation_defaults

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def test_the_released_tokenizer_and_template_are_transformers(released_folder: Path) -> None:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(released_folder)
    engine = load_engine(released_folder, device="cpu")
    text = "Hello world, 你好! <think>x</think> déjà vu"
    assert engine.tokenizer.encode(text) == theirs(text, add_special_tokens=False).input_ids
    assert engine.tokenizer.vocab_size == len(theirs) and engine.model.config.vocab_size == 151936
    messages = [{"role": "user", "content": "Hi"}]
    for thinking in (True, False):
        assert (engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking)
                == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                              enable_thinking=thinking))


def test_generation_follows_the_models_generation_config(released_folder: Path) -> None:
    engine = load_engine(released_folder, device="cpu")
    assert engine.sampling_defaults == {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    assert engine.stop_token_ids[:2] == [151645, 151643]  # <|im_end|>, <|endoftext|>
    params = SamplingParams.resolve({"top_k": 5, "temperature": None}, engine.sampling_defaults)
    assert (params.temperature, params.top_k, params.top_p) == (0.6, 5, 0.95)
    assert generation_defaults({"do_sample": False, "temperature": 0.7}) == {"temperature": 0.0}


def test_greedy_generation_equals_transformers(released_folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    engine = load_engine(released_folder, device="cpu")
    greedy = dataclasses.replace(SamplingParams(temperature=0.0, max_new_tokens=12), stop_token_ids=[])
    ours = engine.generate(PROMPT, greedy).token_ids
    theirs = AutoModelForCausalLM.from_pretrained(released_folder, torch_dtype=torch.float32)
    ids = torch.tensor([engine.tokenizer.encode(PROMPT)])
    expected = theirs.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == expected[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("seed", [0, 1])
def test_the_models_sampling_is_what_a_seeded_request_draws(released_folder: Path, seed: int) -> None:
    engine = load_engine(released_folder, device="cpu")
    drawn = SamplingParams.resolve({"seed": seed, "max_new_tokens": 8}, engine.sampling_defaults)
    spelled = SamplingParams(temperature=0.6, top_k=20, top_p=0.95, seed=seed, max_new_tokens=8)
    assert engine.generate(PROMPT, drawn).token_ids == engine.generate(PROMPT, spelled).token_ids


def test_the_weights_dtype_and_why_are_said_at_start_up(released_folder: Path, capsys: pytest.CaptureFixture) -> None:
    from qwen3 import cli
    from qwen3.runtime import native_bfloat16

    cli.main(["generate", str(released_folder), "--prompt", "Hi", "--max-new-tokens", "2", "--device", "cpu"])
    said = capsys.readouterr().err
    if native_bfloat16("cpu"):
        assert "parameters in bfloat16 on cpu: the checkpoint is bfloat16 and this CPU multiplies" in said
    else:
        assert "parameters in float32 on cpu: the checkpoint is bfloat16, but this CPU has no native" in said
    cli.main(["generate", str(released_folder), "--prompt", "Hi", "--max-new-tokens", "2", "--dtype", "bfloat16"])
    assert "parameters in bfloat16 on cpu: as asked (--dtype)" in capsys.readouterr().err
