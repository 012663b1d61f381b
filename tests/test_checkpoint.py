"""Checkpoint folders: transformers loads ours, we load transformers', and broken folders say what is wrong."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config
from transformers import Qwen3ForCausalLM as ReferenceQwen3

from qwen3.checkpoint import CheckpointError, find_checkpoint, load_model, save_model
from qwen3.config import ModelConfig
from qwen3.model import Qwen3ForCausalLM


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


def test_save_is_atomic_and_replaces(tmp_path):
    save_model(Qwen3ForCausalLM(small_config()), tmp_path / "ckpt")
    second = Qwen3ForCausalLM(small_config())
    save_model(second, tmp_path / "ckpt", trainer_state={"step": 7})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp or old folders left behind
    loaded = load_model(tmp_path / "ckpt")
    assert torch.equal(loaded.model.norm.weight, second.model.norm.weight)
    assert torch.load(tmp_path / "ckpt" / "trainer_state.pt")["step"] == 7


def test_failed_save_leaves_the_old_checkpoint(tmp_path):
    model = Qwen3ForCausalLM(small_config())
    save_model(model, tmp_path / "ckpt")

    class BrokenTokenizer:
        stop_token_ids = [1]
        pad_token_id = None

        def save_pretrained(self, folder):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_model(Qwen3ForCausalLM(small_config()), tmp_path / "ckpt", tokenizer=BrokenTokenizer())
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert torch.equal(load_model(tmp_path / "ckpt").model.embed_tokens.weight, model.model.embed_tokens.weight)


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
