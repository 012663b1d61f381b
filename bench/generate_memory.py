"""`qwen3 generate` on a Qwen3-0.6B-shaped bfloat16 folder, as a user runs it: peak memory and decode
tokens/s, this tree beside another checkout (`--before DIR`, e.g. an older commit), beside llama.cpp's
bf16 and q8_0 exports of the same folder.

The folder is the released shape (hidden 1024 x 28 layers, 16 query / 8 KV heads, head_dim 128,
vocab 151,936, tied, rope_theta 1e6) with random weights saved in bfloat16, as released checkpoints
are (written by a process of its own, so that this one stays small). Each `qwen3 generate` is a
process of its own (load, then greedy decoding): its peak resident memory is its own VmHWM (a
child's rusage maximum would start at its parent's), and decode tokens/s is what a longer run adds
over a one-token run, (new - 1) / (t(new) - t(1)), so loading cancels out. Medians of --repeats
runs, the trees interleaved; llama.cpp's `llama-bench` (tg test) on the same threads.

    python bench/generate_memory.py [--before ../old-checkout] [--threads 2] [--new-tokens 65]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import decode_bench
import torch
from llamacpp_bench import llama_bench, llama_cpp_binaries

from qwen3.config import ModelConfig, preset
from qwen3.data.tokenizer import train_tokenizer
from qwen3.infer.export import export_gguf
from qwen3.model.checkpoint import save_model
from qwen3.model.decoder import Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parent.parent


def qwen3_06b_folder(folder: Path) -> Path:
    """Random Qwen3-0.6B-shaped weights in bfloat16 (a 512-token tokenizer: ids are all that matters here)."""
    config: ModelConfig = preset("qwen3-0.6b")[0]
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    save_model(model, folder, tokenizer=train_tokenizer([decode_bench.TEXT], vocab_size=512))
    return folder


# `qwen3 generate ...` whose process says its peak resident memory (VmHWM) on its last stderr line.
GENERATE = """import sys
from qwen3.cli import main
try:
    main(sys.argv[1:])
finally:
    with open("/proc/self/status") as status:
        print(next(line.split()[1] for line in status if line.startswith("VmHWM:")), file=sys.stderr)
"""


def generate(tree: Path, folder: Path, new_tokens: int, threads: int) -> tuple[float, float]:
    """One `qwen3 generate` process of `tree`'s code: (seconds, peak resident MiB)."""
    environment = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-c", GENERATE, "generate", str(folder), "--prompt", decode_bench.TEXT[:200],
               "--temperature", "0", "--max-new-tokens", str(new_tokens), "--device", "cpu"]
    start = time.perf_counter()
    # run in the tree: `python -c` puts the working directory ahead of PYTHONPATH on sys.path
    completed = subprocess.run(command, env=environment, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"qwen3 generate ({tree}) failed:\n{completed.stderr[-3000:]}")
    return seconds, int(completed.stderr.splitlines()[-1]) / 1024  # VmHWM is in KiB


def measure(trees: dict[str, Path], folder: Path, new_tokens: int, threads: int,
            repeats: int) -> dict[str, dict[str, float]]:
    """Each tree's decode tok/s and peak MiB, the trees' runs interleaved so that a busy moment of
    the machine falls on all of them alike."""
    runs: dict[str, dict[int, list[tuple[float, float]]]] = {name: {1: [], new_tokens: []} for name in trees}
    for _ in range(repeats):
        for tokens in (1, new_tokens):
            for name, tree in trees.items():
                runs[name][tokens].append(generate(tree, folder, tokens, threads))
    rows = {}
    for name, by_length in runs.items():
        decode_s = (statistics.median(s for s, _ in by_length[new_tokens])
                    - statistics.median(s for s, _ in by_length[1]))
        rows[name] = {"decode": (new_tokens - 1) / decode_s,
                      "peak_mib": max(peak for runs_of in by_length.values() for _, peak in runs_of)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="another checkout of the project to measure beside this one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=65)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-folder", type=Path, help=argparse.SUPPRESS)  # the folder's own process
    args = parser.parse_args()
    if args.write_folder:
        qwen3_06b_folder(args.write_folder)
        return
    binaries = llama_cpp_binaries()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "qwen3-0.6b-bf16"
        subprocess.run([sys.executable, __file__, "--write-folder", str(folder)], check=True)
        size = (folder / "model.safetensors").stat().st_size / 2**20
        print(f"Qwen3-0.6B shape, bfloat16 folder ({size:,.0f} MiB of weights), {args.threads} threads, greedy, "
              f"{args.new_tokens} new tokens, median of {args.repeats}; torch {torch.__version__}")
        trees = {"qwen3 generate (this tree)": ROOT}
        if args.before:
            trees[f"qwen3 generate ({args.before})"] = args.before.resolve()
        rows = measure(trees, folder, args.new_tokens, args.threads, args.repeats)
        for kind in ("bf16", "q8_0"):
            gguf = export_gguf(folder, Path(scratch) / f"qwen3-0.6b-{kind}.gguf", kind)
            rows[f"llama.cpp {kind}"] = llama_bench(binaries, gguf, args.threads, 64, args.new_tokens, args.repeats)
        reference = rows["qwen3 generate (this tree)"]["decode"]
        print(f"\n{'':44}{'decode tok/s':>20}{'peak MiB':>12}")
        for name, row in rows.items():
            peak = f"{row['peak_mib']:,.0f}" if "peak_mib" in row else ""
            print(f"  {name:42}{row['decode']:10.1f} ({row['decode'] / reference:4.2f}x){peak:>12}")


if __name__ == "__main__":
    main()
