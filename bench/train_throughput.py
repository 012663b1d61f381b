"""Training throughput: our training step against transformers' Qwen3ForCausalLM, side by side.

Both models get the same config (the seed shape, vocab 8192 or --vocab), the same batch (16 x 256
tokens), the same autocast dtype (the one `qwen3 train` picks on this machine, or --dtype), the same loss
(float32 cross-entropy over every position: transformers' from the full logits, ours a slice of rows
at a time, qwen3/model/loss.py) and the same optimizer (fused AdamW) with gradient
clipping, as in qwen3/train/loop.py. Each case runs in its own process, one after another, so the
allocator settings can differ: glibc as it comes, glibc tuned by `qwen3.allocator.tune_malloc` (what
training does by default), and jemalloc / tcmalloc through LD_PRELOAD where the system has them.

Prints tokens/s (median of the timed steps; the best of `--rounds` rounds, which run every case in
turn), the fastest single step, minor page faults per step, MFU and the memory the steps add to the
process (peak RSS growth from just before the first step) for each case, the ratios from
this one run, and with --profile the operators our eager step spends its time in.

    python bench/train_throughput.py [--steps 8] [--rounds 2] [--threads N] [--vocab V] [--compile-transformers] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qwen3.allocator import tune_malloc
from qwen3.config import ModelConfig, preset
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.model.loss import CausalLMLoss
from qwen3.runtime import autocast_for, native_bfloat16, peak_flops, peak_rss_mb, resolve_dtype
from qwen3.train.muon import build_optimizers
from qwen3.train.plan import flops_per_token

PRELOAD_CANDIDATES = {
    "jemalloc": ["/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2"],
    "tcmalloc": ["/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                 "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4"],
}


def seed_shape(vocab_size: int = 8192) -> ModelConfig:
    config, _ = preset("seed")
    return ModelConfig(**{**config.__dict__, "vocab_size": vocab_size})


class TransformersLoss(torch.nn.Module):
    """transformers' model with the same float32 loss over every position as ours."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        from transformers import Qwen3Config
        from transformers import Qwen3ForCausalLM as Reference

        hf = config.to_hf_dict()
        for key in ("architectures", "model_type", "torch_dtype"):
            hf.pop(key)
        self.model = Reference(Qwen3Config(**hf, attn_implementation="sdpa"))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def build(model_name: str, compile_model: bool, vocab_size: int) -> tuple[torch.nn.Module, list[torch.optim.Optimizer]]:
    torch.manual_seed(0)
    config = seed_shape(vocab_size)
    module = TransformersLoss(config) if model_name == "transformers" else CausalLMLoss(Qwen3ForCausalLM(config))
    optimizers = build_optimizers(module.model, "adamw", adamw_lr=1e-3)  # fused AdamW on everything
    step_module = torch.compile(module) if compile_model else module
    return step_module, optimizers


def training_step(step_module: torch.nn.Module, optimizers: list, params: list, x: torch.Tensor,
                  y: torch.Tensor, dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """One optimizer step as the training loop takes it: autocast forward, backward, clip, step.
    Returns the loss (on the device)."""
    with autocast_for(device, dtype):
        loss = step_module(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss


def worker(case: dict) -> dict:
    """Time `case` in this process; returns the measurements."""
    if case["malloc"] == "tuned":
        tune_malloc()
    if case["threads"]:
        torch.set_num_threads(case["threads"])
    dtype = getattr(torch, case["dtype"])
    step_module, optimizers = build(case["model"], case["compile"], case["vocab"])
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(0)
    vocab = case["vocab"]
    rss_before = peak_rss_mb()

    def step() -> None:
        x = torch.randint(0, vocab, (case["batch"], case["seq"]), generator=generator)
        y = torch.randint(0, vocab, (case["batch"], case["seq"]), generator=generator)
        training_step(step_module, optimizers, params, x, y, dtype)

    start = time.perf_counter()
    for _ in range(case["warmup"]):  # includes compilation
        step()
    warmup_s = time.perf_counter() - start
    times = []
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(case["steps"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / case["steps"]
    tokens = case["batch"] * case["seq"]
    return {"tok_s": tokens / statistics.median(times), "tok_s_best": tokens / min(times),
            "step_ms": 1000 * statistics.median(times), "faults": faults, "warmup_s": warmup_s,
            "added_mb": peak_rss_mb() - rss_before}


def run_case(case: dict) -> dict:
    env = dict(os.environ)
    if case["malloc"] in PRELOAD_CANDIDATES:
        env["LD_PRELOAD"] = case["library"]
    completed = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], env=env,
                               capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"case {case['name']} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def profile_ours(case: dict, rows: int = 14) -> None:
    """Top operators of our step (eager, tuned malloc) by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    tune_malloc()
    if case["threads"]:
        torch.set_num_threads(case["threads"])
    step_module, optimizers = build("ours", False, case["vocab"])
    params = list(step_module.model.parameters())
    x = torch.randint(0, case["vocab"], (case["batch"], case["seq"]))
    y = torch.randint(0, case["vocab"], (case["batch"], case["seq"]))
    dtype = getattr(torch, case["dtype"])

    def step() -> None:
        training_step(step_module, optimizers, params, x, y, dtype)

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size (the head's share of the step)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    parser.add_argument("--compile-transformers", action="store_true",
                        help="also time transformers under torch.compile")
    parser.add_argument("--rounds", type=int, default=2, help="times each case runs (its best round counts)")
    parser.add_argument("--profile", action="store_true", help="print our step's top operators")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    if args.threads:
        torch.set_num_threads(args.threads)  # the peak probe runs with the same threads
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    dtype_name = str(dtype).removeprefix("torch.")
    config = seed_shape(args.vocab)
    flops = flops_per_token(config, args.seq)
    peak = peak_flops(torch.device("cpu"), dtype, repeats=40)  # best of many: robust to load bursts
    print(f"seed shape, vocab {config.vocab_size}, batch {args.batch}x{args.seq}, {dtype_name} "
          f"(native bfloat16: {native_bfloat16('cpu')}), fused AdamW, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{flops / 1e6:.1f} MFLOP per token; peak {peak / 1e9:.0f} GFLOP/s ({dtype_name} matmul probe); "
          f"load average {os.getloadavg()[0]:.1f}\n")

    base = dict(dtype=dtype_name, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                threads=args.threads, vocab=args.vocab)
    cases = []
    for model, compiled in [("transformers", False), ("transformers", True), ("ours", False), ("ours", True)]:
        if compiled and (args.no_compile or (model == "transformers" and not args.compile_transformers)):
            continue
        for malloc in ("glibc", "tuned"):
            allocator = "glibc default" if malloc == "glibc" else "glibc tuned"
            name = f"{model}{' compiled' if compiled else ''}, {allocator}"
            cases.append(dict(base, name=name, model=model, compile=compiled, malloc=malloc))
    for malloc, paths in PRELOAD_CANDIDATES.items():
        library = next((p for p in paths if Path(p).exists()), None)
        if library:
            cases.append(dict(base, name=f"ours{'' if args.no_compile else ' compiled'}, {malloc}",
                              model="ours", compile=not args.no_compile, malloc=malloc, library=library))

    # Rounds run every case once, in order: on a shared machine a burst of load then hits one round
    # of a case, not all of them, and each case keeps its best round.
    results: dict[str, dict] = {}
    for round_number in range(1, args.rounds + 1):
        print(f"round {round_number} of {args.rounds}", flush=True)
        for case in cases:
            r = run_case(case)
            if case["name"] not in results or r["tok_s"] > results[case["name"]]["tok_s"]:
                results[case["name"]] = r
    print(f"\n{'case':<38}{'tok/s':>9}{'best':>9}{'ms/step':>9}{'faults/step':>13}{'MFU':>7}{'warm-up s':>11}"
          f"{'added MB':>10}")
    for name, r in results.items():
        print(f"{name:<38}{r['tok_s']:>9,.0f}{r['tok_s_best']:>9,.0f}{r['step_ms']:>9.0f}"
              f"{r['faults']:>13,.0f}{r['tok_s'] * flops / peak:>7.1%}{r['warmup_s']:>11.1f}{r['added_mb']:>10,.0f}")

    reference = results["transformers, glibc default"]["tok_s"]
    ours_best_name = max((n for n in results if n.startswith("ours")), key=lambda n: results[n]["tok_s"])
    print(f"\nours at its best ({ours_best_name}) / transformers (glibc default): "
          f"{results[ours_best_name]['tok_s'] / reference:.2f}x")
    print(f"ours / transformers, both eager on tuned glibc: "
          f"{results['ours, glibc tuned']['tok_s'] / results['transformers, glibc tuned']['tok_s']:.2f}x tok/s, "
          f"{results['ours, glibc tuned']['added_mb'] / results['transformers, glibc tuned']['added_mb']:.2f}x "
          f"the memory")
    for model in ("transformers", "ours", "ours compiled"):
        if f"{model}, glibc tuned" in results:
            before, after = results[f"{model}, glibc default"], results[f"{model}, glibc tuned"]
            print(f"tuned / default glibc, {model}: {after['tok_s'] / before['tok_s']:.2f}x tok/s, "
                  f"page faults {before['faults']:,.0f} -> {after['faults']:,.0f} per step")
    if args.profile:
        print("\nwhere our eager step spends its time (3 steps, torch.profiler, self CPU time):")
        profile_ours(base)


if __name__ == "__main__":
    main()
