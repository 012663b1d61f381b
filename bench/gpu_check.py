"""The GPU check: every GPU path of the project (CUDA, or Apple silicon's MPS) in one short run,
printed as one table.

Run it whenever a GPU is at hand, and put its table in the README. It runs the same code on the CPU
with tiny shapes (`--reduced`, what the test suite does) so that it cannot rot between GPUs. On MPS
the reduced shapes are the default too (a laptop's memory); `--full` asks for the full ones.

    train    training steps as `qwen3 train` takes them (autocast in the device's dtype, Muon + AdamW,
             clipping), eager and compiled, at the seed shape and at the qwen3-0.6b shape: tokens/s,
             MFU against the device's peak, peak memory; transformers' Qwen3ForCausalLM side by side
    loop     `qwen3 train --preset tiny` end to end on the device; with more than one GPU also under
             torchrun on all of them (DDP over NCCL), whose logged losses must equal one process's
    decode   greedy decoding with qwen3.infer.engine at batch 1 and 16, eager and compiled, against
             transformers' generate (bench/decode_bench.py's measurement)
    serve    `qwen3 serve` with 16 streaming clients (bench/serve_bench.py's clients): aggregate
             tokens/s, all answered 200

    python bench/gpu_check.py                      # about 6 minutes on one H100-class GPU
    python bench/gpu_check.py --reduced            # tiny shapes, any device (3-6 minutes on 2 CPU cores)
    python bench/gpu_check.py --device mps         # an Apple silicon Mac (reduced shapes; --full for all)
    python bench/gpu_check.py --sections train,decode --json check.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import decode_bench
import httpx
import serve_bench
import torch
import train_throughput

from qwen3.config import ModelConfig, preset
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.model.loss import CausalLMLoss
from qwen3.runtime import (device_name, init_distributed, peak_flops, peak_rss_mb, resolve_device, resolve_dtype,
                           synchronize)
from qwen3.train.muon import build_optimizers
from qwen3.train.parallel import wrap_step_model
from qwen3.train.plan import flops_per_token

SECTIONS = ("train", "loop", "decode", "serve")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of one check: the full one for a GPU, or the reduced one that runs anywhere."""

    train_shapes: dict[str, tuple[ModelConfig, int, int]]  # name -> (config, batch rows, seq_len)
    warmup_steps: int
    timed_steps: int
    loop_steps: int
    decode_shape: ModelConfig
    decode_batches: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    repeats: int
    clients: int
    client_requests: int
    client_tokens: int


def plan(reduced: bool) -> Plan:
    if reduced:
        tiny = dataclasses.replace(preset("tiny")[0], max_position_embeddings=256)
        return Plan({"tiny": (tiny, 2, 64)}, 1, 2, 6,
                    tiny, (1, 4), 16, 24, 3, 4, 1, 8)
    qwen3_06b = dataclasses.replace(preset("qwen3-0.6b")[0], max_position_embeddings=2048)
    return Plan({"seed": (train_throughput.seed_shape(), 16, 256), "qwen3-0.6b": (qwen3_06b, 8, 1024)}, 3, 5, 60,
                qwen3_06b, (1, 16), 128, 64, 3, 16, 2, 64)


def peak_memory_gb(device: torch.device) -> float:
    """The device's peak allocated memory since the last reset; on MPS, which keeps no peak, what
    Metal holds now; on the CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 1e9
    return peak_rss_mb() * 2**20 / 1e9


def release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def time_training(name: str, step_module: torch.nn.Module, params: list[torch.nn.Parameter],
                  optimizers: list[torch.optim.Optimizer], config: ModelConfig, rows: int, seq_len: int,
                  sizes: Plan, device: torch.device, dtype: torch.dtype, peak: float) -> dict:
    """Median step time of `step_module` (model + loss) over the plan's timed steps, after warm-up."""
    generator = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], float("nan")
    for index in range(sizes.warmup_steps + sizes.timed_steps):
        x, y = torch.randint(0, config.vocab_size, (2, rows, seq_len), generator=generator).to(device)
        synchronize(device)
        start = time.perf_counter()
        loss_tensor = train_throughput.training_step(step_module, optimizers, params, x, y, dtype, device)
        synchronize(device)
        if index >= sizes.warmup_steps:
            times.append(time.perf_counter() - start)
        loss = loss_tensor.item()
    tok_s = rows * seq_len / statistics.median(times)
    return {"section": "train", "case": name, "tok_s": tok_s,
            "mfu": tok_s * flops_per_token(config, seq_len) / peak,
            "memory_gb": peak_memory_gb(device), "note": f"loss {loss:.3f}"}


def train_section(sizes: Plan, device: torch.device, dtype: torch.dtype, log: Callable[[str], None]) -> list[dict]:
    rows_out = []
    single = init_distributed(str(device))
    peak = peak_flops(device, dtype)  # a data-sheet figure, or a matmul probe on the CPU: measured once
    for shape, (config, rows, seq_len) in sizes.train_shapes.items():
        for contender in ("ours", "ours compiled", "transformers"):
            torch.manual_seed(0)
            if contender == "transformers":
                module = train_throughput.TransformersLoss(config).to(device)
            else:
                module = CausalLMLoss(Qwen3ForCausalLM(config).to(device))
            optimizers = build_optimizers(module.model)  # Muon + AdamW, as `qwen3 train`
            params = [p for p in module.parameters() if p.requires_grad]
            step_module = wrap_step_model(module, contender == "ours compiled", single)
            log(f"train: {shape} {contender}")
            rows_out.append(time_training(f"{shape} {rows}x{seq_len}, {contender}", step_module, params,
                                          optimizers, config, rows, seq_len, sizes, device, dtype, peak))
            del module, step_module, optimizers, params
            release_cached_memory(device)
    return rows_out


def train_command(out: Path, steps: int, device: torch.device, processes: int) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    command = [*launcher, "-m", "qwen3", "train", "--preset", "tiny", "--out", str(out), "--max-steps", str(steps),
               "--set", f"device={device.type}", "--set", "log_interval=1", "--set", f"eval_interval={steps}",
               "--set", "grad_accum=2", "--set", f"cache_dir={out.parent / 'cache'}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def logged(out: Path) -> tuple[dict[int, float], float, float]:
    """A run folder's training losses by step, median tokens/s and last validation loss."""
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ({e["step"]: e["loss"] for e in events if "loss" in e},
            statistics.median(e["tok_per_s"] for e in events if "tok_per_s" in e),
            [e["val_loss"] for e in events if "val_loss" in e][-1])


def loop_section(sizes: Plan, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    rows_out = []
    gpus = torch.cuda.device_count() if device.type == "cuda" else 1
    with tempfile.TemporaryDirectory() as folder:
        runs = {1: Path(folder) / "one"}
        if gpus > 1:
            runs[gpus] = Path(folder) / "all"
        for processes, out in runs.items():
            log(f"loop: qwen3 train --preset tiny, {processes} process(es)")
            start = time.perf_counter()
            completed = train_command(out, sizes.loop_steps, device, processes)
            if completed.returncode != 0:
                raise SystemExit(f"qwen3 train failed on {device}:\n{completed.stderr[-3000:]}")
            losses, tok_s, val_loss = logged(out)
            note = f"{len(losses)} steps, val loss {val_loss:.3f}, {time.perf_counter() - start:.0f} s with set-up"
            if processes > 1:
                single = logged(runs[1])[0]
                worst = max(abs(losses[s] - single[s]) for s in single)
                note += f"; max |loss - 1 process| {worst:.1e}" + (" OK" if worst < 2e-3 else " MISMATCH")
            rows_out.append({"section": "loop", "case": f"qwen3 train tiny, {processes} process(es)",
                             "tok_s": tok_s, "note": note})
    return rows_out


def decode_section(sizes: Plan, device: torch.device, dtype: torch.dtype, log: Callable[[str], None]) -> list[dict]:
    rows_out = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = decode_bench.random_checkpoint(Path(folder) / "model", sizes.decode_shape)
        log("decode: loading")
        contenders = decode_bench.Contenders(checkpoint, device, dtype, compile=True)
        vocab = sizes.decode_shape.vocab_size
        for batch in sizes.decode_batches:
            log(f"decode: batch {batch}")
            summary = decode_bench.measure(contenders, batch, sizes.prompt_tokens, sizes.new_tokens, sizes.repeats,
                                           device, vocab, time.perf_counter)
            reference = summary["transformers"]["decode_tok_s"]
            for name, figures in summary.items():
                rows_out.append({"section": "decode", "case": f"batch {batch}, {name}", "tok_s": figures["decode_tok_s"],
                                 "vs_transformers": figures["decode_tok_s"] / reference,
                                 "note": f"first token {figures['first_token_ms']:.1f} ms"})
    return rows_out


def serve_section(sizes: Plan, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = serve_bench.random_checkpoint(Path(folder) / "model")
        port = serve_bench.free_port()
        server = serve_bench.start_server(checkpoint, port, max_batch=sizes.clients)  # on the GPU if any
        try:
            url = f"http://127.0.0.1:{port}"
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            log(f"serve: {sizes.clients} streaming clients")
            asyncio.run(serve_bench.run_level(url, model, 1, 1, 4))  # warm-up
            results, wall = asyncio.run(serve_bench.run_level(url, model, sizes.clients, sizes.client_requests,
                                                              sizes.client_tokens))
        finally:
            server.terminate()
            server.wait(timeout=30)
    tokens = sum(r.tokens for r in results)
    return [{"section": "serve", "case": f"{sizes.clients} streaming clients", "tok_s": tokens / wall,
             "note": f"{len(results)} requests, all 200; latency p50 "
                     f"{statistics.median(r.latency for r in results):.2f} s"}]


def print_table(rows: list[dict], header: str) -> None:
    print(f"\n{header}")
    print(f"{'section':<8}{'case':<44}{'tok/s':>11}{'MFU':>7}{'peak GB':>9}{'vs hf':>7}  note")
    for row in rows:
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else ""
        memory = f"{row['memory_gb']:.2f}" if "memory_gb" in row else ""
        ratio = f"{row['vs_transformers']:.2f}x" if "vs_transformers" in row else ""
        print(f"{row['section']:<8}{row['case']:<44}{row['tok_s']:>11,.0f}{mfu:>7}{memory:>9}{ratio:>7}  "
              f"{row.get('note', '')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="tiny shapes (the default without CUDA)")
    parser.add_argument("--full", action="store_true", help="the full shapes on MPS")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    sections = args.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        raise SystemExit(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    device = resolve_device(args.device)
    reduced = args.reduced or device.type == "cpu" or (device.type == "mps" and not args.full)
    sizes = plan(reduced)
    dtype = resolve_dtype("auto", device)
    units = (f"{torch.cuda.device_count()} GPUs" if device.type == "cuda"
             else "1 GPU" if device.type == "mps" else f"{os.cpu_count()} cores")
    header = (f"{device_name(device)} ({units}), {str(dtype).removeprefix('torch.')}, torch "
              f"{torch.__version__}, {'reduced' if reduced else 'full'} sizes")
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    rows: list[dict] = []
    if "train" in sections:
        rows += train_section(sizes, device, dtype, log)
    if "loop" in sections:
        rows += loop_section(sizes, device, log)
    if "decode" in sections:
        rows += decode_section(sizes, device, dtype, log)
    if "serve" in sections:
        rows += serve_section(sizes, device, log)
    print_table(rows, f"{header}; {time.perf_counter() - started:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
