"""Config validation, presets and overrides: a bad value is a clear error naming the field."""

import subprocess
import sys

import pytest

from qwen3.config import ConfigError, ModelConfig, TrainConfig, apply_overrides, preset, resolve


@pytest.mark.parametrize("values,field", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=-8), "hidden_size"),
    (dict(head_dim=15), "head_dim"),
    (dict(rms_norm_eps=0), "rms_norm_eps"),
    (dict(vocab_size=10, eos_token_id=10), "eos_token_id"),
])
def test_bad_model_values_name_the_field(values, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**values)


@pytest.mark.parametrize("values,field", [
    (dict(batch_size=0), "batch_size"),
    (dict(val_fraction=1.5), "val_fraction"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(dtype="float8"), "dtype"),
])
def test_bad_train_values_name_the_field(values, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**values)


def test_presets():
    model, train = preset("tiny")
    assert model.hidden_size == 64 and train.max_steps == 100
    model, _ = preset("qwen3-0.6b")
    assert (model.hidden_size, model.num_hidden_layers, model.head_dim, model.rope_theta) == (1024, 28, 128, 1e6)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")


def test_overrides_parse_types_and_reject_unknown_keys():
    model, train = preset("seed")
    model, train = apply_overrides(model, train, {
        "hidden_size": "256", "model.tie_word_embeddings": "false", "train.muon_lr": "0.02",
        "data": "a.txt,b.txt", "adamw_betas": "[0.9, 0.99]"})
    assert model.hidden_size == 256 and model.tie_word_embeddings is False
    assert train.muon_lr == 0.02 and train.data == ["a.txt", "b.txt"] and train.adamw_betas == [0.9, 0.99]
    with pytest.raises(ConfigError, match="unknown config key 'hiden_size'"):
        apply_overrides(model, train, {"hiden_size": "3"})
    with pytest.raises(ConfigError, match="batch_size: expected an integer"):
        apply_overrides(model, train, {"batch_size": "eight"})
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        apply_overrides(model, train, {"num_key_value_heads": "3"})


def test_toml_file_with_tables_and_preset(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text('preset = "tiny"\n[model]\nnum_hidden_layers = 3\n[train]\nadamw_lr = 1\n')
    model, train = resolve("seed", str(file), ["max_steps=7"])
    assert model.hidden_size == 64 and model.num_hidden_layers == 3
    assert train.adamw_lr == 1.0 and isinstance(train.adamw_lr, float) and train.max_steps == 7
    file.write_text("[train]\nbatch_size = 'x'\n")
    with pytest.raises(ConfigError, match="batch_size"):
        resolve("seed", str(file))
    file.write_text("[train\n")
    with pytest.raises(Exception, match="not valid TOML"):
        resolve("seed", str(file))


def test_command_line_reports_a_user_error_in_one_line():
    result = subprocess.run([sys.executable, "-m", "qwen3", "train", "--set", "hidden_size=abc"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("qwen3 train: error:")
    assert "hidden_size" in result.stderr
