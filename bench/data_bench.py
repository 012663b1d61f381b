"""Token store throughput and memory: build it for synthetic 100 MB and 1 GB corpora.

Each corpus is a folder of text files written in chunks from a small vocabulary of words (read as
`FOLDER:doc=paragraph`, so documents are paragraphs of a few KB). Each build runs in a fresh child
process, so its peak RSS is the build's own: the store must stay memory-flat, under 1 GB for 1 GB of
text. The tokenizer is trained on the first qwen3.data.TOKENIZER_SAMPLE_BYTES of text (timed
separately), then the whole corpus is tokenized into the store (its MB/s is the headline number).

    .venv/bin/python bench/data_bench.py [--sizes 100,1000] [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FILE_BYTES = 64 * 2**20
RSS_LIMIT_MB = 1024


def write_corpus(folder: Path, size_mb: int, seed: int = 0) -> int:
    """Write about `size_mb` MB of paragraphs built from a 2,000-word vocabulary; return the bytes."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(2000)]
    frequency = 1 / np.arange(1, len(words) + 1)  # Zipf-like, as in natural text
    # A pool of sentences, sampled into paragraphs: fast to write, and the words follow the vocabulary.
    pool = [" ".join(rng.choice(words, size=rng.integers(5, 20), p=frequency / frequency.sum())).capitalize() + "."
            for _ in range(20000)]
    folder.mkdir(parents=True)
    target, written, index = size_mb * 2**20, 0, 0
    while written < target:
        with open(folder / f"part-{index:04d}.txt", "w", encoding="utf-8") as handle:
            file_written = 0
            while file_written < FILE_BYTES and written + file_written < target:
                chunk = "\n\n".join(" ".join(pool[i] for i in rng.integers(0, len(pool), size=rng.integers(5, 30)))
                                    for _ in range(2000)) + "\n\n"
                handle.write(chunk)
                file_written += len(chunk)
        written += file_written
        index += 1
    return written


def build(source: str, cache_dir: str, vocab_size: int) -> None:
    """The child: prepare the store, then print timings and peak RSS as one JSON line."""
    import resource

    from qwen3.data import prepare

    marks = {"start": time.perf_counter()}

    def log(message: str) -> None:
        print(message, file=sys.stderr)
        if message.startswith("training"):
            marks["tokenizer"] = time.perf_counter()
        elif message.startswith("building"):
            marks["store"] = time.perf_counter()

    data = prepare([source], vocab_size=vocab_size, cache_dir=cache_dir, progress=False, log=log)
    end = time.perf_counter()
    print(json.dumps({
        "tokenizer_s": marks["store"] - marks.get("tokenizer", marks["store"]),
        "store_s": end - marks["store"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "summary": data.summary,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="corpus sizes in MB, comma separated")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--build", nargs=2, metavar=("SOURCE", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(*args.build, args.vocab_size)
        return

    from qwen3.data import TOKENIZER_SAMPLE_BYTES

    print(f"cpu cores: {os.cpu_count()} (shared with whatever else runs); "
          f"tokenizer sample: first {TOKENIZER_SAMPLE_BYTES // 2**20} MB")
    print(f"{'corpus':>8} {'documents':>10} {'tokens':>12} {'B/token':>8} {'tokenizer s':>12} "
          f"{'store s':>8} {'store MB/s':>10} {'peak RSS MB':>12}")
    failed = False
    with tempfile.TemporaryDirectory(prefix="qwen3-data-bench-") as work:
        for size_mb in (int(size) for size in args.sizes.split(",")):
            folder = Path(work) / f"corpus-{size_mb}mb"
            written = write_corpus(folder, size_mb)
            child = subprocess.run(
                [sys.executable, __file__, "--vocab-size", str(args.vocab_size),
                 "--build", f"{folder}:doc=paragraph", str(Path(work) / f"cache-{size_mb}mb")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if child.returncode != 0:
                sys.exit(f"build failed for {size_mb} MB:\n{child.stderr}")
            result = json.loads(child.stdout.strip().splitlines()[-1])
            summary = result["summary"]
            speed = written / 2**20 / result["store_s"]
            print(f"{size_mb:>6}MB {summary['documents']:>10,} {summary['tokens']:>12,} "
                  f"{summary['bytes_per_token']:>8.2f} {result['tokenizer_s']:>12.1f} {result['store_s']:>8.1f} "
                  f"{speed:>10.2f} {result['peak_rss_mb']:>12.0f}", flush=True)
            failed |= size_mb >= 1000 and result["peak_rss_mb"] >= RSS_LIMIT_MB
            for path in folder.iterdir():  # free the disk before the next, larger corpus
                path.unlink()
    if failed:
        sys.exit(f"peak RSS reached {RSS_LIMIT_MB} MB on a 1 GB corpus: the store build is not memory-flat")


if __name__ == "__main__":
    main()
