"""Model and training configuration: Qwen3 field names, named presets, and validated overrides.

`ModelConfig` uses the field names of Hugging Face's Qwen3Config so a checkpoint's config.json maps
onto it one to one. `TrainConfig` holds everything the training loop and the data pipeline read.
Both can be changed from a TOML file or `--set key=value`; a bad key or value is a `UserError`
that names the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from qwen3.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration field has a value that cannot work."""


@dataclass
class ModelConfig:
    """The shape of a Qwen3 decoder. Field names are those of transformers' Qwen3Config."""

    vocab_size: int = 49152
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # In Qwen3 head_dim is its own field: hidden_size need not equal heads * head_dim.
    head_dim: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2 != 0:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} {value} is outside the vocabulary (size {self.vocab_size})")

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json of a Hugging Face Qwen3 checkpoint (both old and new rope keys)."""
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "use_cache": True,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face config.json dict; unknown keys are ignored, unsupported features refused."""
        model_type = data.get("model_type")
        if model_type not in (None, "qwen3"):
            raise ConfigError(f"model_type is {model_type!r}; only 'qwen3' checkpoints are supported")
        if data.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {data['hidden_act']!r} is not supported (Qwen3 uses 'silu')")
        if data.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true is not supported")
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope_type {rope_type!r} is not supported (only 'default')")
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if "head_dim" not in data and "hidden_size" in data and "num_attention_heads" in data:
            values["head_dim"] = data["hidden_size"] // data["num_attention_heads"]
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = data.get("num_attention_heads", cls.num_attention_heads)
        eos = values.get("eos_token_id")
        if isinstance(eos, list):
            values["eos_token_id"] = eos[0] if eos else None
        for name, value in list(values.items()):
            if name in ("rope_theta", "rms_norm_eps", "initializer_range") and isinstance(value, int):
                values[name] = float(value)
        return cls(**values)


# seq_len 0 leaves the length of a training sequence to the stage (train/stages/): pretraining from
# scratch takes the model's context, as the presets set it; a run from a checkpoint whose context
# is longer (a released Qwen3 has 40,960) takes at most SEQ_LEN_CAP, since a step's time and memory
# grow with the length and short data gains nothing from it; chat fine-tuning takes its longest
# conversation rounded up to a multiple of SEQ_LEN_MULTIPLE, within the same bounds. A chosen window
# is shortened, in multiples of SEQ_LEN_MULTIPLE, to what a small corpus's splits hold. The run
# prints each choice with its plan and records it as its seq_len.
SEQ_LEN_CAP = 2048
SEQ_LEN_MULTIPLE = 64

# The Linear modules of a decoder layer, by their transformers names: where LoRA adapters can go.
LORA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    """Everything the data pipeline and the training loop read. A step is one optimizer step."""

    # data
    data: list[str] = field(default_factory=list)  # sources; empty means the embedded default corpus
    tokenizer: str = ""  # a tokenizer.json or model folder to load; empty means train one
    init_from: str = ""  # a checkpoint folder whose weights and tokenizer the run starts from
    stage: str = "pretrain"  # what the loop learns from: a name of train/stages/'s registry (pretrain, sft)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on lora_targets, the rest frozen
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_PROJECTIONS))
    tokenizer_vocab_size: int = 8192
    val_fraction: float = 0.1
    seq_len: int = 0  # tokens a training sequence predicts; 0: the stage chooses (SEQ_LEN_CAP above)
    cache_dir: str = ".cache/qwen3"
    # optimization
    batch_size: int = 8
    grad_accum: int = 2
    max_steps: int = 500
    optimizer: str = "muon"  # "muon" (Muon on hidden matrices + AdamW on the rest) or "adamw"
    muon_lr: float = 0.01
    adamw_lr: float = 3e-3
    embedding_lr: float = 0.0  # AdamW's peak LR for the input embedding; 0: adamw_lr
    muon_momentum_warmup: int = 0  # steps over which Muon's momentum rises from 0.85 to 0.95; 0: none
    weight_decay: float = 0.0
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # the cosine decays to this fraction of the peak
    grad_clip: float = 1.0  # 0 disables clipping
    # reinforcement learning (stage "rl", train/stages/rl.py) and preference optimization ("dpo")
    reward: str = "book"  # a built-in reward (book, math) or MODULE:FUNCTION (train/rewards.py)
    group_size: int = 8  # completions sampled per prompt; batch_size counts prompts
    rollout_temperature: float = 1.0
    max_completion_tokens: int = 32
    updates_per_rollout: int = 1  # optimizer steps on each batch of rollouts
    clip_epsilon: float = 0.2  # the policy ratio's clip range: [1 - eps, 1 + eps]
    kl_beta: float = 0.0  # weight of the KL term to the starting model; 0: none (docs/reasoning.md)
    thinking: bool | None = None  # prompts rendered with thinking on/off; None: the template's default
    dpo_beta: float = 0.1  # DPO's beta: how strongly the policy may leave the reference
    # bookkeeping
    eval_interval: int = 100
    log_interval: int = 10
    sample_interval: int = 100  # at evaluation steps that are multiples of it, and the last: samples; 0 = off
    sample_prompts: list[str] = field(default_factory=list)  # empty: the stage's own
    tensorboard: bool = False  # also write the events to OUT/tensorboard/ (pip install tensorboard)
    out_dir: str = "runs/seed"
    seed: int = 42
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    compile: bool = False
    device: str = "auto"  # auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, mps
    peak_flops: float = 0.0  # FLOP/s that MFU is reported against; 0: a GPU table, else a matmul probe

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("tokenizer_vocab_size", "batch_size", "grad_accum", "max_steps",
                     "eval_interval", "log_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("seq_len", "warmup_steps", "lora_rank", "sample_interval", "muon_momentum_warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if isinstance(self.sample_prompts, str) or not all(isinstance(p, str) for p in self.sample_prompts):
            raise ConfigError(f"sample_prompts must be a list of strings, got {self.sample_prompts!r}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if self.lora_rank and not set(self.lora_targets) <= set(LORA_PROJECTIONS):
            raise ConfigError(f"lora_targets must be among {', '.join(LORA_PROJECTIONS)}, got {self.lora_targets}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        for name in ("muon_lr", "adamw_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "peak_flops", "embedding_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ConfigError(f"group_size must be an integer of at least 2 (a group to compare), got {self.group_size!r}")
        for name in ("max_completion_tokens", "updates_per_rollout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 < self.clip_epsilon < 1.0:
            raise ConfigError(f"clip_epsilon must be between 0 and 1, got {self.clip_epsilon}")
        for name in ("rollout_temperature", "dpo_beta"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kl_beta < 0:
            raise ConfigError(f"kl_beta must be non-negative, got {self.kl_beta}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio}")
        if len(self.adamw_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adamw_betas):
            raise ConfigError(f"adamw_betas must be two numbers in [0, 1), got {self.adamw_betas}")
        if self.optimizer not in ("muon", "adamw"):
            raise ConfigError(f"optimizer must be 'muon' or 'adamw', got {self.optimizer!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(
                f"dtype must be one of auto, float32, bfloat16, float16, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # The seed's model: 7.03M parameters at vocab 49,152 (most of them in the embedding).
    "seed": (
        dict(vocab_size=49152, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             max_position_embeddings=256, tie_word_embeddings=True),
        dict(batch_size=8, grad_accum=2, max_steps=500, out_dir="runs/seed"),
    ),
    # The best recipe bench/speedrun.py has measured against the seed's (docs/speedrun.md): the
    # seed's model with an untied head, compiled; one micro-batch of 8 windows per step (twice the
    # updates per token), twice the learning rates and 15x AdamW's for the input embedding, Muon's
    # momentum warmed up, a short warmup and a decay to zero.
    "speedrun": (
        dict(vocab_size=49152, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             max_position_embeddings=256, tie_word_embeddings=False),
        dict(batch_size=8, grad_accum=1, max_steps=800, muon_lr=0.02, adamw_lr=6e-3, embedding_lr=0.09,
             muon_momentum_warmup=300, warmup_steps=20, min_lr_ratio=0.0, compile=True,
             out_dir="runs/speedrun"),
    ),
    # For tests: a 100-step run takes seconds on one core.
    "tiny": (
        dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=64, tie_word_embeddings=True),
        dict(tokenizer_vocab_size=512, batch_size=4, grad_accum=1, max_steps=100,
             warmup_steps=10, eval_interval=50, log_interval=10, sample_interval=0, out_dir="runs/tiny"),
    ),
    # Chat fine-tuning (qwen3 sft DIR): the model is DIR's; AdamW at a fine-tuning learning rate.
    "sft": (
        {},
        dict(stage="sft", optimizer="adamw", adamw_lr=1e-3, batch_size=8, grad_accum=1, max_steps=300,
             warmup_steps=20, eval_interval=50, log_interval=10, sample_interval=50, out_dir="runs/sft"),
    ),
    # Reinforcement learning (qwen3 rl DIR): 8 prompts x 8 completions a step, AdamW, on-policy.
    "rl": (
        {},
        dict(stage="rl", optimizer="adamw", adamw_lr=1e-4, batch_size=8, grad_accum=1, max_steps=200,
             warmup_steps=10, min_lr_ratio=1.0, grad_clip=1.0, eval_interval=50, log_interval=5, sample_interval=50,
             out_dir="runs/rl"),
    ),
    # Direct preference optimization (qwen3 dpo DIR): 8 pairs a step, AdamW at a fine-tuning rate.
    "dpo": (
        {},
        dict(stage="dpo", optimizer="adamw", adamw_lr=1e-4, batch_size=8, grad_accum=1, max_steps=200,
             warmup_steps=10, eval_interval=50, log_interval=10, sample_interval=50, out_dir="runs/dpo"),
    ),
    # The real Qwen3-0.6B shape (needs a GPU to train in any reasonable time).
    "qwen3-0.6b": (
        dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
             max_position_embeddings=40960, tie_word_embeddings=True),
        dict(seq_len=2048, out_dir="runs/qwen3-0.6b"),
    ),
}


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    model_values, train_values = PRESETS[name]
    return ModelConfig(**model_values), TrainConfig(**train_values)


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    """Turn a command-line string into the type a dataclass field declares."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _parse_value(text, options[0], key)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        items = [s.strip() for s in text.strip("[]").split(",") if s.strip()]
        return [_parse_value(item.strip("'\""), item_type, key) for item in items]
    try:
        if annotation is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}[annotation]
        raise ConfigError(f"{key}: expected {kind}, got {text!r}") from None
    return text


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check (and widen int to float) a value read from TOML against a field's declared type."""
    if isinstance(value, str):
        return _parse_value(value, annotation, key)
    expected = {int: int, float: (int, float), bool: bool, str: str}.get(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is not None and (not isinstance(value, expected)
                                 or (annotation is not bool and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def apply_overrides(model: ModelConfig, train: TrainConfig,
                    values: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """Return new configs with `values` applied.

    Keys are field names, optionally prefixed `model.` or `train.`; values are strings (from
    `--set key=value`) or already-typed TOML values. Unknown keys and bad values raise ConfigError.
    """
    model_updates: dict[str, Any] = {}
    train_updates: dict[str, Any] = {}
    model_fields = typing.get_type_hints(ModelConfig)
    train_fields = typing.get_type_hints(TrainConfig)
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        if section not in ("", "model", "train"):
            raise ConfigError(f"unknown config section {section!r} in {key!r} (use model. or train.)")
        if section != "train" and name in model_fields:
            model_updates[name] = _coerce(value, model_fields[name], key)
        elif section != "model" and name in train_fields:
            train_updates[name] = _coerce(value, train_fields[name], key)
        else:
            known = sorted(model_fields) + sorted(train_fields)
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(known)}")
    try:
        return (dataclasses.replace(model, **model_updates),
                dataclasses.replace(train, **train_updates))
    except TypeError as error:  # a wrongly-typed value that slipped past coercion
        raise ConfigError(str(error)) from None


def refuse_model_changes(before: ModelConfig, after: ModelConfig, why: str) -> None:
    """A ConfigError naming every field of the model's shape that differs, when any does."""
    changed = [f"{f.name}={getattr(after, f.name)!r} (it has {getattr(before, f.name)!r})"
               for f in fields(ModelConfig) if getattr(after, f.name) != getattr(before, f.name)]
    if changed:
        raise ConfigError(f"{why}; cannot set {', '.join(changed)}")


def parse_set_arguments(pairs: list[str]) -> dict[str, str]:
    """`["a=1", "model.b=x"]` -> `{"a": "1", "model.b": "x"}`; a pair without '=' is an error."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        result[key.strip()] = value.strip()
    return result


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config: flat keys, or [model] and [train] tables; returns prefixed keys."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid TOML: {error}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("model", "train") and isinstance(value, dict):
            flat.update({f"{key}.{name}": item for name, item in value.items()})
        elif key == "preset":
            continue
        else:
            flat[key] = value
    return flat


def resolve(preset_name: str = "seed", config_file: str | None = None,
            overrides: list[str] | None = None, model: ModelConfig | None = None
            ) -> tuple[ModelConfig, TrainConfig]:
    """Preset, then the TOML file (its `preset` key may pick the preset), then `--set` pairs.

    With `model` (the shape of a checkpoint a run starts from) the model is that one, and a file or
    `--set` value that would change it is a ConfigError."""
    file_values: dict[str, Any] = {}
    if config_file:
        file_values = load_toml(config_file)
        preset_name = tomllib.loads(Path(config_file).read_text(encoding="utf-8")).get(
            "preset", preset_name)
    preset_model, train = preset(preset_name)
    resolved, train = apply_overrides(model or preset_model, train, file_values)
    resolved, train = apply_overrides(resolved, train, parse_set_arguments(overrides or []))
    if model is not None:
        refuse_model_changes(model, resolved, "the model's shape comes from the --init-from checkpoint")
    return resolved, train
