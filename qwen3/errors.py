"""How the project speaks to its user: mistakes they can fix, and progress messages.

A `UserError` is a mistake a user can fix (a bad path, value or file): the command line prints its
message alone and exits non-zero; anything else is a bug and keeps its traceback. Progress and log
lines go to stderr, so that commands such as `qwen3 generate` keep stdout for their output. Nothing
here imports torch: `qwen3 prepare` runs without it.
"""

import sys


class UserError(Exception):
    """An error caused by the user's input; its message says what is wrong and where."""


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
