"""LoRA fine-tuning with `peft`, on our own model class, saved as a plain Qwen3 folder.

LoRA freezes a linear layer's weight W (out, in) and learns a low-rank change beside it:
y = x W^T + (alpha / r) * x A^T B^T with A (r, in) random and B (out, r) zero at the start, so
training starts from the checkpoint's function and moves r * (in + out) numbers per layer instead
of in * out. `add_lora` injects peft's LoRA layers in place (peft.inject_adapter_in_model) into the
attention and MLP projections of our Qwen3ForCausalLM, whose module names are transformers', so the
training loop and its loss keep calling `model.model(x)` and `model.lm_head.weight` unchanged.

A checkpoint stores the merged weights, W + (alpha / r) B A, under the plain names
(`plain_state_dict`), so every folder stays one that transformers, chat, serve and eval load as
it is; `adapter_state_dict` / `load_adapter_state` are the adapters alone, which a resume
restores on top of the frozen base it started from, and `save_adapter` writes them beside the
checkpoint in peft's own format (adapter_config.json + adapter_model.safetensors). `adapters_off`
computes with the frozen base alone: the reference that RL's KL term and DPO compare with.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from qwen3.errors import UserError

ADAPTER = "default"  # peft's name for a model's one adapter


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> nn.Module:
    """Inject LoRA adapters of `rank` into the Linear modules named `targets` (TrainConfig checks
    they are among config.LORA_PROJECTIONS), in place; every other parameter is frozen."""
    from peft import LoraConfig, inject_adapter_in_model  # slow to import: only when asked for

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    model = inject_adapter_in_model(config, model)
    model.lora_config = config
    return model


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules peft wrapped, by name: each has `base_layer` and `get_delta_weight`."""
    return {name: module for name, module in model.named_modules()
            if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")}


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under the plain Qwen3 names, each LoRA layer merged: W + (alpha / r) B A."""
    layers = lora_layers(model)
    state = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        owner = name.removesuffix(".base_layer.weight")
        if owner in layers:
            with torch.no_grad():
                tensor = tensor + layers[owner].get_delta_weight(ADAPTER).to(tensor.dtype)
            name = f"{owner}.weight"
        state[name.replace(".base_layer.", ".")] = tensor
    return state


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights alone (lora_A and lora_B of every wrapped layer)."""
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items() if ".lora_" in name}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    if set(state) != {name for name in current if ".lora_" in name}:
        raise UserError("the saved LoRA adapters do not match this run's lora_rank and lora_targets")
    with torch.no_grad():
        for name, tensor in state.items():
            current[name].copy_(tensor)


def save_adapter(model: nn.Module, folder: Path) -> None:
    """`folder/adapter_config.json` and `adapter_model.safetensors` as peft writes them, for
    `peft.PeftModel.from_pretrained(base, folder)` on the checkpoint the run started from."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = model.lora_config.to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    config["peft_type"] = "LORA"
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
    # peft's file names carry a "base_model.model." prefix and drop the adapter's name.
    tensors = {f"base_model.model.{name.replace(f'.{ADAPTER}.', '.')}": tensor.contiguous()
               for name, tensor in adapter_state_dict(model).items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes as its frozen base (every adapter disabled): the
    starting model that reinforcement learning's KL term and DPO's reference compare with."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
