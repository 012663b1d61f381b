"""Verifiable rewards for reinforcement learning: what `qwen3 rl --reward` names.

A reward is `reward(completion: str, record: dict) -> float`: the reply's text (without its
end-of-turn token; a thinking model's <think>...</think> included, `answer_text` strips it) and
the prompt's JSONL record, whose other fields (an `answer`, test cases, ...) say what is right.
`--reward NAME` is a built-in one; `--reward MODULE:FUNCTION` a function of the user's on the import
path, imported before any work so that a missing module or name stops the run at once. A reward
that raises, or returns anything but a finite number, stops the run with one line naming the
prompt and what came back (`score`), never a traceback from the user's module. A reward of 1 or more
counts as a pass (the built-ins give 1 for a right answer, 0 otherwise).

    book   the embedded task: the reply is the book's name (record["answer"]), nothing else
    math   the last number of the reply, or the content of its last \\boxed{...}, equals
           record["answer"] as a number (1,234 and 1234.0 are 1234)
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from typing import Any

from qwen3.errors import UserError

Reward = Callable[[str, dict[str, Any]], float]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def answer_text(completion: str) -> str:
    """The reply without its thinking: what follows the last </think>, stripped."""
    return completion.rpartition("</think>")[2].strip()


def book_reward(completion: str, record: dict[str, Any]) -> float:
    return float(answer_text(completion) == record["answer"])


def to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def math_reward(completion: str, record: dict[str, Any]) -> float:
    reply = answer_text(completion)
    boxed = BOXED.findall(reply)
    numbers = NUMBER.findall(boxed[-1] if boxed else reply)
    given = to_number(numbers[-1]) if numbers else None
    expected = to_number(str(record["answer"]))
    return float(given is not None and expected is not None and math.isclose(given, expected, rel_tol=1e-9,
                                                                             abs_tol=1e-9))


BUILT_IN: dict[str, tuple[Reward, str]] = {
    "book": (book_reward, "the embedded task: the reply is exactly the book's name"),
    "math": (math_reward, "the last number or \\boxed{} of the reply equals the record's answer"),
}


def load_reward(spec: str) -> Reward:
    """A built-in reward by name, or `MODULE:FUNCTION` imported now; a UserError says what is wrong."""
    if spec in BUILT_IN:
        return BUILT_IN[spec][0]
    module_name, colon, function_name = spec.partition(":")
    if not colon or not module_name or not function_name:
        raise UserError(f"--reward {spec!r}: name a built-in reward ({', '.join(BUILT_IN)}) or a function as "
                        f"MODULE:FUNCTION")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module: any error while importing it is theirs to fix
        raise UserError(f"--reward {spec}: cannot import {module_name} ({type(error).__name__}: {error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"--reward {spec}: {module_name} has no function {function_name}")
    return function


def score(reward: Reward, completion: str, record: dict[str, Any], where: str) -> float:
    """`reward(completion, record)` as a float; a UserError naming the prompt (`where`) when the
    reward raises or returns anything but a finite number."""
    try:
        value = reward(completion, record)
    except Exception as error:  # the user's function: its failure is reported, not propagated
        raise UserError(f"the reward raised {type(error).__name__}: {error} on {where}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):  # a bool is 0 or 1
        raise UserError(f"the reward returned {value!r} on {where}: it must return a finite number")
    return float(value)
