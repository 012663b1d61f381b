"""Measure the seed's claims about each architecture component, on this project's own model.

The seed (the teaching document this project grew from) asserts, without measuring, that
grouped-query attention, RMSNorm, SwiGLU, RoPE, weight tying and pre-norm each help; docs/README.md
quotes each claim beside what this script measured on qwen3.model.decoder. A variant is our
Qwen3ForCausalLM with one config field changed or one module swapped (bench/claims_variants.py);
every variant is trained by the project's loop (qwen3.train.loop: `setup` with the variant as its model
source, then `run`) with the same small budget on the embedded King James Bible, and scored at its
last step by qwen3.train.evaluate. Where speed is claimed, the code is timed.

    python bench/claims.py                 # every claim: 12 minutes on one quiet CPU thread
    python bench/claims.py gqa rope        # only some
    python bench/claims.py all --seeds 0   # one seed instead of three: about half the time
    python bench/claims_plot.py            # then the figures, from the JSON alone (no training)

Each claim writes its entry in docs/img/claims.json (or --json): the numbers the pages in docs/
quote, and everything bench/claims_plot.py needs to draw docs/img/claims_<claim>.png. Loss
comparisons are paired: a variant and the baseline (our Qwen3 block) trained with the same seed
share their data order, and a module-swap variant also the initial weights of every module it keeps.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from claims_variants import VariantSource  # bench/, beside this script
from torch import nn

from qwen3.allocator import tune_malloc
from qwen3.config import ModelConfig, TrainConfig, preset
from qwen3.data.store import PreparedData
from qwen3.data.windows import RandomWindows, eval_windows
from qwen3.model.decoder import Attention, KVCache, Qwen3ForCausalLM, RMSNorm
from qwen3.model.loss import CausalLMLoss
from qwen3.runtime import peak_flops
from qwen3.train.loop import run, setup
from qwen3.train.muon import NS_COEFFICIENTS, newton_schulz
from qwen3.train.stages.pretrain import Pretraining
from qwen3.train.start import ModelSource

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = ("gqa", "norm", "swiglu", "rope", "tying", "prenorm", "muon")


@dataclass(frozen=True)
class Settings:
    """Everything a measurement depends on; stored beside its results in claims.json."""

    # The baseline: our Qwen3 block, 2 layers; RoPE tables long enough for 4x the training context.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True))
    # The equal-budget runs: AdamW (the peak rate is the best we found for the baseline; it degrades
    # sharply by 5e-3), warmup then a cosine to zero, no clipping, float32 on the CPU, a 512-token
    # BPE of the embedded corpus; the training loss of every step logged, one evaluation at the end.
    # Each run sets its own seed, out_dir (a temporary folder) and, in the learning-rate check, adamw_lr.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        tokenizer_vocab_size=512, seq_len=64, batch_size=16, grad_accum=1, max_steps=400, optimizer="adamw",
        adamw_lr=3e-3, warmup_steps=40, min_lr_ratio=0.0, grad_clip=0.0, eval_interval=400, log_interval=1,
        sample_interval=0, device="cpu", dtype="float32"))
    extrapolate: tuple[int, ...] = (1, 2, 4)  # evaluate RoPE/NoPE at these multiples of seq_len
    lrs: tuple[float, ...] = (3e-3, 1e-2)  # the stability check: the norm variants at a higher rate
    seeds: tuple[int, ...] = (0, 1, 2)  # every variant, the baseline included, runs each seed
    # Norm timing: (rows, width) inputs, median over `timing_repeats` calls.
    norm_shapes: tuple[tuple[int, int], ...] = ((1024, 128), (4096, 32), (2048, 1024), (512, 4096))
    timing_repeats: int = 30
    # Decode speed: a wider model so the KV cache, not Python overhead, is what a step reads; its
    # key/value heads are each of decode_kv_heads in turn.
    decode: ModelConfig = field(default_factory=lambda: ModelConfig(
        vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        head_dim=64, max_position_embeddings=1024 + 32))
    decode_kv_heads: tuple[int, ...] = (1, 2, 4, 8)
    decode_batches: tuple[int, ...] = (1, 8)
    decode_context: int = 1024   # positions already in the cache when timing starts
    decode_steps: int = 32       # one-token forward calls timed

    def __post_init__(self) -> None:
        if self.train.seq_len * max(self.extrapolate) > self.model.max_position_embeddings:
            raise ValueError("the model's max_position_embeddings must cover seq_len * max(extrapolate)")


# --------------------------------------------------------------------------------------------
# Training at equal budget, through the project's loop


@dataclass
class Run:
    model: Qwen3ForCausalLM
    train_loss: list[float]   # per optimizer step, from the run's metrics.jsonl
    val_loss: float           # qwen3.train.evaluate at the last step: every validation token once
    seconds: float            # set-up, training and that evaluation


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
    """Trains each (variant, seed, learning rate) once per process; claims that share a run share it.

    A variant and the baseline trained with the same seed see the same batches, and a module-swap
    variant starts from the baseline's weights for every module it keeps (a config variant draws
    differently shaped weights, so its initialization differs). Comparisons are therefore paired,
    seed by seed, so the part of the run-to-run noise that the two runs share drops out of their
    difference.
    """

    def __init__(self, settings: Settings, data: PreparedData) -> None:
        self.settings = settings
        self.data = data
        self.done: dict[tuple[str, int, float], Run] = {}

    def get(self, variant: str, seed: int, lr: float | None = None) -> Run:
        """The run of `variant` with `seed` at peak learning rate `lr` (default: the settings')."""
        s = self.settings
        lr = s.train.adamw_lr if lr is None else lr
        if (variant, seed, lr) not in self.done:
            start = time.perf_counter()
            source = VariantSource(variant=variant, seq_len=s.train.seq_len)
            with tempfile.TemporaryDirectory(prefix="claims-run-") as out:
                state = setup(s.model, dataclasses.replace(s.train, seed=seed, adamw_lr=lr, out_dir=out),
                              model_source=source)
                result = run(state)
                if result.final_eval is None:  # Ctrl-C: the loop stopped early and saved last/
                    raise KeyboardInterrupt
                events = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            done = self.done[variant, seed, lr] = Run(
                state.model, [event["loss"] for event in events if "loss" in event], result.final_eval.loss,
                time.perf_counter() - start)
            print(f"  {variant} seed {seed} lr {lr:g}: val loss {done.val_loss:.4f} ({done.seconds:.0f} s)",
                  file=sys.stderr, flush=True)
        return self.done[variant, seed, lr]

    def all_seeds(self, variant: str) -> list[Run]:
        return [self.get(variant, seed) for seed in self.settings.seeds]

    def compare(self, variants: dict[str, str]) -> dict[str, Any]:
        """{label: variant} -> per label: parameters, validation loss per seed and its mean, the
        paired difference from the baseline per seed and its mean, and the training loss of every
        step per seed (4 decimals); plus the baseline's own spread."""
        base = [run.val_loss for run in self.all_seeds("baseline")]
        results: dict[str, Any] = {}
        for label, variant in variants.items():
            runs = self.all_seeds(variant)
            losses = [run.val_loss for run in runs]
            paired = [loss - b for loss, b in zip(losses, base)]
            results[label] = dict(variant=variant, parameters=runs[0].model.num_parameters(),
                                  val_loss=losses, val_loss_mean=statistics.fmean(losses),
                                  val_ppl_mean=math.exp(statistics.fmean(losses)),
                                  minus_baseline=paired, minus_baseline_mean=statistics.fmean(paired),
                                  train_seconds=[round(run.seconds, 1) for run in runs],
                                  train_loss=[[round(v, 4) for v in run.train_loss] for run in runs])
        return dict(seeds=list(self.settings.seeds), variants=results, baseline_spread=max(base) - min(base))

    def lr_sensitivity(self, variants: dict[str, str]) -> dict[str, Any]:
        """Validation loss of the first seed at each of settings.lrs; a variant that tolerates a
        higher rate is the more stable one."""
        seed = self.settings.seeds[0]
        lrs = self.settings.lrs
        return dict(seed=seed, variants={
            label: dict(variant=variant, lr=list(lrs), val_loss=[self.get(variant, seed, lr).val_loss for lr in lrs])
            for label, variant in variants.items()})


# --------------------------------------------------------------------------------------------
# Timing and counting


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
def decode_tokens_per_second(configs: dict[int, ModelConfig], batch_size: int, context: int, steps: int,
                             repeats: int = 5) -> dict[int, float]:
    """Tokens/s of `steps` one-token forward calls after `context` cached positions, per config.

    Each of `repeats` rounds times every config in turn, and each config's median round counts: a
    shared machine's changing load then falls on all of them alike. The cache is advanced over
    `context` zero positions instead of running a prefill: a decode step costs the same whatever
    values the cached keys hold.
    """
    token = torch.zeros(batch_size, 1, dtype=torch.long)
    decoders = {}
    for key, config in configs.items():
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).eval()
        decoders[key] = model, model.new_kv_cache(batch_size, context + steps)

    def decode(model: Qwen3ForCausalLM, cache: KVCache) -> None:
        cache.reset()
        cache.advance(context)
        for _ in range(steps):
            model(token, kv_cache=cache)

    seconds: dict[int, list[float]] = {key: [] for key in decoders}
    for round_ in range(repeats + 1):  # round 0 warms up
        for key, (model, cache) in decoders.items():
            start = time.perf_counter()
            decode(model, cache)
            if round_:
                seconds[key].append(time.perf_counter() - start)
    return {key: batch_size * steps / statistics.median(times) for key, times in seconds.items()}


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
# The claims: each returns its JSON entry.


def claim_gqa(runs: Runs) -> dict[str, Any]:
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
    configs = {kv: dataclasses.replace(s.decode, num_key_value_heads=kv) for kv in s.decode_kv_heads}
    decode = []
    for batch in s.decode_batches:
        speeds = decode_tokens_per_second(configs, batch, s.decode_context, s.decode_steps)
        decode += [dict(kv_heads=kv, batch_size=batch, tokens_per_s=speeds[kv],
                        kv_cache_bytes=kv_cache_bytes(config, batch, s.decode_context, torch.float32))
                   for kv, config in configs.items()]
    heads, kv_heads = s.model.num_attention_heads, s.model.num_key_value_heads
    variants = {f"GQA {heads}q/{kv_heads}kv (ours)": "baseline", f"MQA {heads}q/1kv": "one_kv_head",
                f"MHA {heads}q/{heads}kv": "full_mha"}
    return dict(memory=memory, decode=decode, loss=runs.compare(variants))


def claim_norm(runs: Runs) -> dict[str, Any]:
    s = runs.settings
    norms: dict[str, Callable[[int], nn.Module]] = {
        "RMSNorm (ours, qwen3.model.decoder)": lambda width: RMSNorm(width),
        "RMSNorm (torch.nn.RMSNorm)": lambda width: nn.RMSNorm(width, eps=1e-6),
        "LayerNorm (torch.nn.LayerNorm)": lambda width: nn.LayerNorm(width, eps=1e-6),
    }
    timing = [dict(norm=name, rows=rows, width=width, **time_norm(make(width), rows, width, s.timing_repeats))
              for rows, width in s.norm_shapes for name, make in norms.items()]
    variants = {"RMSNorm (ours)": "baseline", "LayerNorm": "layernorm"}
    return dict(timing=timing, loss=runs.compare(variants), lr_sensitivity=runs.lr_sensitivity(variants))


def claim_swiglu(runs: Runs) -> dict[str, Any]:
    width = runs.settings.model.intermediate_size
    return dict(loss=runs.compare({f"SwiGLU, 3 matrices of width {width} (ours)": "baseline",
                                   f"GELU, 2 matrices of width {3 * width // 2}": "gelu"}))


def claim_rope(runs: Runs) -> dict[str, Any]:
    """Loss at the training context, and per position up to max(extrapolate) times beyond it."""
    s = runs.settings
    seq_len = s.train.seq_len
    variants = {"RoPE (ours)": "baseline", "learned absolute": "learned_positions", "none (NoPE)": "nope"}
    window = seq_len * max(s.extrapolate)
    # Position 0 has no context at all; then the training context, then each extension beyond it.
    ends = [k * seq_len for k in s.extrapolate]
    segments = [(1, ends[0]), *itertools.pairwise(ends)]
    curves: dict[str, dict[str, Any]] = {}
    for label, variant in variants.items():
        # A learned table has seq_len rows: no position beyond it can be evaluated.
        positions = seq_len if variant == "learned_positions" else window
        per_seed = np.array([position_losses(runs.get(variant, seed).model, runs.data.val_tokens, window,
                                             positions, s.train.batch_size) for seed in s.seeds])
        loss = per_seed.mean(0)
        curves[label] = dict(
            variant=variant, position_loss=loss.round(4).tolist(),
            segment_loss_per_seed={f"{lo}-{hi}": per_seed[:, lo:hi].mean(1).tolist()
                                   for lo, hi in segments if hi <= positions},
            ppl_at_length={str(end): math.exp(loss[:end].mean()) for end in ends if end <= positions})
    return dict(extrapolation=curves, loss=runs.compare(variants))


def claim_tying(runs: Runs) -> dict[str, Any]:
    config = preset("seed")[0]
    counts = []
    for vocab in (8192, 49152):
        tied, untied = (Qwen3ForCausalLM(dataclasses.replace(config, vocab_size=vocab, tie_word_embeddings=tie))
                        .num_parameters() for tie in (True, False))
        counts.append(dict(vocab_size=vocab, tied=tied, untied=untied, saved=untied - tied,
                           saved_fraction_of_untied=(untied - tied) / untied))
    return dict(parameters=counts, loss=runs.compare({"tied (ours)": "baseline", "untied": "untied"}))


def claim_prenorm(runs: Runs) -> dict[str, Any]:
    variants = {"pre-norm (ours)": "baseline", "post-norm": "post_norm"}
    return dict(loss=runs.compare(variants), lr_sensitivity=runs.lr_sensitivity(variants))


def claim_muon(runs: Runs) -> dict[str, Any]:
    """What Muon's Newton-Schulz step does to a real gradient's singular values (no training: the
    Muon-vs-AdamW comparison is bench/muon_vs_adamw.py)."""
    s = runs.settings
    torch.manual_seed(0)
    model = ModelSource().build(s.model, runs.data.tokenizer, torch.device("cpu"))
    x, y = next(RandomWindows(runs.data.train_tokens, s.train.seq_len, s.train.batch_size, seed=0))
    CausalLMLoss(model)(x, y).backward()
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
    # The scalar map each singular value goes through: sigma -> a s + b s^3 + c s^5, newton_schulz's
    # five times, starting from sigma / ||G||_F (so every starting value is at most 1).
    (a, b, c), steps = NS_COEFFICIENTS, 5
    sigma = torch.logspace(-4, 0, 400, dtype=torch.float64)
    mapped = sigma.clone()
    for _ in range(steps):
        mapped = a * mapped + b * mapped ** 3 + c * mapped ** 5
    settled = mapped[sigma >= 1e-2]
    return dict(spectra=spectra, scalar_map=dict(
        coefficients=list(NS_COEFFICIENTS), steps=steps, sigma=sigma.tolist(), mapped=mapped.tolist(),
        range_for_sigma_from_0_01=[float(settled.min()), float(settled.max())], at_1=float(mapped[-1]),
        below_half_for_sigma_under=float(sigma[mapped < 0.5].max())))


MEASURE: dict[str, Callable[[Runs], dict[str, Any]]] = {
    "gqa": claim_gqa, "norm": claim_norm, "swiglu": claim_swiglu, "rope": claim_rope,
    "tying": claim_tying, "prenorm": claim_prenorm, "muon": claim_muon,
}


# --------------------------------------------------------------------------------------------
# The JSON and the command line


def environment(malloc_tuned: bool) -> dict[str, Any]:
    return dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), malloc_tuned=malloc_tuned)


def to_json(results: dict[str, Any]) -> str:
    """Indented JSON with every list of numbers on one line (the training curves are long)."""
    text = json.dumps(results, indent=1)
    return re.sub(r"\[\s+([-+.\deE,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def run_claims(claims: list[str], runs: Runs, json_path: Path, command: str,
               malloc_tuned: bool = False) -> dict[str, Any]:
    """Measure `claims` and merge their entries into the JSON file at `json_path`."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    for claim in claims:
        print(f"== {claim}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        entry = MEASURE[claim](runs)
        results[claim] = dict(command=command, seconds=round(time.perf_counter() - start, 1),
                              environment=environment(malloc_tuned), settings=dataclasses.asdict(runs.settings),
                              data=dict(train_tokens=len(runs.data.train_tokens), val_tokens=len(runs.data.val_tokens)),
                              **entry)
        json_path.write_text(to_json(results))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # A string default: argparse checks a list default of nargs="*" against the choices, and fails.
    parser.add_argument("claims", nargs="*", choices=[*CLAIMS, "all"], default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(Settings.seeds),
                        help="training seeds (each variant and the baseline run every one)")
    parser.add_argument("--steps", type=int, default=Settings().train.max_steps)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 keeps timings steady on a shared machine)")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "img" / "claims.json")
    parser.add_argument("--cache-dir", default=Settings().train.cache_dir)
    args = parser.parse_args(argv)
    claims = list(CLAIMS) if "all" in args.claims else list(dict.fromkeys(args.claims))
    torch.set_num_threads(args.threads)
    # As the training loop does: without it, timings of large tensors measure glibc handing pages
    # back to the kernel and faulting them in again on the next call.
    malloc_tuned = tune_malloc()
    # MFU in the runs' logs is against one probe of this CPU, not one per run.
    train = dataclasses.replace(Settings().train, max_steps=args.steps, eval_interval=args.steps,
                                cache_dir=args.cache_dir, peak_flops=peak_flops(torch.device("cpu"), torch.float32))
    settings = Settings(train=train, seeds=tuple(args.seeds))
    command = "python bench/claims.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    data = Pretraining.prepare(train, train.tokenizer, settings.model.max_position_embeddings,
                               progress=True).data  # what each run reads
    run_claims(claims, Runs(settings, data), args.json, command.strip(), malloc_tuned)
    print(f"done in {time.perf_counter() - start:.0f} s; results in {args.json}; "
          f"figures: python bench/claims_plot.py --json {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
