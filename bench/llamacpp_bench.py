"""Local inference against the tool a user would pick instead: our engine against llama.cpp.

The same random-weight models, exported with `qwen3 export`, on the same CPU threads, in one run:
decode tokens/s at batch 1 (the rate after the first new token) and prefill tokens/s of a 64-token
prompt. Ours eagerly and compiled (float32); llama.cpp's `llama-bench` (tg and pp tests) on the
f32, f16 and q8_0 exports. Shapes: the seed's (hidden 128, 3 layers, vocab 8192) and a larger one
(hidden 1024, 8 layers, Qwen3-0.6B's layer width). Medians of --repeats runs; ratios against ours
eager.

    python bench/llamacpp_bench.py [--threads 2] [--repeats 3]

llama.cpp is built by scripts/build-llama-cpp.sh (about 17 minutes the first time, then cached).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import decode_bench
import torch

from qwen3.config import ModelConfig
from qwen3.infer.engine import load_engine
from qwen3.infer.export import export_gguf
from qwen3.infer.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "seed shape": ModelConfig(vocab_size=8192, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512),
    "hidden 1024 x 8": ModelConfig(vocab_size=8192, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                                   num_attention_heads=16, num_key_value_heads=8, head_dim=64,
                                   max_position_embeddings=512),
}


def llama_cpp_binaries() -> Path:
    completed = subprocess.run([str(ROOT / "scripts" / "build-llama-cpp.sh")], capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"building llama.cpp failed:\n{completed.stderr[-3000:]}")
    return Path(completed.stdout.strip().splitlines()[-1])


def ours(folder: Path, compile_model: bool, threads: int, prompt: int, new: int, repeats: int) -> dict[str, float]:
    """Prefill tok/s from 1-token runs, decode tok/s from the rest of `new`-token runs (batch 1)."""
    torch.set_num_threads(threads)
    engine = load_engine(folder, device="cpu", compile=compile_model)
    ids = torch.randint(10, 8192, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()

    def run(tokens: int) -> float:
        start = time.perf_counter()
        engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=tokens, stop_token_ids=[]))
        return time.perf_counter() - start

    run(new)  # warm-up (and compilation)
    first = statistics.median(run(1) for _ in range(repeats))
    total = statistics.median(run(new) for _ in range(repeats))
    return {"prefill": prompt / first, "decode": (new - 1) / (total - first)}


def llama_bench(binaries: Path, model: Path, threads: int, prompt: int, new: int, repeats: int) -> dict[str, float]:
    completed = subprocess.run([str(binaries / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", str(prompt),
                                "-n", str(new), "-r", str(repeats), "-o", "json"], capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"llama-bench failed:\n{completed.stderr[-3000:]}")
    tests = json.loads(completed.stdout)
    return {"prefill": next(t["avg_ts"] for t in tests if t["n_prompt"] > 0),
            "decode": next(t["avg_ts"] for t in tests if t["n_gen"] > 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    binaries = llama_cpp_binaries()
    print(f"{args.threads} threads, prompt {args.prompt_tokens} tokens, {args.new_tokens} new, batch 1, "
          f"median of {args.repeats}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as scratch:
        for shape, config in SHAPES.items():
            folder = decode_bench.random_checkpoint(Path(scratch) / shape.replace(" ", "-"), config)
            rows = {}
            for name, compiled in (("ours", False), ("ours compiled", True)):
                rows[name] = ours(folder, compiled, args.threads, args.prompt_tokens, args.new_tokens, args.repeats)
            for kind in ("f32", "f16", "q8_0"):
                model = export_gguf(folder, Path(scratch) / f"{shape.replace(' ', '-')}-{kind}.gguf", kind)
                rows[f"llama.cpp {kind}"] = llama_bench(binaries, model, args.threads, args.prompt_tokens,
                                                        args.new_tokens, args.repeats)
            reference = rows["ours"]
            print(f"\n{shape}:{'':14}decode tok/s          prefill tok/s")
            for name, row in rows.items():
                print(f"  {name:20}{row['decode']:10,.0f} ({row['decode'] / reference['decode']:5.2f}x)"
                      f"{row['prefill']:12,.0f} ({row['prefill'] / reference['prefill']:5.2f}x)")


if __name__ == "__main__":
    main()
