"""Prompts for reinforcement learning and preference pairs for DPO, read from the files people have.

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ..., {"role": "user", ...}],
     "answer": ..., any other field}                                             a prompt (`qwen3 rl`)
    {"prompt": "..." | [messages], "chosen": "..." | [assistant message],
     "rejected": "..." | [assistant message]}                                    a pair (`qwen3 dpo`)

one record per line of a .jsonl file, an array of them in a .json file, or the rows of a .parquet
file (data/records.py). A prompt's conversation ends with the user's turn the model answers; the
other fields of its record go to the reward. Pairs are TRL's preference format: text, which becomes
a user turn and assistant replies, or conversational messages; without "prompt" (TRL's implicit
prompt) the two conversations' common first messages are the prompt. A record that is not one of
these (no user turn, an empty side, a role that is not known) is a UserError naming the file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwen3.data.conversations import Messages
from qwen3.data.records import read_records
from qwen3.errors import UserError

PROMPT_ROLES = ("system", "user", "assistant")


def checked_messages(value: Any, field: str, where: str) -> Messages:
    """A list of {"role", "content"} messages with known roles and non-empty text, or a UserError."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: {field!r} must be a non-empty list of messages")
    messages = []
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict) or message.get("role") not in PROMPT_ROLES:
            raise UserError(f"{where}: {field} message {number} needs a role among {', '.join(PROMPT_ROLES)}")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise UserError(f"{where}: {field} message {number} ({message['role']}) is empty")
        messages.append({"role": message["role"], "content": content})
    return messages


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The prompt records of a file, each with checked `messages` ending with a user turn."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    records = []
    for record, where in read_records(path):
        if not isinstance(record, dict) or "messages" not in record:
            raise UserError(f"{where}: expected a JSON object with a 'messages' list ending with a user turn")
        messages = checked_messages(record["messages"], "messages", where)
        if messages[-1]["role"] != "user":
            raise UserError(f"{where}: the messages end with a {messages[-1]['role']} turn; a prompt ends with "
                            f"the user's turn the model answers")
        records.append({**record, "messages": messages})
    if not records:
        raise UserError(f"{path}: no prompts in it")
    return records


def pair_side(value: Any, field: str, where: str) -> Messages:
    """One side of a pair as messages: text is a single message of the side's role."""
    role = "user" if field == "prompt" else "assistant"
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: {field!r} is empty")
        return [{"role": role, "content": value}]
    return checked_messages(value, field, where)


def read_pairs(path: str | Path) -> list[dict[str, Messages]]:
    """The preference pairs of a file as {"prompt", "chosen", "rejected"} message lists, the prompt
    ending with a user turn and each reply one assistant message."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    pairs = []
    for record, where in read_records(path):
        if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
            raise UserError(f"{where}: expected a JSON object with 'chosen' and 'rejected' (and a 'prompt')")
        chosen = pair_side(record["chosen"], "chosen", where)
        rejected = pair_side(record["rejected"], "rejected", where)
        if record.get("prompt") is not None:
            prompt = pair_side(record["prompt"], "prompt", where)
        else:  # the implicit prompt: what the two conversations share
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt or prompt[-1]["role"] != "user":
            raise UserError(f"{where}: the prompt must end with a user turn")
        for side, messages in (("chosen", chosen), ("rejected", rejected)):
            if len(messages) != 1 or messages[0]["role"] != "assistant":
                raise UserError(f"{where}: {side!r} must be one assistant reply")
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if not pairs:
        raise UserError(f"{path}: no pairs in it")
    return pairs
