"""Local inference against the tool a user would pick instead: our engine against llama.cpp, width by width.

The same random-weight models, exported with `qwen3 export` (and llama.cpp's own `llama-quantize` for
q4_0), on the same CPU threads, in one run. Two shapes:

  seed        hidden 128 x 3 layers, vocab 8,192, float32: per-token overhead; ours float32 eager and
              compiled against llama.cpp f32
  Qwen3-0.6B  hidden 1024 x 28 layers, vocab 151,936, a bfloat16 folder as released: bytes per weight;
              ours compiled in bfloat16 (the dtype `--dtype auto` picks where the CPU multiplies it
              natively; float32 elsewhere), int8 and int4 against llama.cpp bf16, q8_0 and q4_0

For each: decode tok/s at batch 1 after a 64-token prompt (the rate after the first new token) and at
batch 8 (8 prompts of 64, tokens of all rows per second; llama.cpp's `llama-batched-bench`), and
prefill tok/s of 64- and 512-token prompts (ours: the prompt's tokens over the time to the first
token; llama.cpp: `llama-bench`'s pp tests). Medians of --repeats runs; each of our rows is printed
with its ratio to the llama.cpp row of its width. At the seed shape `generate` and `generate_batch`
of one prompt are timed side by side (the same loop: their ratio should be 1).

    python bench/llamacpp_bench.py [--threads 2] [--repeats 3] [--shapes seed,qwen3-0.6b] [--new-tokens N] [--profile]

--profile prints where a decode step of each of our rows spends its time (torch.profiler, eager, by
operator). llama.cpp is built by scripts/build-llama-cpp.sh (about 17 minutes the first time, then cached).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import decode_bench
import torch

from qwen3.config import ModelConfig, preset
from qwen3.infer.engine import Engine, load_engine
from qwen3.infer.export import export_gguf
from qwen3.infer.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
SEED = ModelConfig(vocab_size=8192, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024)


@dataclass
class Shape:
    config: ModelConfig
    dtype: torch.dtype  # the folder's
    ours: list[tuple[str, str | None, bool]]  # rows: name, quantize, compile
    peers: dict[str, str]  # our row -> llama.cpp's width it is compared with
    new_tokens: int  # per decode run: a seed-shape token takes well under a millisecond


SHAPES = {
    "seed": Shape(SEED, torch.float32, [("float32", None, False), ("float32 compiled", None, True)],
                  {"float32": "f32", "float32 compiled": "f32"}, 128),
    "qwen3-0.6b": Shape(preset("qwen3-0.6b")[0], torch.bfloat16,
                        [("bfloat16 compiled", None, True), ("int8 compiled", "int8", True),
                         ("int4 compiled", "int4", True)],
                        {"bfloat16 compiled": "bf16", "int8 compiled": "q8_0", "int4 compiled": "q4_0"}, 32),
}
PROMPTS = (64, 512)
BATCH = 8


def llama_cpp_binaries() -> Path:
    completed = subprocess.run([str(ROOT / "scripts" / "build-llama-cpp.sh")], capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"building llama.cpp failed:\n{completed.stderr[-3000:]}")
    return Path(completed.stdout.strip().splitlines()[-1])


def run_tool(command: list[str]) -> str:
    """A llama.cpp tool's stdout. Its asynchronous log can lose the output of a run (tests/test_export.py
    says when): a run that printed nothing is repeated, up to five times."""
    for _ in range(5):
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise SystemExit(f"{Path(command[0]).name} failed:\n{completed.stderr[-3000:]}")
        if completed.stdout.strip():
            return completed.stdout
    raise SystemExit(f"{Path(command[0]).name} printed nothing in 5 runs:\n{completed.stderr[-3000:]}")


def gguf_file(binaries: Path, folder: Path, kind: str, scratch: Path) -> Path:
    """The export of `folder` as `kind`; q4_0 is made from the f32 export by llama-quantize (its
    default recipe: the tied embedding/output matrix in q6_K, as a user's q4_0 file has it)."""
    target = scratch / f"{folder.name}-{kind}.gguf"
    if kind != "q4_0":
        return export_gguf(folder, target, kind, force=True)
    source = export_gguf(folder, scratch / f"{folder.name}-q4_0-source.gguf", "f32", force=True)
    run_tool([str(binaries / "llama-quantize"), str(source), str(target), "q4_0", "1"])
    source.unlink()
    return target


def llama_bench(binaries: Path, model: Path, threads: int, prompt: int, new: int, repeats: int) -> dict[str, float]:
    """llama-bench's decode rate (tg test, `new` tokens) and its prefill rate of a `prompt`-token prompt."""
    tests = json.loads(run_tool([str(binaries / "llama-bench"), "-m", str(model), "-t", str(threads), "-p",
                                 str(prompt), "-n", str(new), "-r", str(repeats), "-o", "json"]))
    return {"prefill": next(t["avg_ts"] for t in tests if t["n_prompt"] > 0),
            "decode": next(t["avg_ts"] for t in tests if t["n_gen"] > 0)}


def llama_row(binaries: Path, model: Path, threads: int, new: int, repeats: int) -> dict[str, float]:
    row = {}
    for prompt in PROMPTS:
        measured = llama_bench(binaries, model, threads, prompt, new, repeats)
        row[f"prefill {prompt}"] = measured["prefill"]
        row.setdefault("decode", measured["decode"])
    batched = run_tool([str(binaries / "llama-batched-bench"), "-m", str(model), "-t", str(threads), "-c", "4096",
                        "-b", "2048", "-ub", "512", "-npp", str(PROMPTS[0]), "-ntg", str(new), "-npl", str(BATCH),
                        "--output-format", "jsonl"])
    row[f"decode x{BATCH}"] = json.loads(batched.strip().splitlines()[-1])["speed_tg"]
    return row


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(length)
    return torch.randint(10, vocab, (count, length), generator=generator).tolist()


def params(new: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=new, stop_token_ids=[])


def decode_rate(run: Callable[[int], object], rows: int, new: int, repeats: int) -> float:
    """Tokens of all rows per second after the first: what `new` tokens add over one."""
    run(new)  # warm-up (and compilation)
    return rows * (new - 1) / (median_seconds(lambda: run(new), repeats) - median_seconds(lambda: run(1), repeats))


def our_row(engine: Engine, new: int, repeats: int) -> dict[str, float]:
    vocab = engine.model.config.vocab_size
    one, batch = prompts(1, PROMPTS[0], vocab), prompts(BATCH, PROMPTS[0], vocab)
    row = {"decode": decode_rate(lambda n: engine.generate(one[0], params(n)), 1, new, repeats)}
    for length in PROMPTS:
        prompt = prompts(1, length, vocab)[0]
        engine.generate(prompt, params(1))
        row[f"prefill {length}"] = length / median_seconds(lambda: engine.generate(prompt, params(1)), repeats)
    row[f"decode x{BATCH}"] = decode_rate(lambda n: engine.generate_batch(batch, params(n)), BATCH, new, repeats)
    row["generate_batch x1"] = decode_rate(lambda n: engine.generate_batch(one, params(n)), 1, new, repeats)
    return row


def profile(engine: Engine, steps: int = 8) -> None:
    """Where an eager decode step spends its time, by operator (batch 1, after a 64-token prompt)."""
    prompt = prompts(1, PROMPTS[0], engine.model.config.vocab_size)[0]
    engine.generate(prompt, params(steps))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        engine.generate(prompt, params(steps))
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


COLUMNS = ["decode", f"decode x{BATCH}", *(f"prefill {p}" for p in PROMPTS)]


def print_header(shape: str) -> None:
    print(f"\n{shape}: tok/s (ratio to llama.cpp of the same width)\n  {'':26}"
          + "".join(f"{c:>22}" for c in COLUMNS), flush=True)


def print_row(name: str, row: dict[str, float], peer: dict[str, float] | None) -> None:
    cells = [f"{row[c]:10,.1f}" + (f" ({row[c] / peer[c]:5.2f}x)" if peer else " " * 9) for c in COLUMNS]
    print(f"  {name:26}" + "".join(f"{cell:>22}" for cell in cells), flush=True)
    if "generate_batch x1" in row:
        print(f"  {'':26}generate_batch of one prompt: {row['generate_batch x1']:,.1f} tok/s, "
              f"{row['generate_batch x1'] / row['decode']:.2f}x generate's", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, help="per decode run (default: 128 at the seed shape, 32 at 0.6B)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--profile", action="store_true", help="print each of our rows' decode profile by operator")
    args = parser.parse_args()
    binaries = llama_cpp_binaries()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, greedy, median of {args.repeats}; torch "
          f"{torch.__version__}; load average before: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.shapes.split(","):
            shape = SHAPES[name]
            folder = decode_bench.random_checkpoint(Path(scratch) / name, shape.config, shape.dtype)
            new = args.new_tokens or shape.new_tokens
            print_header(f"{name}, {new} new tokens")
            theirs = {}
            for kind in dict.fromkeys(shape.peers.values()):
                model = gguf_file(binaries, folder, kind, Path(scratch))
                theirs[kind] = llama_row(binaries, model, args.threads, new, args.repeats)
                model.unlink()
                print_row(f"llama.cpp {kind}", theirs[kind], None)
            for row, quantize, compiled in shape.ours:
                engine = load_engine(folder, device="cpu", quantize=quantize, compile=compiled)
                print_row(row, our_row(engine, new, args.repeats), theirs[shape.peers[row]])
                del engine
                torch._dynamo.reset()  # each engine's graphs count toward Dynamo's limit of 8 per function
                if args.profile:
                    print(f"\n{name}, {row}: an eager decode step by operator")
                    profile(load_engine(folder, device="cpu", quantize=quantize))
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
