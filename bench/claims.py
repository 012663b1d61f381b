"""Measure the seed's claims about each architecture component, on this project's own model.

The seed (../shared/seed.md) is a teaching document that asserts, without measuring: grouped-query
attention gives a "50-75% reduction in attention memory" at "nearly identical" quality; RMSNorm is
"more efficient" than LayerNorm; SwiGLU is "superior"; RoPE "can handle sequences longer than
training"; weight tying saves parameters and "improves generalization"; pre-norm trains more stably
than post-norm. This script tests each claim on qwen3.model: variants are built by swapping modules
inside an instantiated Qwen3ForCausalLM, every variant is trained with the same small budget on the
embedded King James Bible (qwen3.sources), and where speed is claimed the code is timed.

    python bench/claims.py                 # every claim: about 17 minutes on one CPU thread
    python bench/claims.py gqa rope        # only some
    python bench/claims.py all --seeds 0   # one seed instead of three: about half the time

Each claim writes docs/img/claims_<claim>.png and its entry in docs/img/claims.json; the pages in
docs/ quote those numbers. Loss comparisons are paired: a variant and the baseline (our Qwen3 block)
trained with the same seed share their data order and the initial weights of every shared module.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qwen3.config import ModelConfig, preset
from qwen3.store import prepare
from qwen3.model import Attention, DecoderLayer, KVCache, Qwen3ForCausalLM, RMSNorm
from qwen3.muon import NS_COEFFICIENTS, build_optimizers, newton_schulz
from qwen3.runtime import tune_malloc
from qwen3.train import lr_factor
from qwen3.windows import RandomWindows, eval_windows

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = ("gqa", "norm", "swiglu", "rope", "tying", "prenorm", "muon")


@dataclass(frozen=True)
class Settings:
    """Everything a measurement depends on; stored beside its results in claims.json."""

    # The equal-budget training runs: a 2-layer Qwen3 block, AdamW, warmup then cosine decay.
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    seq_len: int = 64
    extrapolate: tuple[int, ...] = (1, 2, 4)  # evaluate RoPE/NoPE at these multiples of seq_len
    batch_size: int = 16
    steps: int = 400
    lr: float = 3e-3  # the best rate we found for the baseline (it degrades sharply by 5e-3)
    lrs: tuple[float, ...] = (3e-3, 1e-2)  # the stability check: the norm variants at a higher rate
    warmup: int = 40
    seeds: tuple[int, ...] = (0, 1, 2)  # every variant, the baseline included, runs each seed
    # Norm timing: (rows, width) inputs, median over `timing_repeats` calls.
    norm_shapes: tuple[tuple[int, int], ...] = ((1024, 128), (4096, 32), (2048, 1024), (512, 4096))
    timing_repeats: int = 30
    # Decode speed: a wider model so the KV cache, not Python overhead, is what a step reads.
    decode_hidden: int = 512
    decode_layers: int = 4
    decode_heads: int = 8
    decode_head_dim: int = 64
    decode_kv_heads: tuple[int, ...] = (1, 2, 4, 8)
    decode_batches: tuple[int, ...] = (1, 8)
    decode_context: int = 1024   # positions already in the cache when timing starts
    decode_steps: int = 32       # one-token forward calls timed

    def model_config(self, **changes: Any) -> ModelConfig:
        values = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                      intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                      num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                      head_dim=self.head_dim, max_position_embeddings=self.seq_len * max(self.extrapolate),
                      tie_word_embeddings=True)
        values.update(changes)
        return ModelConfig(**values)


# --------------------------------------------------------------------------------------------
# Variants: our model with one component swapped for the alternative the seed compares it with.


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


def use_layernorm(model: Qwen3ForCausalLM, settings: Settings) -> None:
    """Every RMSNorm (block norms, final norm, QK-norm) becomes an nn.LayerNorm of the same width."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, RMSNorm):
                setattr(parent, name, nn.LayerNorm(child.weight.numel(), eps=child.eps))


def use_gelu_mlp(model: Qwen3ForCausalLM, settings: Settings) -> None:
    for layer in model.model.layers:
        layer.mlp = GeluMLP(settings.hidden_size, settings.intermediate_size)
        layer.mlp.apply(model._init_weights)


@torch.no_grad()
def disable_rope(model: Qwen3ForCausalLM, settings: Settings) -> None:
    """cos = 1, sin = 0: the rotation is the identity, so attention sees no position at all."""
    model.model.rotary_emb.cos.fill_(1.0)
    model.model.rotary_emb.sin.zero_()


def use_learned_positions(model: Qwen3ForCausalLM, settings: Settings) -> None:
    """No rotation; a learned table of seq_len absolute positions added to the token embedding,
    initialized as GPT-2's: normal with half the token embedding's standard deviation."""
    disable_rope(model, settings)
    model.model.embed_tokens = LearnedPositions(model.model.embed_tokens, settings.seq_len)
    nn.init.normal_(model.model.embed_tokens.positions.weight, std=model.config.initializer_range / 2)


def use_post_norm(model: Qwen3ForCausalLM, settings: Settings) -> None:
    """Post-norm blocks; the final norm goes, since every block already ends with one."""
    model.model.layers = nn.ModuleList(PostNormLayer(layer) for layer in model.model.layers)
    model.model.norm = nn.Identity()


# Variants made by changing the config, and variants made by swapping modules after construction.
CONFIG_VARIANTS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "baseline": lambda s: {},
    "one_kv_head": lambda s: dict(num_key_value_heads=1),
    "full_mha": lambda s: dict(num_key_value_heads=s.num_heads),
    "untied": lambda s: dict(tie_word_embeddings=False),
}
MODULE_VARIANTS: dict[str, Callable[[Qwen3ForCausalLM, Settings], None]] = {
    "layernorm": use_layernorm,
    "gelu": use_gelu_mlp,
    "nope": disable_rope,
    "learned_positions": use_learned_positions,
    "post_norm": use_post_norm,
}


def build_variant(variant: str, settings: Settings) -> Qwen3ForCausalLM:
    """Our model at the training shape with one change (the caller seeds torch for the init)."""
    if variant in CONFIG_VARIANTS:
        return Qwen3ForCausalLM(settings.model_config(**CONFIG_VARIANTS[variant](settings)))
    if variant not in MODULE_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    model = Qwen3ForCausalLM(settings.model_config())
    MODULE_VARIANTS[variant](model, settings)
    return model


# --------------------------------------------------------------------------------------------
# Training and evaluation at equal budget


@dataclass
class Run:
    model: Qwen3ForCausalLM
    train_loss: list[float]   # per optimizer step
    val_loss: float           # mean cross-entropy over every validation token, windows of seq_len
    seconds: float


def train(model: nn.Module, tokens: np.ndarray, settings: Settings, seed: int, lr: float) -> list[float]:
    """Minimal loop: forward, cross-entropy, backward, AdamW step (same schedule for every variant)."""
    optimizers = build_optimizers(model, "adamw", adamw_lr=lr)
    windows = RandomWindows(tokens, settings.seq_len, settings.batch_size, seed)
    losses = []
    for step in range(settings.steps):
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                # warmup, then a cosine decay to zero (qwen3.train's schedule, 1-based steps)
                group["lr"] = group["initial_lr"] * lr_factor(step + 1, settings.warmup, settings.steps, 0.0)
        x, y = next(windows)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def validation_loss(model: nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int) -> float:
    total, count = 0.0, 0
    for x, y in eval_windows(tokens, seq_len, batch_size):
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


@torch.no_grad()
def position_losses(model: nn.Module, tokens: np.ndarray, window: int, positions: int,
                    batch_size: int) -> np.ndarray:
    """Mean cross-entropy at each position 0..positions-1 of the full validation windows of `window`
    tokens. Attention is causal, so position p's loss is the same as in any window of length > p."""
    total = torch.zeros(positions, dtype=torch.float64)
    count = 0
    for x, y in eval_windows(tokens, window, batch_size):
        if x.shape[1] < window:  # the shorter last window
            continue
        logits = model(x[:, :positions])
        total += F.cross_entropy(logits.transpose(1, 2), y[:, :positions], reduction="none").sum(0)
        count += len(x)
    return (total / count).numpy()


class Runs:
    """Trains each (variant, seed) once per process; claims that share a variant share its run.

    A variant and the baseline trained with the same seed see the same batches and, for every module
    they share, the same initial weights. Comparisons are therefore paired, seed by seed, so the
    part of the run-to-run noise that the two runs share drops out of their difference.
    """

    def __init__(self, settings: Settings, train_tokens: np.ndarray, val_tokens: np.ndarray) -> None:
        self.settings = settings
        self.train_tokens = train_tokens
        self.val_tokens = val_tokens
        self.done: dict[tuple[str, int, float], Run] = {}

    def get(self, variant: str, seed: int, lr: float | None = None) -> Run:
        """The run of `variant` with `seed` at peak learning rate `lr` (default: settings.lr)."""
        lr = self.settings.lr if lr is None else lr
        if (variant, seed, lr) not in self.done:
            start = time.perf_counter()
            torch.manual_seed(seed)
            model = build_variant(variant, self.settings)
            losses = train(model, self.train_tokens, self.settings, seed, lr)
            val = validation_loss(model, self.val_tokens, self.settings.seq_len, self.settings.batch_size)
            run = self.done[variant, seed, lr] = Run(model, losses, val, time.perf_counter() - start)
            print(f"  {variant} seed {seed} lr {lr:g}: val loss {val:.4f} ({run.seconds:.0f} s)",
                  file=sys.stderr, flush=True)
        return self.done[variant, seed, lr]

    def all_seeds(self, variant: str) -> list[Run]:
        return [self.get(variant, seed) for seed in self.settings.seeds]

    def compare(self, variants: dict[str, str]) -> dict[str, Any]:
        """{label: variant} -> per label: parameters, validation loss per seed and its mean, and the
        paired difference from the baseline per seed and its mean; plus the baseline's own spread."""
        base = [run.val_loss for run in self.all_seeds("baseline")]
        results: dict[str, Any] = {}
        for label, variant in variants.items():
            losses = [run.val_loss for run in self.all_seeds(variant)]
            paired = [loss - b for loss, b in zip(losses, base)]
            results[label] = dict(variant=variant, parameters=self.all_seeds(variant)[0].model.num_parameters(),
                                  val_loss=losses, val_loss_mean=statistics.fmean(losses),
                                  val_ppl_mean=math.exp(statistics.fmean(losses)),
                                  minus_baseline=paired, minus_baseline_mean=statistics.fmean(paired),
                                  train_seconds=[round(run.seconds, 1) for run in self.all_seeds(variant)])
        return dict(seeds=list(self.settings.seeds), variants=results,
                    baseline_spread=max(base) - min(base))

    def lr_sensitivity(self, variants: dict[str, str], ax: plt.Axes) -> dict[str, Any]:
        """Validation loss of the first seed at each of settings.lrs; a variant that tolerates a
        higher rate is the more stable one. Plotted on `ax`."""
        s = self.settings
        seed = s.seeds[0]
        results = {label: dict(variant=variant, lr=list(s.lrs),
                               val_loss=[self.get(variant, seed, lr).val_loss for lr in s.lrs])
                   for label, variant in variants.items()}
        for i, (label, entry) in enumerate(results.items()):
            ax.plot(entry["lr"], entry["val_loss"], "o-", color=f"C{i}", label=label)
        ax.set_xscale("log")
        ax.set_title(f"Sensitivity to the learning rate (seed {seed}, {s.steps} steps)")
        ax.set_xlabel("peak learning rate (AdamW, warmup then cosine)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        return dict(seed=seed, variants=results)

    def plot_training(self, ax_loss: plt.Axes, ax_delta: plt.Axes, variants: dict[str, str]) -> None:
        """Left: training loss (mean over seeds). Right: each variant's training loss minus the
        baseline's at the same seed (thin: each seed, bold: their mean). 50-step moving averages."""
        s = self.settings
        width = min(50, s.steps // 4)
        base = np.array([moving_average(run.train_loss, width) for run in self.all_seeds("baseline")])
        steps = np.arange(base.shape[1]) + width
        for i, (label, variant) in enumerate(variants.items()):
            runs = self.all_seeds(variant)
            curves = np.array([moving_average(run.train_loss, width) for run in runs])
            val = statistics.fmean(run.val_loss for run in runs)
            ax_loss.plot(steps, curves.mean(0), color=f"C{i}", label=f"{label}: val {val:.3f}")
            for delta in curves - base:
                ax_delta.plot(steps, delta, color=f"C{i}", alpha=0.35, linewidth=0.8)
            paired = statistics.fmean(run.val_loss - b.val_loss
                                      for run, b in zip(runs, self.all_seeds("baseline")))
            ax_delta.plot(steps, (curves - base).mean(0), color=f"C{i}", linewidth=2,
                          label=f"{label}: val {paired:+.3f}")
        seeds = f"mean of {len(s.seeds)} seeds" if len(s.seeds) > 1 else f"seed {s.seeds[0]}"
        ax_loss.set_title(f"Training loss at equal budget ({seeds})")
        ax_loss.set_ylabel(f"training loss (nats/token, {width}-step mean)")
        tails = [np.mean([moving_average(run.train_loss, width)[len(steps) // 4:]
                          for run in self.all_seeds(variant)], axis=0) for variant in variants.values()]
        ax_loss.set_ylim(min(map(min, tails)) - 0.1, max(map(max, tails)) + 0.1)
        ax_delta.set_title("Difference from the baseline, paired by seed")
        ax_delta.set_ylabel("training loss minus baseline's (nats/token)")
        for ax in (ax_loss, ax_delta):
            ax.set_xlabel(f"optimizer step (batch {s.batch_size} x {s.seq_len} tokens)")
            ax.legend(fontsize=9)
            ax.grid(alpha=0.3)


def moving_average(values: list[float], width: int) -> np.ndarray:
    return np.convolve(values, np.ones(width) / width, mode="valid")


# --------------------------------------------------------------------------------------------
# Timing


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_norm(norm: nn.Module, rows: int, width: int, repeats: int) -> dict[str, float]:
    """Median microseconds of one forward call, and of forward plus backward (input and weight grads)."""
    x = torch.randn(rows, width, requires_grad=True)
    grad = torch.randn(rows, width)
    inputs = (x, *norm.parameters())
    with torch.no_grad():
        forward = median_seconds(lambda: norm(x), repeats)
    backward = median_seconds(lambda: torch.autograd.grad(norm(x), inputs, grad), repeats)
    return dict(forward_us=forward * 1e6, forward_backward_us=backward * 1e6)


@torch.no_grad()
def decode_tokens_per_second(config: ModelConfig, batch_size: int, context: int, steps: int) -> float:
    """Tokens/s of `steps` one-token forward calls after `context` cached positions.

    The cache is advanced over `context` zero positions instead of running a prefill: a decode step
    costs the same whatever values the cached keys hold.
    """
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    cache = model.new_kv_cache(batch_size, context + steps)
    token = torch.zeros(batch_size, 1, dtype=torch.long)

    def decode() -> None:
        cache.reset()
        cache.advance(context)
        for _ in range(steps):
            model(token, kv_cache=cache)

    return batch_size * steps / median_seconds(decode, repeats=5, warmup=1)


def kv_cache_bytes(config: ModelConfig, batch_size: int, length: int, dtype: torch.dtype) -> int:
    """Bytes of our KVCache, allocated on the meta device (no memory is touched)."""
    cache = KVCache(config, batch_size, length, device="meta", dtype=dtype)
    return sum(t.nbytes for t in cache.keys + cache.values)


def attention_parameters(config: ModelConfig) -> int:
    """Parameters of all layers' attention (q, k, v, o projections and QK-norm gains), counted on
    one layer built on the meta device (every layer has the same shape)."""
    with torch.device("meta"):
        attention = Attention(config, layer_idx=0)
    return config.num_hidden_layers * sum(p.numel() for p in attention.parameters())


# --------------------------------------------------------------------------------------------
# The claims: each returns its JSON entry and saves its figure.


def claim_gqa(runs: Runs, image: Path) -> dict[str, Any]:
    s = runs.settings
    memory: dict[str, list[dict[str, Any]]] = {}
    for name, length, dtype in (("seed", 256, torch.float32), ("qwen3-0.6b", 40960, torch.bfloat16)):
        config = preset(name)[0]
        heads = config.num_attention_heads
        rows = []
        for kv in [k for k in (1, 2, 4, 8, 16) if heads % k == 0]:
            shaped = dataclasses.replace(config, num_key_value_heads=kv)
            rows.append(dict(kv_heads=kv, heads=heads, context=length, dtype=str(dtype).removeprefix("torch."),
                             kv_cache_bytes=kv_cache_bytes(shaped, 1, length, dtype),
                             attention_parameters=attention_parameters(shaped)))
        full = rows[-1]
        for row in rows:
            row["kv_cache_vs_mha"] = row["kv_cache_bytes"] / full["kv_cache_bytes"]
            row["attention_parameters_vs_mha"] = row["attention_parameters"] / full["attention_parameters"]
        memory[name] = rows

    decode_config = dict(vocab_size=s.vocab_size, hidden_size=s.decode_hidden,
                         intermediate_size=3 * s.decode_hidden, num_hidden_layers=s.decode_layers,
                         num_attention_heads=s.decode_heads, head_dim=s.decode_head_dim,
                         max_position_embeddings=s.decode_context + s.decode_steps)
    decode = []
    for kv in s.decode_kv_heads:
        config = ModelConfig(**decode_config, num_key_value_heads=kv)
        for batch in s.decode_batches:
            decode.append(dict(kv_heads=kv, batch_size=batch,
                               tokens_per_s=decode_tokens_per_second(config, batch, s.decode_context,
                                                                      s.decode_steps),
                               kv_cache_bytes=kv_cache_bytes(config, batch, s.decode_context, torch.float32)))
    variants = {f"GQA {s.num_heads}q/{s.num_kv_heads}kv (ours)": "baseline",
                f"MQA {s.num_heads}q/1kv": "one_kv_head",
                f"MHA {s.num_heads}q/{s.num_heads}kv": "full_mha"}

    fig, axes = plt.subplot_mosaic([["memory", "speed"], ["loss", "delta"]], figsize=(15, 10))
    ax_mem, ax_speed = axes["memory"], axes["speed"]
    for name, rows in memory.items():
        ax_mem.plot([r["kv_heads"] for r in rows], [100 * r["kv_cache_vs_mha"] for r in rows], "o-",
                    label=f"{name}: {rows[0]['heads']} query heads, "
                          f"MHA cache {rows[-1]['kv_cache_bytes'] / 2**20:,.0f} MiB")
    ax_mem.set_xscale("log", base=2)
    ax_mem.set_title("KV-cache size (our KVCache, batch 1, full context)")
    ax_mem.set_xlabel("key/value heads")
    ax_mem.set_ylabel("KV cache, % of full multi-head")
    ax_mem.legend()
    ax_mem.grid(alpha=0.3)
    for batch in s.decode_batches:
        rows = [r for r in decode if r["batch_size"] == batch]
        ax_speed.plot([r["kv_heads"] for r in rows], [r["tokens_per_s"] for r in rows], "o-",
                      label=f"batch {batch}")
    ax_speed.set_xscale("log", base=2)
    ax_speed.set_title(f"Decode speed, {s.decode_context} cached positions\n"
                       f"({s.decode_layers} layers, {s.decode_heads} query heads x {s.decode_head_dim}, "
                       f"{torch.get_num_threads()} CPU thread(s))")
    ax_speed.set_xlabel("key/value heads")
    ax_speed.set_ylabel("tokens/s")
    ax_speed.set_ylim(bottom=0)
    ax_speed.legend()
    ax_speed.grid(alpha=0.3)
    runs.plot_training(axes["loss"], axes["delta"], variants)
    save(fig, image)
    return dict(memory=memory, decode=decode, decode_config=decode_config, loss=runs.compare(variants))


def claim_norm(runs: Runs, image: Path) -> dict[str, Any]:
    s = runs.settings
    norms: dict[str, Callable[[int], nn.Module]] = {
        "RMSNorm (ours, qwen3.model)": lambda width: RMSNorm(width),
        "RMSNorm (torch.nn.RMSNorm)": lambda width: nn.RMSNorm(width, eps=1e-6),
        "LayerNorm (torch.nn.LayerNorm)": lambda width: nn.LayerNorm(width, eps=1e-6),
    }
    timing = [dict(norm=name, rows=rows, width=width, **time_norm(make(width), rows, width, s.timing_repeats))
              for rows, width in s.norm_shapes for name, make in norms.items()]
    variants = {"RMSNorm (ours)": "baseline", "LayerNorm": "layernorm"}

    fig, axes = plt.subplot_mosaic([["time", "time", "time"], ["loss", "delta", "lr"]], figsize=(21, 10))
    ax_time = axes["time"]
    labels = [f"{rows}x{width}" for rows, width in s.norm_shapes]
    bar = 0.8 / (2 * len(norms))
    for i, name in enumerate(norms):
        for j, key in enumerate(("forward_us", "forward_backward_us")):
            values = [t[key] for t in timing if t["norm"] == name]
            offsets = np.arange(len(labels)) + (2 * i + j - len(norms) + 0.5) * bar
            ax_time.bar(offsets, values, bar, color=f"C{i}", alpha=1.0 if j else 0.5,
                        label=f"{name}, {'forward+backward' if j else 'forward'}")
    ax_time.set_xticks(np.arange(len(labels)), labels)
    ax_time.set_yscale("log")
    ax_time.set_title(f"Time per call (median of {s.timing_repeats}, float32, "
                      f"{torch.get_num_threads()} CPU thread(s))")
    ax_time.set_xlabel("input shape (rows x width)")
    ax_time.set_ylabel("microseconds per call (log scale)")
    ax_time.legend(fontsize=8)
    ax_time.grid(alpha=0.3, axis="y")
    runs.plot_training(axes["loss"], axes["delta"], variants)
    sensitivity = runs.lr_sensitivity(variants, axes["lr"])
    save(fig, image)
    return dict(timing=timing, loss=runs.compare(variants), lr_sensitivity=sensitivity)


def claim_swiglu(runs: Runs, image: Path) -> dict[str, Any]:
    s = runs.settings
    variants = {f"SwiGLU, 3 matrices of width {s.intermediate_size} (ours)": "baseline",
                f"GELU, 2 matrices of width {3 * s.intermediate_size // 2}": "gelu"}
    fig, (ax_loss, ax_delta) = plt.subplots(1, 2, figsize=(15, 5))
    runs.plot_training(ax_loss, ax_delta, variants)
    fig.suptitle("SwiGLU vs a GELU MLP of equal parameter count")
    save(fig, image)
    return dict(loss=runs.compare(variants))


def claim_rope(runs: Runs, image: Path) -> dict[str, Any]:
    """Loss at the training context, and per position up to max(extrapolate) times beyond it."""
    s = runs.settings
    variants = {"RoPE (ours)": "baseline", "learned absolute": "learned_positions", "none (NoPE)": "nope"}
    window = s.seq_len * max(s.extrapolate)
    # Position 0 has no context at all; then the training context, then each extension beyond it.
    ends = [k * s.seq_len for k in s.extrapolate]
    segments = [(1, ends[0]), *itertools.pairwise(ends)]
    curves: dict[str, dict[str, Any]] = {}
    for label, variant in variants.items():
        # A learned table has seq_len rows: no position beyond it can be evaluated.
        positions = s.seq_len if variant == "learned_positions" else window
        per_seed = np.array([position_losses(runs.get(variant, seed).model, runs.val_tokens, window,
                                             positions, s.batch_size) for seed in s.seeds])
        loss = per_seed.mean(0)
        curves[label] = dict(
            variant=variant, position_loss=loss.round(4).tolist(),
            segment_loss_per_seed={f"{lo}-{hi}": per_seed[:, lo:hi].mean(1).tolist()
                                   for lo, hi in segments if hi <= positions},
            ppl_at_length={str(end): math.exp(loss[:end].mean()) for end in ends if end <= positions})

    fig, axes = plt.subplot_mosaic([["position", "position"], ["loss", "delta"]], figsize=(15, 10))
    ax_pos = axes["position"]
    width = max(1, s.seq_len // 8)
    for i, (label, curve) in enumerate(curves.items()):
        loss = np.array(curve["position_loss"][1:])  # position 0 (no context) is far above the rest
        bins = len(loss) // width
        centers = 1 + width * np.arange(bins) + (width - 1) / 2
        ax_pos.plot(centers, loss[:bins * width].reshape(bins, width).mean(1), "o-", markersize=3,
                    color=f"C{i}", label=label)
    ax_pos.axvline(s.seq_len, color="gray", linestyle="--", label=f"training context ({s.seq_len})")
    ax_pos.text(s.seq_len * 1.02, 0.95, "learned table ends here:\nno embedding for later positions",
                transform=ax_pos.get_xaxis_transform(), va="top", fontsize=9, color="C1")
    ax_pos.set_title(f"Validation loss by position in {window}-token windows "
                     f"(mean of {len(s.seeds)} seed(s), {width}-position bins, position 0 left out)")
    ax_pos.set_xlabel("token position in the window")
    ax_pos.set_ylabel("cross-entropy (nats/token)")
    ax_pos.legend(loc="lower right")
    ax_pos.grid(alpha=0.3)
    runs.plot_training(axes["loss"], axes["delta"], variants)
    save(fig, image)
    return dict(extrapolation=curves, loss=runs.compare(variants))


def claim_tying(runs: Runs, image: Path) -> dict[str, Any]:
    config = preset("seed")[0]
    counts = []
    for vocab in (8192, 49152):
        tied, untied = (Qwen3ForCausalLM(dataclasses.replace(config, vocab_size=vocab, tie_word_embeddings=tie))
                        .num_parameters() for tie in (True, False))
        counts.append(dict(vocab_size=vocab, tied=tied, untied=untied, saved=untied - tied,
                           saved_fraction_of_untied=(untied - tied) / untied))
    variants = {"tied (ours)": "baseline", "untied": "untied"}

    fig, (ax_count, ax_loss, ax_delta) = plt.subplots(1, 3, figsize=(20, 5.5))
    x = np.arange(len(counts))
    ax_count.bar(x - 0.2, [c["tied"] / 1e6 for c in counts], 0.4, label="tied")
    ax_count.bar(x + 0.2, [c["untied"] / 1e6 for c in counts], 0.4, label="untied")
    for i, c in enumerate(counts):
        ax_count.text(i + 0.2, c["untied"] / 1e6, f"-{100 * c['saved_fraction_of_untied']:.0f}% tied",
                      ha="center", va="bottom")
    ax_count.set_xticks(x, [f"vocab {c['vocab_size']:,}" for c in counts])
    ax_count.set_title("Parameters of the seed's shape (128 wide, 3 layers)")
    ax_count.set_ylabel("parameters (millions)")
    ax_count.legend()
    ax_count.grid(alpha=0.3, axis="y")
    runs.plot_training(ax_loss, ax_delta, variants)
    save(fig, image)
    return dict(parameters=counts, loss=runs.compare(variants))


def claim_prenorm(runs: Runs, image: Path) -> dict[str, Any]:
    variants = {"pre-norm (ours)": "baseline", "post-norm": "post_norm"}
    fig, (ax_loss, ax_delta, ax_lr) = plt.subplots(1, 3, figsize=(21, 5.5))
    runs.plot_training(ax_loss, ax_delta, variants)
    sensitivity = runs.lr_sensitivity(variants, ax_lr)
    fig.suptitle("Pre-norm vs post-norm")
    save(fig, image)
    return dict(loss=runs.compare(variants), lr_sensitivity=sensitivity)


def claim_muon(runs: Runs, image: Path) -> dict[str, Any]:
    """What Muon's Newton-Schulz step does to a real gradient's singular values (no training: the
    Muon-vs-AdamW comparison is bench/muon_vs_adamw.py)."""
    s = runs.settings
    torch.manual_seed(0)
    model = build_variant("baseline", s)
    x, y = next(RandomWindows(runs.train_tokens, s.seq_len, s.batch_size, seed=0))
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    layer = model.model.layers[0]
    matrices = {"layers.0.mlp.gate_proj": layer.mlp.gate_proj.weight.grad,
                "layers.0.self_attn.q_proj": layer.self_attn.q_proj.weight.grad}
    spectra: dict[str, Any] = {}
    for name, grad in matrices.items():
        before = torch.linalg.svdvals(grad.double())
        after = torch.linalg.svdvals(newton_schulz(grad).double())
        spectra[name] = dict(
            shape=list(grad.shape), update_scale=math.sqrt(max(1.0, grad.shape[0] / grad.shape[1])),
            gradient_sv_over_max=(before / before[0]).tolist(), newton_schulz_sv=after.tolist(),
            gradient_stable_rank=float((before ** 2).sum() / before[0] ** 2),
            newton_schulz_stable_rank=float((after ** 2).sum() / after[0] ** 2))
    # The scalar map each singular value goes through: sigma -> a s + b s^3 + c s^5, five times,
    # starting from sigma / ||G||_F (so every starting value is at most 1).
    a, b, c = NS_COEFFICIENTS
    sigma = torch.logspace(-4, 0, 400, dtype=torch.float64)
    mapped = sigma.clone()
    for _ in range(5):
        mapped = a * mapped + b * mapped ** 3 + c * mapped ** 5
    settled = mapped[sigma >= 1e-2]

    fig, (ax_map, ax_sv) = plt.subplots(1, 2, figsize=(15, 5))
    ax_map.plot(sigma.numpy(), mapped.numpy(), label=f"5 quintic steps, (a, b, c) = {NS_COEFFICIENTS}")
    ax_map.axhline(1.0, color="gray", linestyle="--", label="exact orthogonalization (U V^T)")
    ax_map.set_xscale("log")
    ax_map.set_title("Newton-Schulz on one singular value")
    ax_map.set_xlabel("singular value after dividing by the Frobenius norm")
    ax_map.set_ylabel("singular value after 5 steps")
    ax_map.legend()
    ax_map.grid(alpha=0.3)
    for i, (name, spectrum) in enumerate(spectra.items()):
        ranks = np.arange(1, len(spectrum["newton_schulz_sv"]) + 1)
        ax_sv.plot(ranks, spectrum["gradient_sv_over_max"], color=f"C{i}", linestyle=":",
                   label=f"{name} gradient {tuple(spectrum['shape'])} (/ its largest)")
        ax_sv.plot(ranks, spectrum["newton_schulz_sv"], color=f"C{i}",
                   label=f"{name} after qwen3.muon.newton_schulz")
    ax_sv.set_yscale("log")
    ax_sv.set_title("Singular values of a real gradient (first batch, fresh model)")
    ax_sv.set_xlabel("singular value index (largest first)")
    ax_sv.set_ylabel("singular value")
    ax_sv.legend(fontsize=9)
    ax_sv.grid(alpha=0.3)
    save(fig, image)
    return dict(spectra=spectra, scalar_map=dict(
        range_for_sigma_from_0_01=[float(settled.min()), float(settled.max())], at_1=float(mapped[-1]),
        below_half_for_sigma_under=float(sigma[mapped < 0.5].max())))


MEASURE: dict[str, Callable[[Runs, Path], dict[str, Any]]] = {
    "gqa": claim_gqa, "norm": claim_norm, "swiglu": claim_swiglu, "rope": claim_rope,
    "tying": claim_tying, "prenorm": claim_prenorm, "muon": claim_muon,
}


def save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment(malloc_tuned: bool) -> dict[str, Any]:
    return dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), malloc_tuned=malloc_tuned)


def run_claims(claims: list[str], settings: Settings, train_tokens: np.ndarray, val_tokens: np.ndarray,
               out_dir: Path, command: str, malloc_tuned: bool = False) -> dict[str, Any]:
    """Measure `claims`, save their figures in out_dir and merge their entries into out_dir/claims.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "claims.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    runs = Runs(settings, train_tokens, val_tokens)
    for claim in claims:
        print(f"== {claim}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        entry = MEASURE[claim](runs, out_dir / f"claims_{claim}.png")
        results[claim] = dict(command=command, seconds=round(time.perf_counter() - start, 1),
                              environment=environment(malloc_tuned), settings=dataclasses.asdict(settings),
                              data=dict(train_tokens=len(train_tokens), val_tokens=len(val_tokens)),
                              image=f"claims_{claim}.png", **entry)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("claims", nargs="*", choices=[*CLAIMS, "all"], default=["all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(Settings.seeds),
                        help="training seeds (each variant and the baseline run every one)")
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 keeps timings steady on a shared machine)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "qwen3"))
    args = parser.parse_args(argv)
    claims = list(CLAIMS) if "all" in args.claims else list(dict.fromkeys(args.claims))
    torch.set_num_threads(args.threads)
    # As the training loop does: without it, timings of large tensors measure glibc handing pages
    # back to the kernel and faulting them in again on the next call.
    malloc_tuned = tune_malloc()
    settings = Settings(steps=args.steps, seeds=tuple(args.seeds))
    data = prepare([], vocab_size=settings.vocab_size, cache_dir=args.cache_dir)
    command = "python bench/claims.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    run_claims(claims, settings, data.train_tokens, data.val_tokens, args.out, command.strip(), malloc_tuned)
    print(f"done in {time.perf_counter() - start:.0f} s; results in {args.out / 'claims.json'}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
