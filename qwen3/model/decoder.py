"""The Qwen3 decoder, written from scratch and readable as a lesson.

Architecture (per layer, pre-norm):
    h = x + Attention(RMSNorm(x))        grouped-query attention, QK-norm, rotary positions
    y = h + SwiGLU(RMSNorm(h))
then a final RMSNorm and the LM head (tied to the embedding or not).

Module and parameter names equal those of transformers' Qwen3ForCausalLM, so a state dict moves
between the two with no renaming. Shapes in comments: B batch, T new tokens, S keys (cached + new),
H query heads, K key/value heads, D head_dim, C hidden_size, V vocab_size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qwen3.config import ModelConfig
from qwen3.model.kv_cache import KVCache, build_attention_mask


class RMSNorm(nn.Module):
    """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g, computed in float32 and cast back.

    Unlike LayerNorm there is no mean subtraction and no bias: one reduction instead of two.
    Under autocast the output is in the autocast dtype, as in a model whose weights are in that
    dtype (transformers' numerics): the float32 gain would otherwise promote it to float32, and every
    matmul that reads it would keep a float32 copy besides its own low-precision one for backward.
    """

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(dtype) * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables: cos and sin of position * theta^(-2i/D), in float32.

    Frequencies run over the whole head_dim (pairs are (i, i + D/2), the "rotate-half" layout), and
    the rotation angle depends on the token's position, never on the head.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.base = config.rope_theta
        self.max_positions = config.max_position_embeddings
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the tables, e.g. after building the model on the meta device."""
        device = device if device is not None else self.cos.device
        if torch.device(device).type == "meta":
            device = "cpu"
        # inv_freq[i] = theta^(-2i/D), i = 0 .. D/2-1  -> (D/2,)
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.base ** (exponents / self.head_dim))
        positions = torch.arange(self.max_positions, device=device).float()
        angles = torch.outer(positions, inv_freq)  # (P, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (P, D): same angle for i and i + D/2
        self.cos = angles.cos()
        self.sin = angles.sin()

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T), each below max_position_embeddings -> cos, sin (B, 1, T, D) in
        `dtype`, ready to broadcast over heads. A gather: the ids are never read on the host (a sync
        on GPUs, a graph break under torch.compile), so an id past the tables fails as an index."""
        return self.cos[position_ids].unsqueeze(1).to(dtype), self.sin[position_ids].unsqueeze(1).to(dtype)

    def span(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1, 1, length, D) for the consecutive positions start .. start + length - 1.

        The same values as `forward` for those positions, but by slicing: no gather and no read of
        device memory to check the range (a host sync on GPUs, a graph break under torch.compile).
        """
        if start + length > self.max_positions:
            raise ValueError(f"position {start + length - 1} is beyond max_position_embeddings "
                             f"({self.max_positions})")
        end = start + length
        return self.cos[None, None, start:end].to(dtype), self.sin[None, None, start:end].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+D/2}) by its angle: x * cos + rotate_half(x) * sin."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query attention with Qwen3's QK-norm.

    H query heads share K key/value heads (each K/V head serves H/K query heads), which divides the
    KV cache by H/K. q and k are RMS-normalized over head_dim before the rotation (QK-norm).
    """

    def __init__(self, config: ModelConfig, layer_idx: int, implementation: str = "sdpa") -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.implementation = implementation  # "sdpa" (fused kernel) or "eager" (the math below)
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, C) -> (B, T, H, D) -> norm over D -> (B, H, T, D)
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, K, S, D)
        if self.implementation == "eager":
            out = self.eager_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def eager_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
        """What SDPA computes: softmax(q k^T / sqrt(D) + causal mask) v, K/V heads repeated H/K times."""
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)  # (B, K, S, D) -> (B, H, S, D)
        v = v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, S)
        T, S = q.shape[2], k.shape[2]
        if mask is None and T > 1:  # plain causal: query i sees keys 0..i (no cache offset)
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return probs @ v  # (B, H, T, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the gate decides how much of each up-feature passes."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: normalize, transform, add back to the residual stream."""

    def __init__(self, config: ModelConfig, layer_idx: int, attention: str = "sdpa") -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, attention)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """Embedding, decoder layers and the final norm: token ids -> hidden states (B, T, C)."""

    def __init__(self, config: ModelConfig, attention: str = "sdpa") -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, attention) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)
        if kv_cache is None:
            past, mask = 0, build_attention_mask(attention_mask, T, 0, input_ids.device)
        else:
            if position_ids is not None or attention_mask is not None:
                raise ValueError("with a kv_cache, the cache numbers the tokens and masks attention "
                                 "from its lengths: pass no position_ids or attention_mask")
            if not kv_cache.planned:
                kv_cache.prepare(T)
            past = kv_cache.past
            position_ids, mask = kv_cache.positions_and_mask(T)
        if position_ids is None:  # positions past .. past + T - 1 in every row
            cos, sin = self.rotary_emb.span(past, T, x.dtype)
        else:
            cos, sin = self.rotary_emb(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm(x)


class Qwen3ForCausalLM(nn.Module):
    """The language model: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: ModelConfig, attention: str = "sdpa") -> None:
        super().__init__()
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"attention must be 'sdpa' or 'eager', got {attention!r}")
        self.config = config
        self.model = Qwen3Model(config, attention)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            # One matrix serves as input embedding and output projection: V*C parameters saved.
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) for matrices, zeros for biases, ones for norm gains."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (B, T, V), or (B, logits_to_keep, V) for the last positions only when it is > 0."""
        hidden = self.model(input_ids, position_ids, attention_mask, kv_cache)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None,
                     dtype: torch.dtype | None = None) -> KVCache:
        """A cache on the model's device and dtype, max_len defaulting to the context length."""
        weight = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_position_embeddings,
                       weight.device, dtype or weight.dtype)

    def num_parameters(self) -> int:
        """Unique parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())
