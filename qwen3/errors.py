"""How the project speaks to its user: mistakes they can fix, and lines that say what it is doing.

A `UserError` is a mistake a user can fix (a bad path, value or file): the command line prints its
message alone and exits non-zero; anything else is a bug and keeps its traceback. `read_json_object`
reads the JSON files a user may hand over (config.json, tokenizer_config.json, run.json) so.

Everything else the project says goes through one logger, `qwen3` (Python's logging, so a program
that imports the package can quiet it with `logging.getLogger("qwen3").setLevel(...)`): `log` for a
progress line, `logger.warning` and `logger.exception` where something went wrong. The lines go to
stderr, written above any progress bar (tqdm.write), so commands such as `qwen3 generate` keep
stdout for their output; under torchrun only rank 0 logs progress (every rank its warnings).
Nothing here imports torch: `qwen3 prepare` runs without it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


class UserError(Exception):
    """An error caused by the user's input; its message says what is wrong and where."""


def read_json_object(file: Path, error: type[UserError] = UserError) -> dict[str, Any]:
    """The JSON object in `file`; an `error` naming the file when it is missing, not JSON or not an object."""
    if not file.is_file():
        raise error(f"{file}: missing")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{file}: not valid JSON ({problem})") from None
    if not isinstance(data, dict):
        raise error(f"{file}: expected a JSON object")
    return data


class ProgressHandler(logging.Handler):
    """Writes each record's message to stderr above any tqdm progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's contract: a handler reports its own failure, never raises
            self.handleError(record)


def main_process_or_warning(record: logging.LogRecord) -> bool:
    """Progress from rank 0 alone (RANK is torchrun's), warnings and errors from every process."""
    return record.levelno >= logging.WARNING or os.environ.get("RANK", "0") == "0"


logger = logging.getLogger("qwen3")
logger.setLevel(logging.INFO)
logger.propagate = False
if not logger.handlers:
    handler = ProgressHandler()
    handler.addFilter(main_process_or_warning)
    logger.addHandler(handler)


def log(message: str) -> None:
    """Say what the project is doing: one line on stderr (rank 0 only under torchrun)."""
    logger.info(message)
