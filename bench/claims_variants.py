"""The variants bench/claims.py compares our Qwen3 block with: each is our Qwen3ForCausalLM with one
config field changed (key/value heads, an untied head) or one module swapped after construction
(LayerNorm for RMSNorm, a GELU MLP of equal parameter count, rotary tables set to the identity,
learned absolute positions, post-norm blocks).

`VariantSource` is how a variant enters the training loop: qwen3.train.loop's `setup` takes it as the
run's model source, and builds the model under the seed it has just set. A module swap happens
after the whole model is initialized, so with the same seed a module-swap variant starts from the
baseline's weights for every module it keeps; a config change reshapes the random draws (fewer
key/value weights, a separate head), so a config variant starts from other weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwen3.config import ModelConfig
from qwen3.data.tokenizer import Tokenizer
from qwen3.model.decoder import DecoderLayer, KVCache, Qwen3ForCausalLM, RMSNorm
from qwen3.train.start import ModelSource


class GeluMLP(nn.Module):
    """down(gelu(up(x))) with hidden width 1.5 x intermediate: as many weights as SwiGLU's three
    matrices (2 * C * 1.5 I = 3 * C * I)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        width = 3 * intermediate_size // 2
        self.up_proj = nn.Linear(hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class LearnedPositions(nn.Module):
    """Token embedding plus a learned embedding of the absolute position 0..T-1 (GPT-2 style).

    The table has `max_positions` rows: a longer sequence has no embedding to look up.
    """

    def __init__(self, tokens: nn.Embedding, max_positions: int) -> None:
        super().__init__()
        self.tokens = tokens  # keeps the Parameter the LM head is tied to
        self.positions = nn.Embedding(max_positions, tokens.embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.tokens(input_ids) + self.positions(positions)


class PostNormLayer(nn.Module):
    """The original Transformer's order on our layer's modules: add, then normalize the sum."""

    def __init__(self, layer: DecoderLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, kv_cache: KVCache | None = None) -> torch.Tensor:
        layer = self.layer
        x = layer.input_layernorm(x + layer.self_attn(x, cos, sin, mask, kv_cache))
        return layer.post_attention_layernorm(x + layer.mlp(x))


def use_layernorm(model: Qwen3ForCausalLM, seq_len: int) -> None:
    """Every RMSNorm (block norms, final norm, QK-norm) becomes an nn.LayerNorm of the same width."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, RMSNorm):
                setattr(parent, name, nn.LayerNorm(child.weight.numel(), eps=child.eps))


def use_gelu_mlp(model: Qwen3ForCausalLM, seq_len: int) -> None:
    for layer in model.model.layers:
        layer.mlp = GeluMLP(model.config.hidden_size, model.config.intermediate_size)
        layer.mlp.apply(model._init_weights)


@torch.no_grad()
def disable_rope(model: Qwen3ForCausalLM, seq_len: int) -> None:
    """cos = 1, sin = 0: the rotation is the identity, so attention sees no position at all."""
    model.model.rotary_emb.cos.fill_(1.0)
    model.model.rotary_emb.sin.zero_()


def use_learned_positions(model: Qwen3ForCausalLM, seq_len: int) -> None:
    """No rotation; a learned table of seq_len absolute positions added to the token embedding,
    initialized as GPT-2's: normal with half the token embedding's standard deviation."""
    disable_rope(model, seq_len)
    model.model.embed_tokens = LearnedPositions(model.model.embed_tokens, seq_len)
    nn.init.normal_(model.model.embed_tokens.positions.weight, std=model.config.initializer_range / 2)


def use_post_norm(model: Qwen3ForCausalLM, seq_len: int) -> None:
    """Post-norm blocks; the final norm goes, since every block already ends with one."""
    model.model.layers = nn.ModuleList(PostNormLayer(layer) for layer in model.model.layers)
    model.model.norm = nn.Identity()


# Variants made by changing the config, and variants made by swapping modules after construction.
CONFIG_VARIANTS: dict[str, Callable[[ModelConfig], dict[str, Any]]] = {
    "baseline": lambda config: {},
    "one_kv_head": lambda config: dict(num_key_value_heads=1),
    "full_mha": lambda config: dict(num_key_value_heads=config.num_attention_heads),
    "untied": lambda config: dict(tie_word_embeddings=False),
}
MODULE_VARIANTS: dict[str, Callable[[Qwen3ForCausalLM, int], None]] = {
    "layernorm": use_layernorm,
    "gelu": use_gelu_mlp,
    "nope": disable_rope,
    "learned_positions": use_learned_positions,
    "post_norm": use_post_norm,
}


@dataclass(frozen=True)
class VariantSource(ModelSource):
    """The training loop's model source for a variant: a fresh initialization of our model (under
    the seed the loop has just set), then the variant's config change or module swap."""

    variant: str = "baseline"
    seq_len: int = 0  # the training context: the rows of a learned position table

    def __post_init__(self) -> None:
        if self.variant not in CONFIG_VARIANTS and self.variant not in MODULE_VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}")

    def build(self, model_config: ModelConfig, tokenizer: Tokenizer, device: torch.device) -> Qwen3ForCausalLM:
        changes = CONFIG_VARIANTS[self.variant](model_config) if self.variant in CONFIG_VARIANTS else {}
        model = super().build(dataclasses.replace(model_config, **changes), tokenizer, device)
        if self.variant in MODULE_VARIANTS:
            MODULE_VARIANTS[self.variant](model, self.seq_len)
        return model.to(device)
