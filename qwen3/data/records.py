"""The records of a data file, each with where it stands, for messages that name the line.

Text sources (sources.py) and conversations (conversations.py) are both read from files of
records: JSON Lines (one JSON value a line, "FILE, line N"), a JSON array ("FILE, item N": a .json
file whose text starts with "[", read whole), or the rows of a Parquet file ("FILE, row N", one row
group at a time). Text that is not UTF-8 or not JSON, and a file Parquet cannot read, is a
UserError naming the file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qwen3.errors import UserError


def read_records(path: Path, columns: list[str] | None = None) -> Iterator[tuple[Any, str]]:
    """(record, where) for every record of `path`; of a Parquet file, its rows as dicts of
    `columns` (all when None)."""
    if path.suffix.lower() == ".parquet":
        yield from _parquet_rows(path, columns)
        return
    with open(path, "rb") as handle:
        first = handle.read(4096).lstrip()[:1]
    if path.suffix.lower() == ".json" and first == b"[":
        yield from _array_items(path)
        return
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield json.loads(raw.decode("utf-8")), f"{path}, line {number}"
            except UnicodeDecodeError as error:
                raise UserError(f"{path}, line {number}: invalid UTF-8 ({error.reason})") from None
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {number}: invalid JSON ({error.msg})") from None


def _array_items(path: Path) -> Iterator[tuple[Any, str]]:
    try:
        items = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: invalid UTF-8 at byte {error.start} ({error.reason})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}, line {error.lineno}: invalid JSON ({error.msg})") from None
    yield from ((item, f"{path}, item {number}") for number, item in enumerate(items, start=1))


def open_parquet(path: Path) -> Any:
    """A pyarrow ParquetFile (its schema is read, its rows not yet)."""
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise UserError(f"{path}: not a readable Parquet file ({error})") from None


def _parquet_rows(path: Path, columns: list[str] | None) -> Iterator[tuple[Any, str]]:
    parquet = open_parquet(path)
    number = 0
    for group in range(parquet.num_row_groups):
        for row in parquet.read_row_group(group, columns=columns).to_pylist():
            number += 1
            yield row, f"{path}, row {number}"
