"""Chat data for fine-tuning: conversations in the formats people have -> token ids + a loss mask.

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   OpenAI style
    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}       ShareGPT style
    {"prompt": "...", "completion": "..."}                                          a single exchange

one record per line of a .jsonl file, an array of them in a .json file, or the rows of a .parquet
file (a `messages`, `conversations` or `prompt`/`completion` column). Every conversation becomes
one list of {"role", "content"} messages; a record that cannot (no assistant turn, an unknown role,
an empty message, a line that is not JSON) is a UserError naming the file and line.

`render` writes a conversation with the checkpoint's own chat template and marks the tokens the
model learns: every token of each assistant reply and the end-of-turn token that closes it (so the
model learns to stop), nothing of the system and user turns nor the template's role headers. A
reply's span starts where the conversation so far, rendered with the generation prompt, stops
agreeing with the whole conversation, which holds for any template that renders prefixes of a
conversation as prefixes; the tokens are the whole text's, so the mask costs no re-tokenization.
`pack` fills rows of seq_len + 1 tokens with whole conversations, the mask carried along
(`render_and_pack` does both); `held_out` holds out conversations by a hash of their content.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen3.data.records import read_records
from qwen3.data.tokenizer import IM_END, Tokenizer
from qwen3.errors import UserError

Messages = list[dict[str, str]]
ROLES = {"system": "system", "user": "user", "assistant": "assistant",  # OpenAI
         "human": "user", "gpt": "assistant"}                            # ShareGPT
FORMATS = "a 'messages' list, a 'conversations' list (ShareGPT) or 'prompt' and 'completion'"


@dataclass(frozen=True)
class Rendered:
    """One conversation as the model sees it: token ids and, per token, whether it carries loss."""

    ids: list[int]
    learned: list[bool]
    reply_bytes: int  # UTF-8 bytes of the learned text, for bits per byte


def read_conversations(path: str | Path) -> list[Messages]:
    """The conversations of a .jsonl, .json or .parquet file, checked and in the OpenAI shape."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return [to_messages(record, where) for record, where in read_records(path)]


def to_messages(record: Any, where: str) -> Messages:
    """One record in any of the formats as [{"role", "content"}, ...], or a UserError saying `where`."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with {FORMATS}, got {type(record).__name__}")
    if record.get("messages") is not None:
        turns = [_turn(turn, "role", "content", where) for turn in _turn_list(record["messages"], "messages", where)]
    elif record.get("conversations") is not None:
        turns = [_turn(turn, "from", "value", where)
                 for turn in _turn_list(record["conversations"], "conversations", where)]
    elif "prompt" in record and "completion" in record:
        turns = [("user", record["prompt"]), ("assistant", record["completion"])]
    else:
        fields = ", ".join(map(repr, list(record)[:10])) or "none"
        raise UserError(f"{where}: no conversation found (fields: {fields}); expected {FORMATS}")
    messages = []
    for number, (role, content) in enumerate(turns, start=1):
        if role not in ROLES:
            raise UserError(f"{where}: message {number} has the unknown role {role!r} "
                            f"(known: {', '.join(ROLES)})")
        if not isinstance(content, str) or not content.strip():
            raise UserError(f"{where}: message {number} ({role}) is empty")
        messages.append({"role": ROLES[role], "content": content})
    if not any(message["role"] == "assistant" for message in messages):
        raise UserError(f"{where}: the conversation has no assistant turn, so nothing to learn")
    return messages


def _turn_list(turns: Any, name: str, where: str) -> list[Any]:
    if not isinstance(turns, list):
        raise UserError(f"{where}: {name!r} is a {type(turns).__name__}, not a list of messages")
    return turns


def _turn(turn: Any, role_key: str, content_key: str, where: str) -> tuple[Any, Any]:
    if not isinstance(turn, dict) or role_key not in turn:
        raise UserError(f"{where}: a message is not an object with {role_key!r} and {content_key!r}")
    return turn[role_key], turn.get(content_key)


def end_of_turn(tokenizer: Tokenizer) -> str:
    """The token that closes a turn: <|im_end|> where the vocabulary has it, else end-of-text."""
    return IM_END if tokenizer.token_to_id(IM_END) is not None else tokenizer.eos_token


def render(tokenizer: Tokenizer, messages: Messages) -> Rendered:
    """The token ids of `messages` in the chat template, and which of them the model learns."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    closing = end_of_turn(tokenizer)
    spans = []  # character ranges [start, end) of each reply and its end-of-turn token
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True)
        start = len(os.path.commonprefix([prompt, text]))
        content = text.find(message["content"], start)
        closed = text.find(closing, content + len(message["content"])) if content >= 0 else -1
        if closed < 0:
            raise UserError(f"the chat template does not render assistant message {index + 1} followed "
                            f"by {closing}: cannot tell which tokens to learn")
        spans.append((start, closed + len(closing)))
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    learned = [any(start <= first < end for start, end in spans) for first, _ in encoding.offsets]
    reply_bytes = sum(len(text[start:end].encode("utf-8")) for start, end in spans)
    return Rendered(encoding.ids, learned, reply_bytes)


@dataclass
class Packed:
    """Conversations packed into rows of seq_len + 1 tokens: x = rows[:, :-1], y = rows[:, 1:]."""

    rows: np.ndarray     # (N, seq_len + 1) token ids; the tail of a row is padding
    learned: np.ndarray  # (N, seq_len + 1) bool: the token is a target the loss counts
    conversations: int   # packed
    too_long: int        # dropped: longer than a row
    reply_bytes: int     # UTF-8 bytes of the learned text of the packed conversations

    def targets(self) -> np.ndarray:
        """y of every row: the next token where it is learned, else -100 (no loss)."""
        return np.where(self.learned[:, 1:], self.rows[:, 1:], -100)


def pack(conversations: list[Rendered], row_tokens: int, pad_id: int) -> Packed:
    """Whole conversations, in order, into rows of `row_tokens`, each starting a new row when the
    next one does not fit. A conversation longer than a row is dropped (a cut one would teach a
    reply without its end) and counted."""
    rows: list[tuple[list[int], list[bool]]] = []
    ids: list[int] = []
    learned: list[bool] = []
    too_long = packed = reply_bytes = 0
    for conversation in conversations:
        if len(conversation.ids) > row_tokens:
            too_long += 1
            continue
        if len(ids) + len(conversation.ids) > row_tokens:
            rows.append((ids, learned))
            ids, learned = [], []
        ids += conversation.ids
        learned += conversation.learned
        packed += 1
        reply_bytes += conversation.reply_bytes
    if ids:
        rows.append((ids, learned))
    tokens = np.full((len(rows), row_tokens), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), row_tokens), dtype=bool)
    for row, (row_ids, row_learned) in enumerate(rows):
        tokens[row, :len(row_ids)] = row_ids
        mask[row, :len(row_learned)] = row_learned
    return Packed(tokens, mask, packed, too_long, reply_bytes)


def render_and_pack(tokenizer: Tokenizer, conversations: list[Messages], row_tokens: int) -> Packed:
    """`render` each conversation and `pack` them into rows of `row_tokens`, a row's tail padded with
    the tokenizer's pad token (else its end-of-text token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pack([render(tokenizer, messages) for messages in conversations], row_tokens, pad)


def held_out(messages: Messages, val_fraction: float) -> bool:
    """Whether a conversation belongs to the held-out split: a hash of its content, so equal
    conversations always land on the same side and the split does not depend on the file order."""
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction
