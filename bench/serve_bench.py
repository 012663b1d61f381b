"""Serving throughput: aggregate tokens/s and latency at 1, 4 and 16 concurrent streaming clients.

Starts `qwen3 serve` as a subprocess on a free 127.0.0.1 port (so the clients here do not share a
Python interpreter with it), then for each concurrency level runs that many clients, each sending
--requests streamed completions one after another. The levels are run in --rounds interleaved rounds
(1, 4, 16, 1, 4, 16, ...) so that a change in the machine's load hits every level alike. Every
figure comes from this one run.

    aggregate tok/s   completion tokens / wall time of a round at that level; the median round
    latency p50/p95   request sent -> last event ([DONE]), over the level's requests in all rounds
    first token p50   request sent -> first text chunk
    16 vs 1           median aggregate tok/s at 16 clients / at 1 client (target: at least 3x)

    python bench/serve_bench.py                           # random seed-shape model, vocab ~8192
    python bench/serve_bench.py --checkpoint runs/seed --max-tokens 64 --rounds 5

Without --checkpoint the model has the seed shape (hidden 128, 3 layers, 4 heads, 2 KV heads,
head_dim 32, intermediate 512) with random weights and a tokenizer of 8192 ids trained on part of the
King James Bible: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from qwen3.checkpoint import find_checkpoint, save_model
from qwen3.config import preset
from qwen3.sources import kjv_books
from qwen3.model import Qwen3ForCausalLM
from qwen3.tokenizer import train_tokenizer

LEVELS = (1, 4, 16)
PROMPTS = [
    "In the beginning",
    "And God said, Let there be light",
    "The Lord is my shepherd; I shall not want.",
    "Blessed are the meek: for they shall inherit the earth.",
    "And the evening and the morning were the first day.",
    "Vanity of vanities, saith the Preacher",
]


@dataclass
class Result:
    tokens: int
    latency: float
    first_token: float


def random_checkpoint(folder: Path) -> Path:
    """A seed-shape model with random weights and an 8192-id tokenizer, saved at `folder`."""
    tokenizer = train_tokenizer(kjv_books()[:5], vocab_size=8192)
    config, _ = preset("seed")
    config.vocab_size = tokenizer.vocab_size
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    save_model(Qwen3ForCausalLM(config), folder, tokenizer=tokenizer)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(checkpoint: Path, port: int, max_batch: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "qwen3", "serve", str(checkpoint), "--port", str(port),
                               "--max-batch", str(max_batch)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health").raise_for_status()
            return server
        except httpx.TransportError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise SystemExit(f"the server did not start:\n{server.stderr.read()}")
            time.sleep(0.2)


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return Result(tokens, latency, first if first is not None else latency)


async def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int) -> tuple[list[Result], float]:
    """`clients` concurrent clients, each sending `requests` requests in turn; results and wall time."""
    async def client(index: int) -> list[Result]:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            return [await one_request(http, model, PROMPTS[(index + r) % len(PROMPTS)], max_tokens)
                    for r in range(requests)]

    start = time.perf_counter()
    per_client = await asyncio.gather(*(client(i) for i in range(clients)))
    return [result for results in per_client for result in results], time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="checkpoint or run folder (default: random seed-shape model)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client in each round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the levels")
    parser.add_argument("--max-tokens", type=int, default=96, help="completion tokens per request")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = (find_checkpoint(args.checkpoint) if args.checkpoint
                      else random_checkpoint(Path(scratch) / "seed-random"))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(checkpoint, port, args.max_batch)
        try:
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            asyncio.run(run_level(url, model, 1, 1, 8))  # warm-up: first calls allocate and load
            print(f"model {model} ({checkpoint}); {args.rounds} rounds x {args.requests} requests per "
                  f"client, {args.max_tokens} tokens each; torch {torch.__version__}, {os.cpu_count()} CPUs")
            results: dict[int, list[Result]] = {clients: [] for clients in LEVELS}
            throughputs: dict[int, list[float]] = {clients: [] for clients in LEVELS}
            for _ in range(args.rounds):
                for clients in LEVELS:
                    level, wall = asyncio.run(run_level(url, model, clients, args.requests, args.max_tokens))
                    results[clients] += level
                    throughputs[clients].append(sum(r.tokens for r in level) / wall)
            print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'agg tok/s':>10} {'(rounds)':>20} "
                  f"{'latency p50':>11} {'p95':>7} {'first token p50':>15}")
            for clients in LEVELS:
                latencies = [r.latency for r in results[clients]]
                rounds = " ".join(f"{t:.0f}" for t in throughputs[clients])
                print(f"{clients:>7} {len(latencies):>8} {sum(r.tokens for r in results[clients]):>7} "
                      f"{statistics.median(throughputs[clients]):>10.1f} {rounds:>20} "
                      f"{statistics.median(latencies):>10.2f}s {percentile(latencies, 0.95):>6.2f}s "
                      f"{statistics.median(r.first_token for r in results[clients]):>14.3f}s")
            ratio = statistics.median(throughputs[LEVELS[-1]]) / statistics.median(throughputs[1])
            verdict = "meets" if ratio >= 3 else "misses"
            print(f"{LEVELS[-1]} vs 1 clients: {ratio:.1f}x aggregate throughput ({verdict} the 3x target)")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
