"""`qwen3 prepare` memory and throughput on varied corpora from 100 MB to 2 GB.

Each corpus is generated (deterministically, in a temporary folder) to look like a real mixed dump
rather than a repeated pattern: a Zipf-distributed vocabulary of 400,000 distinct words (most Latin
ASCII, the rest accented Latin, Greek, Cyrillic, CJK and emoji), documents whose lengths spread
log-uniformly from 200 bytes to 300 KB in JSON Lines files, and a multi-megabyte single document
(3-24 MB: paragraphs, lines that start outside ASCII, or one line with no newline at all) for every
~70 MB of text. The folder is read as one source, so `.jsonl` lines and `.txt` files are documents;
the files are named in the order they were written, so the single documents come between the JSON
Lines files and the first one falls inside the 64 MB the tokenizer is trained on.

Each size runs the real command, `python -m qwen3 prepare --data FOLDER --vocab-size N`, in a fresh
child process; its peak RSS (the kernel's high-water mark, from `os.wait4`) is the figure. The slope
of peak RSS against corpus size (least squares, MB of RSS per GB of text) says whether memory is flat.
A child's high-water mark starts at that of the process that started it (exec keeps it), so the
corpora are written by a process of their own (writing 1 GB takes ~550 MB) and the bench checks that
its own peak stays below every figure it reports.

    .venv/bin/python bench/data_bench.py [--sizes 100,500,1000,2000] [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RSS_LIMIT_MB = 600
SLOPE_LIMIT_MB_PER_GB = 20
VOCABULARY = 400_000
JSONL_FILE_BYTES = 64 * 2**20
BIG_DOCUMENT_EVERY = 70 * 2**20
# Letters of the scripts words are drawn from, and the share of words in each.
SCRIPTS = [
    ("etaoinshrdlcumwfgypbvkjxqz", 0.70),
    ("aeiouéèêëàâäîïôöùûüçñßøå" + "rstlnmdcpv", 0.12),
    ("αβγδεζηθικλμνξοπρστυφχψω", 0.06),
    ("абвгдежзийклмнопрстуфхцчшщыэюя", 0.08),
    ("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手", 0.03),
    ("😀😂🙂🚀🌍🎉🔥💡📚🧪", 0.01),
]


def vocabulary(rng: np.random.Generator) -> np.ndarray:
    """VOCABULARY distinct words in the mix of SCRIPTS: 1-12 letters (1-4 for CJK and emoji)."""
    words: set[str] = set()
    for letters, share in SCRIPTS:
        alphabet = np.array(list(letters))
        longest = 4 if ord(letters[0]) > 0x2000 else 12
        wanted = len(words) + int(share * VOCABULARY)
        while len(words) < wanted:
            lengths = rng.integers(1, longest + 1, size=wanted - len(words))
            picks = alphabet[rng.integers(0, len(alphabet), size=int(lengths.sum()))]
            words.update(map("".join, np.split(picks, np.cumsum(lengths)[:-1])))
    ordered = np.array(sorted(words), dtype=object)
    rng.shuffle(ordered)  # Zipf rank independent of script and length
    return ordered


class TextMaker:
    """Sentences of Zipf-distributed words (exponent 1.1 over the whole vocabulary)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.words = vocabulary(self.rng)
        weights = 1 / np.arange(1, len(self.words) + 1) ** 1.1
        self.cumulative = np.cumsum(weights) / weights.sum()

    def text(self, size: int, line_start: str = "", newlines: bool = True) -> str:
        """About `size` characters: sentences of 5-25 words, lines of 1-4 sentences, paragraphs of
        1-6 lines; `line_start` begins every line; without newlines, one long line."""
        count = max(1, size // 7)
        picks = self.words[np.searchsorted(self.cumulative, self.rng.random(count))]
        ends = np.cumsum(self.rng.integers(5, 26, size=count // 5 + 1))
        sentences = [" ".join(picks[start:end]) for start, end in zip(np.r_[0, ends[:-1]], ends) if start < count]
        if not newlines:
            return ". ".join(sentences) + "."
        parts = []
        for index, sentence in enumerate(sentences):
            parts.append(sentence + ".")
            roll = self.rng.random()
            parts.append(" " if roll < 0.6 else f"\n{line_start}" if roll < 0.9 else f"\n\n{line_start}")
        return line_start + "".join(parts)


def write_corpus(folder: Path, size_mb: int, seed: int = 0) -> int:
    """Write about `size_mb` MB of JSON Lines files and multi-megabyte single .txt documents."""
    maker = TextMaker(seed)
    folder.mkdir(parents=True)
    target = size_mb * 2**20
    written = big = files = 0
    next_big = BIG_DOCUMENT_EVERY // 2
    while written < target:
        files += 1
        if written >= next_big:
            size = int(maker.rng.integers(3, 25)) * 2**20
            kind = big % 3  # paragraphs / lines starting outside ASCII / a single line
            text = maker.text(size, line_start="— " if kind == 1 else "", newlines=kind != 2)
            data = text.encode("utf-8")
            (folder / f"{files:04d}-single.txt").write_bytes(data)
            written += len(data)
            big += 1
            next_big += BIG_DOCUMENT_EVERY
            continue
        with open(folder / f"{files:04d}-records.jsonl", "wb") as handle:
            file_written = 0
            while file_written < JSONL_FILE_BYTES and written + file_written < min(target, next_big):
                size = int(np.exp(maker.rng.uniform(np.log(200), np.log(300_000))))
                line = (json.dumps({"text": maker.text(size)}, ensure_ascii=False) + "\n").encode("utf-8")
                handle.write(line)
                file_written += len(line)
        written += file_written
    return written


def write_corpus_in_child(folder: Path, size_mb: int) -> int:
    """`write_corpus` in a fresh process, so this one stays small (see the module docstring)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(write_corpus, (folder, size_mb))


def own_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare_child(folder: Path, work: Path, vocab_size: int) -> dict[str, float]:
    """Run `qwen3 prepare` on `folder` in a child; its peak RSS and the time of each phase."""
    command = [sys.executable, "-m", "qwen3", "prepare", "--data", str(folder), "--vocab-size", str(vocab_size)]
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=work, env=environment, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    marks = {}
    log = []
    for line in child.stderr:  # the log lines mark the phases (the progress bar redraws with \r)
        log.append(line)
        if line.startswith("building"):
            marks["store"] = time.perf_counter()
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    end = time.perf_counter()
    if status != 0:
        sys.exit(f"qwen3 prepare failed on {folder}:\n{''.join(log)[-3000:]}")
    tokens = next(line for line in output.splitlines() if line.startswith("tokens:"))
    return {"tokenizer_s": marks["store"] - start, "store_s": end - marks["store"],
            "peak_rss_mb": usage.ru_maxrss / 1024, "tokens": int(tokens.split()[1].replace(",", ""))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,500,1000,2000", help="corpus sizes in MB, comma separated")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    print(f"cpu cores: {os.cpu_count()} (shared with whatever else runs); vocabulary {args.vocab_size}")
    print(f"{'corpus':>8} {'MB written':>10} {'tokens':>12} {'tokenizer s':>12} {'store s':>8} "
          f"{'store MB/s':>10} {'peak RSS MB':>12}", flush=True)
    peaks = []
    with tempfile.TemporaryDirectory(prefix="qwen3-data-bench-") as work:
        for size_mb in sizes:
            folder = Path(work) / f"corpus-{size_mb}mb"
            written = write_corpus_in_child(folder, size_mb)
            result = prepare_child(folder, Path(work), args.vocab_size)
            peaks.append(result["peak_rss_mb"])
            print(f"{size_mb:>6}MB {written / 2**20:>10.0f} {result['tokens']:>12,} {result['tokenizer_s']:>12.1f} "
                  f"{result['store_s']:>8.1f} {written / 2**20 / result['store_s']:>10.2f} "
                  f"{result['peak_rss_mb']:>12.0f}", flush=True)
            shutil.rmtree(folder)  # free the disk before the next, larger corpus
            shutil.rmtree(Path(work) / ".cache")
    print(f"peak RSS of the bench process itself: {own_peak_rss_mb():.0f} MB")
    if own_peak_rss_mb() >= min(peaks):
        sys.exit("the bench process grew as large as a child: the figures above may be its own memory")
    if len(sizes) > 1:
        slope = np.polyfit(np.array(sizes) / 1024, peaks, 1)[0]
        print(f"peak RSS slope: {slope:+.1f} MB per GB of text (from {sizes[0]} MB to {sizes[-1]} MB)")
        if slope >= SLOPE_LIMIT_MB_PER_GB:
            sys.exit(f"peak RSS grows {slope:.1f} MB per GB: the build is not memory-flat")
    if max(peaks) >= RSS_LIMIT_MB:
        sys.exit(f"peak RSS reached {max(peaks):.0f} MB, over the {RSS_LIMIT_MB} MB bound")


if __name__ == "__main__":
    main()
