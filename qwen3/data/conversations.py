"""Chat data for fine-tuning: conversations in the formats people have -> token ids + a loss mask.

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...],
     "tools": [...]}                                                                OpenAI / TRL style
    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}       ShareGPT style
    {"prompt": "...", "completion": "..."}                                          a single exchange

one record per line of a .jsonl file, an array of them in a .json file, or the rows of a .parquet
file (a `messages`, `conversations` or `prompt`/`completion` column, and `tools`). Every record
becomes a `Conversation`: messages in OpenAI's shape, and the tools its system turn lists. An
assistant message may carry its reasoning (`reasoning_content`, or a `<think>...</think>` block at
the start of its content, which is moved there so each template renders it its own way) and
`tool_calls` (OpenAI's `{"function": {"name", "arguments"}}`; its content may then be empty or
null); a `tool` message answers them. A record that cannot be read (no assistant turn, an unknown
role, an empty message, a malformed tool call, a line that is not JSON) is a UserError naming the
file and line.

`render` writes a conversation with the checkpoint's own chat template and marks the tokens the
model learns: each assistant turn as the template renders it (its reasoning, content and tool calls)
and the end-of-turn token that closes it (so the model learns to stop); nothing of the system, user
and tool turns nor the template's role headers. Templates such as Qwen3's render a turn's reasoning
only after the last user message, so an earlier turn's text depends on what follows it; a turn is
therefore found in the whole rendered conversation itself, by the header that opens it (see
`render`), and the tokens are the whole text's, so the mask costs no re-tokenization. `pack` fills
rows of seq_len + 1 tokens with whole conversations, the mask carried along; `held_out` holds out
conversations by a hash of their content.
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

Messages = list[dict[str, Any]]
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",  # OpenAI
         "human": "user", "gpt": "assistant"}                                            # ShareGPT
FORMATS = "a 'messages' list, a 'conversations' list (ShareGPT) or 'prompt' and 'completion'"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Conversation:
    """One conversation: its messages and the tools (function schemas) the template lists for it."""

    messages: Messages
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Rendered:
    """One conversation as the model sees it: token ids and, per token, whether it carries loss."""

    ids: list[int]
    learned: list[bool]
    reply_bytes: int  # UTF-8 bytes of the learned text, for bits per byte


def read_conversations(path: str | Path) -> list[Conversation]:
    """The conversations of a .jsonl, .json or .parquet file, checked and in the OpenAI shape."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return [to_conversation(record, where) for record, where in read_records(path)]


def to_conversation(record: Any, where: str) -> Conversation:
    """One record in any of the formats, with its `tools` list when it has one."""
    messages = to_messages(record, where)
    return Conversation(messages, _tools(record.get("tools"), where))


def to_messages(record: Any, where: str) -> Messages:
    """One record in any of the formats as OpenAI messages, or a UserError saying `where`."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with {FORMATS}, got {type(record).__name__}")
    if record.get("messages") is not None:
        turns, role_key, content_key = _turn_list(record["messages"], "messages", where), "role", "content"
    elif record.get("conversations") is not None:
        turns, role_key, content_key = _turn_list(record["conversations"], "conversations", where), "from", "value"
    elif "prompt" in record and "completion" in record:
        turns, role_key, content_key = [{"role": "user", "content": record["prompt"]},
                                        {"role": "assistant", "content": record["completion"]}], "role", "content"
    else:
        fields = ", ".join(map(repr, list(record)[:10])) or "none"
        raise UserError(f"{where}: no conversation found (fields: {fields}); expected {FORMATS}")
    messages = [_message(turn, number, role_key, content_key, where) for number, turn in enumerate(turns, start=1)]
    if not any(message["role"] == "assistant" for message in messages):
        raise UserError(f"{where}: the conversation has no assistant turn, so nothing to learn")
    for number, (before, message) in enumerate(zip([{}] + messages, messages), start=1):
        if message["role"] == "tool" and not (before.get("tool_calls") or before.get("role") == "tool"):
            raise UserError(f"{where}: message {number} (tool) follows no assistant message with tool_calls")
    return messages


def _turn_list(turns: Any, name: str, where: str) -> list[Any]:
    if not isinstance(turns, list):
        raise UserError(f"{where}: {name!r} is a {type(turns).__name__}, not a list of messages")
    return turns


def _message(turn: Any, number: int, role_key: str, content_key: str, where: str) -> dict[str, Any]:
    """One message checked and in OpenAI's shape: role, content (a string, maybe empty), and the
    assistant's reasoning_content and tool_calls or a tool result's tool_call_id where they are."""
    if not isinstance(turn, dict) or role_key not in turn:
        raise UserError(f"{where}: a message is not an object with {role_key!r} and {content_key!r}")
    given = turn[role_key]
    if given not in ROLES:
        raise UserError(f"{where}: message {number} has the unknown role {given!r} (known: {', '.join(ROLES)})")
    role, content = ROLES[given], turn.get(content_key)
    where = f"{where}: message {number} ({given})"
    content = "" if content is None else content
    if not isinstance(content, str):
        raise UserError(f"{where}: the content is a {type(content).__name__}, not text")
    message: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant":
        reasoning, message["content"] = _reasoning(content, turn.get("reasoning_content"), where)
        if reasoning:
            message["reasoning_content"] = reasoning
        if turn.get("tool_calls"):
            calls = _turn_list(turn["tool_calls"], "tool_calls", where)
            message["tool_calls"] = [_tool_call(call, index, where) for index, call in enumerate(calls, start=1)]
        if not message["content"].strip() and "tool_calls" not in message:
            raise UserError(f"{where} is empty" + (" but for its reasoning" if reasoning else ""))
    elif role == "tool":
        for key in ("tool_call_id", "name"):
            if turn.get(key) is not None:
                message[key] = str(turn[key])
    elif not content.strip():
        raise UserError(f"{where} is empty")
    return message


def _reasoning(content: str, reasoning: Any, where: str) -> tuple[str, str]:
    """(reasoning, content) of an assistant message: its `reasoning_content`, or a <think> block
    that opens its content, moved out of it (as Qwen3's template does when it renders one)."""
    if reasoning is not None and not isinstance(reasoning, str):
        raise UserError(f"{where}: reasoning_content is a {type(reasoning).__name__}, not text")
    if not content.lstrip().startswith(THINK_OPEN):
        return reasoning or "", content
    if reasoning:
        raise UserError(f"{where} has both reasoning_content and a {THINK_OPEN} block: give one")
    opened = content.lstrip()
    closed = opened.find(THINK_CLOSE)
    if closed < 0:
        raise UserError(f"{where} opens {THINK_OPEN} without closing it with {THINK_CLOSE}")
    return opened[len(THINK_OPEN):closed].strip("\n"), opened[closed + len(THINK_CLOSE):].lstrip("\n")


def _tool_call(call: Any, index: int, where: str) -> dict[str, Any]:
    """A tool call in OpenAI's shape, {"type": "function", "function": {"name", "arguments"}} (and
    its id), from that shape or a bare {"name", "arguments"}; arguments an object or its JSON text."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise UserError(f"{where}: tool call {index} has no function name")
    arguments = {} if function.get("arguments") is None else function["arguments"]
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except json.JSONDecodeError:
            raise UserError(f"{where}: the arguments of tool call {index} are not JSON: {arguments[:80]!r}") from None
    elif not isinstance(arguments, dict):
        raise UserError(f"{where}: the arguments of tool call {index} are a {type(arguments).__name__}, "
                        f"not an object")
    normalized: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if call.get("id") is not None:
        normalized["id"] = str(call["id"])
    return normalized


def _tools(tools: Any, where: str) -> list[dict[str, Any]] | None:
    """A record's `tools`: a list of function schemas, or its JSON text (as datasets often store it)."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise UserError(f"{where}: 'tools' is text that is not JSON") from None
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise UserError(f"{where}: 'tools' must be a list of function schemas (JSON objects)")
    return tools


def end_of_turn(tokenizer: Tokenizer) -> str:
    """The token that closes a turn: <|im_end|> where the vocabulary has it, else end-of-text."""
    return IM_END if tokenizer.token_to_id(IM_END) is not None else tokenizer.eos_token


def render(tokenizer: Tokenizer, messages: Messages, tools: list[dict[str, Any]] | None = None) -> Rendered:
    """The token ids of `messages` (with `tools`) in the chat template, and which of them the model learns.

    Assistant turn k is opened by the template's generation prompt (the header the conversation up
    to it gets with add_generation_prompt, e.g. "<|im_start|>assistant\\n") and closed by the
    end-of-turn token; what lies between is learned, the closing token included. The header is
    looked for in the whole text after turn k - 1's end, and not before the point where the
    conversation up to turn k, rendered with that header, stops agreeing with the whole text: where
    the template renders the earlier turns the same either way (Qwen3's does unless they hold
    reasoning that a later user message hides), that point is the header itself, so a header-like
    string in a user's message is never taken for it.
    """
    variables = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, **variables)
    closing = end_of_turn(tokenizer)
    spans = []  # character ranges [start, end) of each reply and its end-of-turn token
    cursor = 0  # where the previous reply ended
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=False, **variables)
        prompt = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True, **variables)
        header = prompt[len(before):] if prompt.startswith(before) else ""
        agreed = len(os.path.commonprefix([prompt, text]))
        opened = text.find(header, max(cursor, agreed - len(header))) if header else -1
        closed = text.find(closing, opened + len(header)) if opened >= 0 else -1
        if closed < 0:
            raise UserError(f"the chat template does not render assistant message {index + 1} after its "
                            f"generation prompt and followed by {closing}: cannot tell which tokens to learn")
        cursor = closed + len(closing)
        spans.append((opened + len(header), cursor))
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


def pad_id(tokenizer: Tokenizer) -> int:
    """What fills the tail of a row: the tokenizer's pad token, else its end-of-text token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def render_and_pack(tokenizer: Tokenizer, conversations: list[Messages], row_tokens: int) -> Packed:
    """`render` each conversation and `pack` them into rows of `row_tokens`."""
    return pack([render(tokenizer, messages) for messages in conversations], row_tokens, pad_id(tokenizer))


def held_out(conversation: Conversation, val_fraction: float) -> bool:
    """Whether a conversation belongs to the held-out split: a hash of its content, so equal
    conversations always land on the same side and the split does not depend on the file order."""
    content = conversation.messages if conversation.tools is None else [conversation.messages, conversation.tools]
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction
