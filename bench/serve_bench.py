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

With --load it runs the load test instead: --clients streaming clients (default 64) for --duration
seconds (default 60) against a server with --max-batch 8, whose waiting line (4 x 8) is smaller than
the crowd, so some requests are answered 429 and retried after their Retry-After. Every tenth request
is dropped after its first chunk, as a client that closes its tab. It reports requests and errors by
status, /health latency (polled every 0.2 s throughout), the server's RSS after a warm-up and at the
end, and then, on the idle server, whether streams closed mid-way free their batch rows (/health's
`running` count drops back to 0):

    python bench/serve_bench.py --load                    # 64 clients, 60 s
    python bench/serve_bench.py --load --clients 16 --duration 10 --json out.json

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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from qwen3.config import preset
from qwen3.data.sources import kjv_books
from qwen3.data.tokenizer import train_tokenizer
from qwen3.model.checkpoint import find_checkpoint, save_model
from qwen3.model.decoder import Qwen3ForCausalLM

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


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Load:
    """What the load test saw: answers by status, problems, /health latencies, RSS samples."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.problems: list[str] = []  # anything but a complete stream, a drop we chose, or a 429
        self.missing_retry_after = 0
        self.accepted = 0  # streams answered 200
        self.dropped = 0
        self.health_latencies: list[float] = []
        self.running: list[int] = []
        self.rss: list[float] = []


async def load_client(http: httpx.AsyncClient, model: str, index: int, deadline: float, load: Load) -> None:
    """Streamed completions one after another until `deadline`; every tenth accepted stream (over
    all clients) is left after its first chunk."""
    sent = 0
    while time.monotonic() < deadline:
        sent += 1
        body = {"model": model, "prompt": PROMPTS[(index + sent) % len(PROMPTS)], "max_tokens": 48,
                "temperature": 1.0, "stream": True}
        try:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                load.statuses[response.status_code] += 1
                if response.status_code == 429:
                    retry_after = response.headers.get("retry-after")
                    load.missing_retry_after += retry_after is None
                    await response.aread()
                    await asyncio.sleep(float(retry_after or 1))
                    continue
                if response.status_code != 200:
                    load.problems.append(f"{response.status_code}: {(await response.aread())[:200]!r}")
                    continue
                load.accepted += 1
                drop = load.accepted % 10 == 0
                done = False
                async for line in response.aiter_lines():
                    if drop and line.startswith("data: "):
                        load.dropped += 1
                        break  # leaving the block closes the connection mid-stream
                    done = done or line == "data: [DONE]"
                    if line.startswith('data: {"error"'):
                        load.problems.append(line[:200])
                if not done and not drop:
                    load.problems.append("a stream ended without data: [DONE]")
        except httpx.HTTPError as error:
            load.problems.append(f"{type(error).__name__}: {error}")


async def watch(url: str, pid: int, deadline: float, load: Load) -> None:
    """Poll /health every 0.2 s (its latency and running count) and the server's RSS every second."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        last_rss = 0.0
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                health = await http.get("/health")
                load.health_latencies.append(time.perf_counter() - start)
                if health.status_code != 200:
                    load.problems.append(f"/health answered {health.status_code}")
                else:
                    load.running.append(health.json()["running"])
            except httpx.HTTPError as error:
                load.problems.append(f"/health: {type(error).__name__}: {error}")
            if time.monotonic() - last_rss >= 1:
                load.rss.append(rss_mb(pid))
                last_rss = time.monotonic()
            await asyncio.sleep(0.2)


async def run_load(url: str, model: str, pid: int, clients: int, seconds: float) -> Load:
    load = Load()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(watch(url, pid, deadline, load),
                             *(load_client(http, model, i, deadline, load) for i in range(clients)))
    return load


async def disconnect_check(url: str, model: str) -> dict:
    """Open up to 4 long streams (all running), read one chunk each, close them: do their rows go?"""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        context = (await http.get(f"/v1/models/{model}")).json()["context_length"]
        before = (await http.get("/health")).json()
        streams = min(4, before["max_batch"])
        body = {"model": model, "prompt": "In the beginning", "max_tokens": context - 16, "temperature": 1.0,
                "stream": True}
        responses = [await http.send(http.build_request("POST", "/v1/completions", json=body), stream=True)
                     for _ in range(streams)]
        # Keep the line iterators: a dropped one would close its stream at once.
        lines = [response.aiter_lines() for response in responses]
        for stream in lines:
            await stream.__anext__()
        # A row's first chunk can arrive just before the scheduler counts the row: wait for it.
        opened = time.perf_counter()
        while (running_open := (await http.get("/health")).json()["running"]) < streams:
            if time.perf_counter() - opened > 5:
                break
            await asyncio.sleep(0.01)
        for response in responses:
            await response.aclose()
        closed = time.perf_counter()
        while (health := (await http.get("/health")).json())["running"] and time.perf_counter() - closed < 30:
            await asyncio.sleep(0.01)
        return {"streams": streams, "running_while_open": running_open, "running_after_close": health["running"],
                "freed_in_s": round(time.perf_counter() - closed, 3),
                "cancelled": health["cancelled"] - before["cancelled"]}


def load_test(args: argparse.Namespace, url: str, model: str, pid: int) -> dict:
    """Warm up, run the load, check disconnects; the figures as a dict (printed, and saved with --json)."""
    asyncio.run(run_load(url, model, pid, args.clients, min(5.0, args.duration / 4)))  # first allocations
    rss_start = rss_mb(pid)
    load = asyncio.run(run_load(url, model, pid, args.clients, args.duration))
    rss_end = rss_mb(pid)
    latencies = load.health_latencies
    return {"clients": args.clients, "duration_s": args.duration, "max_batch": args.max_batch,
            "requests": sum(load.statuses.values()), "statuses": dict(sorted(load.statuses.items())),
            "dropped_mid_stream": load.dropped, "problems": len(load.problems), "first_problems": load.problems[:5],
            "429_without_retry_after": load.missing_retry_after, "health_polls": len(latencies),
            "health_p50_ms": round(1000 * percentile(latencies, 0.5), 1),
            "health_p99_ms": round(1000 * percentile(latencies, 0.99), 1),
            "health_max_ms": round(1000 * max(latencies), 1), "running_max": max(load.running),
            "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_end, 1),
            "rss_max_mb": round(max(load.rss), 1), "disconnect": asyncio.run(disconnect_check(url, model))}


def throughput_test(args: argparse.Namespace, url: str, model: str, checkpoint: Path) -> None:
    """Aggregate tokens/s and latency at each level of LEVELS, in interleaved rounds."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="checkpoint or run folder (default: random seed-shape model)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client in each round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the levels")
    parser.add_argument("--max-tokens", type=int, default=96, help="completion tokens per request")
    parser.add_argument("--max-batch", type=int, help="the server's --max-batch (default 16; 8 with --load)")
    parser.add_argument("--load", action="store_true", help="run the load test instead")
    parser.add_argument("--clients", type=int, default=64, help="--load: concurrent streaming clients")
    parser.add_argument("--duration", type=float, default=60, help="--load: seconds of load")
    parser.add_argument("--json", type=Path, help="--load: also write the figures to this file")
    args = parser.parse_args()
    args.max_batch = args.max_batch or (8 if args.load else 16)

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = (find_checkpoint(args.checkpoint) if args.checkpoint
                      else random_checkpoint(Path(scratch) / "seed-random"))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(checkpoint, port, args.max_batch)
        try:
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            if not args.load:
                throughput_test(args, url, model, checkpoint)
                return
            figures = load_test(args, url, model, server.pid)
            print(json.dumps(figures, indent=1))
            if args.json:
                args.json.write_text(json.dumps(figures, indent=1) + "\n")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
