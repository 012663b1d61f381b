"""The token store: text sources tokenized once into cached, memory-mapped token arrays.

The seed pickled a few thousand tokens and drew validation windows from the same overlapping windows
as training, so its validation numbers leaked. Here `prepare` turns the sources into a tokenizer
and two token arrays:

* the pieces of text the sources yield (qwen3/data/sources.py) are tokenized in batches on all cores and
  appended to two flat binary files (train.bin, val.bin; uint16 while the vocabulary fits, else
  uint32) read back with np.memmap, so memory stays flat however large the corpus is;
* the split is by document: document i goes to validation when it is one of the evenly spaced
  round(n * val_fraction) documents, so no token of a validation document is ever trained on. A
  corpus of too few documents for that (one text file is one document) is split by paragraph when
  it has enough of them, else its last val_fraction of text is held out, cut at a line start into
  a training and a validation document (`choose_split`; meta.json records which, and says why);
* the store is cached under a key of the sources (path, size, mtime), the tokenizer's content,
  val_fraction and the format version, which fix the split too; it is built in a temporary folder
  and renamed only when complete.

Training and evaluation cut the arrays into windows (qwen3/data/windows.py).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from qwen3.allocator import release_freed_memory
from qwen3.atomic import atomic_directory
from qwen3.data.sources import BUILTIN_KJV, Source, iter_pieces, parse_source
from qwen3.data.split import choose_split
from qwen3.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from qwen3.errors import UserError, log

# Bump when the store's layout or the way documents are read or split changes: old caches are then
# ignored. 3: a corpus of too few documents is split by paragraph or its tail (`choose_split`).
STORE_FORMAT_VERSION = 3
TOKENIZER_FORMAT_VERSION = 4  # 3: the chat template with thinking and tool calls; 4: <think> in content
# The tokenizer is trained on the first this-many bytes of text, so training it stays memory-flat
# and bounded in time on a corpus of any size (more text changes the merges of a small vocabulary little).
TOKENIZER_SAMPLE_BYTES = 64 * 2**20
# Text handed to one encode_batch call: 16 pieces, enough to keep the cores busy, while the Encoding
# objects and id lists of one batch (~150 bytes per token) stay tens of MB.
BATCH_BYTES = 2**20


@dataclass
class PreparedData:
    """A tokenizer and the train/validation token arrays built from the sources, with their counts."""

    tokenizer: Tokenizer
    tokenizer_path: Path          # a folder with tokenizer.json and tokenizer_config.json
    train_tokens: np.ndarray      # 1-D memmap, documents separated by the eos id
    val_tokens: np.ndarray
    train_bytes: int              # UTF-8 bytes of the documents in each split, for bits per byte
    val_bytes: int
    train_documents: int
    val_documents: int
    store_dir: Path
    split: str                    # how validation was held out, and why (meta.json's split_description)
    sources: list[str]            # the --data arguments, as given
    reused: bool                  # the store came from the cache
    tokenizer_trained: bool       # the tokenizer was trained now (not given, not from the cache)

    @property
    def documents(self) -> int:
        return self.train_documents + self.val_documents

    @property
    def bytes(self) -> int:
        return self.train_bytes + self.val_bytes

    @property
    def tokens(self) -> int:
        """Tokens in both splits, the end-of-text id after each document included."""
        return len(self.train_tokens) + len(self.val_tokens)

    @property
    def eval_tokens(self) -> int:
        """Tokens one evaluation passes through the model: the whole validation split."""
        return len(self.val_tokens)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens - self.documents, 1)  # text tokens only, no separators

    @property
    def summary(self) -> dict[str, Any]:
        """The counts and paths as a JSON-ready dict: what run.json records of the data."""
        return {
            "sources": self.sources, "documents": self.documents, "bytes": self.bytes, "tokens": self.tokens,
            "bytes_per_token": self.bytes_per_token,
            "train_documents": self.train_documents, "val_documents": self.val_documents,
            "train_tokens": len(self.train_tokens), "val_tokens": len(self.val_tokens),
            "train_bytes": self.train_bytes, "val_bytes": self.val_bytes, "split": self.split,
            "vocab_size": self.tokenizer.vocab_size, "dtype": self.train_tokens.dtype.name,
            "cache_dir": str(self.store_dir), "tokenizer_path": str(self.tokenizer_path),
            "reused": self.reused, "tokenizer_trained": self.tokenizer_trained,
        }


def prepare(sources: list[str], tokenizer: str = "", vocab_size: int = 8192, val_fraction: float = 0.1,
            cache_dir: str | Path = ".cache/qwen3", min_tokens: int = 0, progress: bool = True) -> PreparedData:
    """Build (or reuse) the tokenizer and the token store for `sources` (default: the embedded KJV).

    `tokenizer` is a tokenizer.json or model folder to use; empty trains a `vocab_size` BPE on the
    sources (cached too). `min_tokens` is the fewest tokens each split must hold (the trainer passes
    seq_len + 1); a split with fewer is a UserError. `val_fraction` is in (0, 1), as TrainConfig
    checks. Progress goes to stderr.
    """
    parsed = [parse_source(spec) for spec in sources or [BUILTIN_KJV]]
    names = ", ".join(source.spec for source in parsed)
    fingerprint = [source.fingerprint() for source in parsed]
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)

    if tokenizer:
        tok = load_tokenizer(tokenizer)
        tokenizer_trained = False
    else:
        trained_path, tokenizer_trained = _cached_tokenizer(parsed, fingerprint, vocab_size, cache)
        tok = load_tokenizer(trained_path)

    tokenizer_hash = hashlib.sha256(tok.backend.to_str().encode("utf-8")).hexdigest()
    key = _hash([STORE_FORMAT_VERSION, fingerprint, tokenizer_hash, tok.eos_token, val_fraction])
    store_dir = cache / f"store-{key}"
    reused = (store_dir / "meta.json").is_file()
    if reused:
        log(f"reusing the cached token store {store_dir}")
    else:
        log(f"building the token store for {names}")
        with atomic_directory(store_dir) as directory:
            _build_store(parsed, tok, directory, val_fraction, progress)
            tok.save_pretrained(directory / "tokenizer")  # the store is complete on its own
        release_freed_memory()
    # A model folder given as the tokenizer is used as it is; otherwise the store's copy.
    given_folder = bool(tokenizer) and Path(tokenizer).is_dir()
    tokenizer_path = Path(tokenizer).resolve() if given_folder else store_dir / "tokenizer"

    meta = json.loads((store_dir / "meta.json").read_text())
    if meta["split"] != "document":
        log(f"{names}: {meta['split_description']}")
    dtype = np.dtype(meta["dtype"])
    train_tokens = _open_tokens(store_dir / "train.bin", dtype)
    val_tokens = _open_tokens(store_dir / "val.bin", dtype)
    for split, tokens, documents in (("training", train_tokens, meta["train_documents"]),
                                     ("validation", val_tokens, meta["val_documents"])):
        if len(tokens) == 0:
            raise UserError(
                f"the {split} split of {names} is empty ({meta['split_description']}); add text")
        if len(tokens) < min_tokens:
            raise UserError(
                f"the {split} split of {names} has {len(tokens)} tokens ({documents} document(s)), "
                f"shorter than one window of {min_tokens}; add text or use a shorter sequence length")

    return PreparedData(tok, tokenizer_path, train_tokens, val_tokens, meta["train_bytes"], meta["val_bytes"],
                        meta["train_documents"], meta["val_documents"], store_dir, meta["split_description"],
                        [source.spec for source in parsed], reused, tokenizer_trained)


def _cached_tokenizer(sources: list[Source], fingerprint: list[Any], vocab_size: int,
                      cache: Path) -> tuple[Path, bool]:
    """The folder of a tokenizer trained on the sources, and whether it was trained now (not cached)."""
    key = _hash([TOKENIZER_FORMAT_VERSION, fingerprint, vocab_size, TOKENIZER_SAMPLE_BYTES])
    directory = cache / f"tokenizer-{key}"
    if (directory / "tokenizer.json").is_file():
        log(f"reusing the cached tokenizer {directory}")
        return directory, False
    log(f"training a {vocab_size}-token BPE tokenizer on the first "
        f"{TOKENIZER_SAMPLE_BYTES // 2**20} MB of text")
    with atomic_directory(directory) as temporary:
        sample = _sample(sources, TOKENIZER_SAMPLE_BYTES)
        first = next(sample, None)
        if first is None:
            raise UserError(f"no text found in {', '.join(source.spec for source in sources)}")
        train_tokenizer(itertools.chain([first], sample), vocab_size).save_pretrained(temporary)
    release_freed_memory()  # the trainer's word and pair counts, before tokenizing starts
    return directory, True


def _sample(sources: list[Source], budget: int) -> Iterator[str]:
    """Non-blank pieces of text from the start of the sources, up to about `budget` bytes."""
    for piece, _ in iter_pieces(sources):
        if piece.strip():
            yield piece
            budget -= len(piece)
            if budget <= 0:
                return


def _build_store(sources: list[Source], tokenizer: Tokenizer, directory: Path, val_fraction: float,
                 progress: bool) -> None:
    """Tokenize the sources into directory/{train,val}.bin and describe them in meta.json."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    holdout = choose_split(sources, val_fraction)
    eos = [tokenizer.eos_token_id]
    counts = {split: {"documents": 0, "tokens": 0, "bytes": 0} for split in ("train", "val")}
    with (tqdm(desc="tokenizing", unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
               disable=not progress, mininterval=0.5) as bar,
          open(directory / "train.bin", "wb") as train_file, open(directory / "val.bin", "wb") as val_file):
        files = {"train": train_file, "val": val_file}
        for batch in _prefetch(_batches(holdout.assign(sources, val_fraction))):
            encoded = tokenizer.encode_batch([text for text, _, _ in batch])
            lists: dict[str, list[list[int]]] = {"train": [], "val": []}
            for (text, split, ends), ids in zip(batch, encoded):
                size = len(text.encode("utf-8"))
                lists[split].append(ids)
                counts[split]["bytes"] += size
                counts[split]["tokens"] += len(ids)
                if ends:
                    lists[split].append(eos)
                    counts[split]["documents"] += 1
                    counts[split]["tokens"] += 1
                bar.update(size)
            for split, id_lists in lists.items():
                if id_lists:
                    np.fromiter(itertools.chain.from_iterable(id_lists), dtype=dtype).tofile(files[split])
    documents = counts["train"]["documents"] + counts["val"]["documents"]
    if documents == 0:
        raise UserError(f"no text found in {', '.join(source.spec for source in sources)}")
    meta = {
        "format": STORE_FORMAT_VERSION, "dtype": np.dtype(dtype).name, "eos_token_id": eos[0],
        "sources": [source.spec for source in sources], "val_fraction": val_fraction,
        "split": holdout.mode,
        "split_description": holdout.describe(counts["val"]["documents"], documents, val_fraction),
        "documents": documents,
        "tokens": counts["train"]["tokens"] + counts["val"]["tokens"],
        "bytes": counts["train"]["bytes"] + counts["val"]["bytes"],
        **{f"{split}_{name}": value for split, split_counts in counts.items()
           for name, value in split_counts.items()},
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _batches(pieces: Iterable[tuple[str, str, bool]]) -> Iterator[list[tuple[str, str, bool]]]:
    """Group (text, split, ends_document) pieces into batches of about BATCH_BYTES."""
    batch: list[tuple[str, str, bool]] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run `items` in a background thread, `depth` ahead, so reading text overlaps tokenizing it
    (encode_batch releases the GIL). Exceptions from the reader are raised here."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put(item)
            slots.put(done)
        except BaseException as error:  # handed to the consumer, which raises it
            slots.put(error)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := slots.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def _open_tokens(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
