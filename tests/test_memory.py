"""Memory of `prepare`: the store build stays flat in the corpus, tokenizer training in the cores.

Each store is built in a fresh process whose own high-water mark (VmHWM, which unlike the rusage
figure does not start from the parent's) is compared; bench/data_bench.py measures the same at
100 MB to 2 GB.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qwen3.data.tokenizer import train_tokenizer

# The child reads VmHWM itself: qwen3.runtime.peak_rss_mb would import torch, which dwarfs the build.
BUILD_STORE = """
import sys
import qwen3.data.store
qwen3.data.store.BATCH_BYTES = 2**18  # fills the pipeline (prefetched batches) within the smaller corpus
from qwen3.data.store import prepare
prepare([sys.argv[1]], tokenizer=sys.argv[2], cache_dir=sys.argv[3], progress=False)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""
LETTERS = ["etaoinshrdlucmfwy", "éèàçñüöß", "αβγδεζηθλμπρστω", "абвгдежзиклмнопрст", "的一是不了人我在有"]


def words(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` random words of 1-9 letters, each from one of LETTERS (a vocabulary without repeats)."""
    alphabets = [np.array(list(letters)) for letters in LETTERS]
    return np.array(["".join(rng.choice(alphabets[rng.integers(len(alphabets))], size=rng.integers(1, 10)))
                     for _ in range(count)])


def text(rng: np.random.Generator, vocabulary: np.ndarray, count: int, newlines: bool = True) -> str:
    """`count` Zipf-distributed words; a newline every ~12 words, or none."""
    picks = vocabulary[np.minimum(rng.zipf(1.2, size=count), len(vocabulary)) - 1]
    if not newlines:
        return " ".join(picks)
    return "".join(word + ("\n" if index % 12 == 11 else " ") for index, word in enumerate(picks))


def write_corpus(folder, rng, vocabulary, documents: int, single_line_words: int = 0) -> None:
    """JSON Lines documents of 20-2000 words, and optionally one single-line .txt document."""
    folder.mkdir()
    with open(folder / "records.jsonl", "w", encoding="utf-8") as handle:
        for _ in range(documents):
            size = int(np.exp(rng.uniform(np.log(20), np.log(2000))))
            handle.write(json.dumps({"text": text(rng, vocabulary, size)}, ensure_ascii=False) + "\n")
    if single_line_words:
        (folder / "line.txt").write_text(text(rng, vocabulary, single_line_words, newlines=False), encoding="utf-8")


def build_peak_mb(corpus, tokenizer, cache) -> float:
    """Peak RSS of a fresh process that builds the store of `corpus`, encoding on two threads (each
    encoding thread keeps several MB of caches, which a larger corpus would fill on more cores)."""
    result = subprocess.run([sys.executable, "-c", BUILD_STORE, str(corpus), str(tokenizer), str(cache)],
                            capture_output=True, text=True, check=True, env={**os.environ, "RAYON_NUM_THREADS": "2"})
    return int(result.stdout.split()[-1]) / 1024


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_store_build_memory_does_not_grow_with_documents_or_the_longest_one(tmp_path) -> None:
    """Twice the documents and a 3 MB single line add little to the peak of a 2 MB build.

    Tokenizing that line whole adds ~240 MB, and memory growing by more than ~6 MB per MB of text
    would add over 40 MB; what the larger build adds now is the tokenizer's caches filling, ~11 MB.
    bench/data_bench.py measures the slope from 100 MB to 2 GB."""
    rng = np.random.default_rng(0)
    vocabulary = words(rng, 20_000)
    write_corpus(tmp_path / "small", rng, vocabulary, documents=300)
    write_corpus(tmp_path / "large", rng, vocabulary, documents=600, single_line_words=250_000)
    train_tokenizer([text(rng, vocabulary, 100_000)], vocab_size=1024).save_pretrained(tmp_path / "tokenizer")
    small = build_peak_mb(tmp_path / "small", tmp_path / "tokenizer", tmp_path / "cache")
    large = build_peak_mb(tmp_path / "large", tmp_path / "tokenizer", tmp_path / "cache")
    assert large - small < 40, f"peak RSS {small:.0f} MB building 2 MB of text, {large:.0f} MB building 7 MB"


def test_tokenizer_trains_on_one_thread_and_restores_the_setting(monkeypatch) -> None:
    """BPE training's pair counting holds a pair map per thread, so its peak grew with the cores
    (367 MB on one, 566 MB on 16 in bench/data_bench.py); it runs on one thread."""
    seen = []

    def texts():
        for _ in range(3):
            seen.append(os.environ.get("TOKENIZERS_PARALLELISM"))
            yield "the earth was without form, and void; and darkness was upon the face of the deep."

    for setting in (None, "true"):
        if setting is None:
            monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
        else:
            monkeypatch.setenv("TOKENIZERS_PARALLELISM", setting)
        seen.clear()
        train_tokenizer(texts(), vocab_size=300)
        assert seen == ["false"] * 3
        assert os.environ.get("TOKENIZERS_PARALLELISM") == setting
