"""A Qwen3 reply taken apart: its thinking, its answer and its tool calls, whole or as it streams.

Qwen3 writes its reasoning first, as <think>\\n...\\n</think>\\n\\n, then the answer; a call to one of
the tools the prompt lists is a block of its own, <tool_call>\\n{"name": ..., "arguments": {...}}
\\n</tool_call> (chat_template.jinja renders the same format back into a prompt). The terminal chat
shows the thinking apart from the answer and the API returns them as `reasoning_content` and
`content` (vLLM's qwen3 reasoning parser and DeepSeek's API are the convention), with the calls as
OpenAI `tool_calls`. `ReplyParser` does it as the text streams: what it returns is settled, and it
holds back only what the next text may change (a tag begun but not finished, the newlines at the
end of a thought, a tool call until it is closed). A whole reply is the same parser fed all of it
at once, so a streamed reply always adds up to the whole one.

In the released tokenizer the tags are single tokens; in ours they are ordinary text spread over
several, so nothing here assumes a tag arrives in one piece.

Where the thinking starts: the reply is in a thought from its first token when the prompt leaves
one open (`leaves_thought_open`: a template that writes <think> into the generation prompt, as
Qwen3's 2507 thinking models' and Qwen3.5's do); then everything up to </think> is reasoning, as
vLLM's qwen3 parser reads a reply with </think> and no opening tag. Otherwise a thought is a reply
that begins with <think> (Qwen3's own template, whose `enable_thinking=false` closes an empty thought
in the prompt instead); <think> anywhere else is text. A thought cut short (max_tokens) is all
reasoning. As Qwen's template does, the newlines around the thought are stripped, and so are those
that begin the answer after it.

Tool calls are read in the answer only, and only when the request gave tools. A block that is not
one JSON object with a `name` among the tools and object `arguments` (or none) is returned as the
text it is, never an error; whitespace between the answer and a call is dropped.
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field

import jinja2
import jinja2.meta

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
TURN_START = "<|im_start|>"

# The parser's states: where the text it has not given out yet belongs.
START, THOUGHT, AFTER_THOUGHT, ANSWER, CALL = "start", "thought", "after thought", "answer", "call"


@functools.lru_cache(maxsize=8)
def template_variables(template: str) -> frozenset[str]:
    """The variables a chat template reads (those it neither sets nor gets from Jinja itself)."""
    try:
        parsed = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateError:
        return frozenset()  # it cannot render either; rendering says why
    return frozenset(jinja2.meta.find_undeclared_variables(parsed))


def template_reads(template: str | None, variable: str) -> bool:
    """Whether a chat template reads `variable`: `enable_thinking` for a thinking mode, `tools`."""
    return template is not None and variable in template_variables(template)


def leaves_thought_open(prompt: str) -> bool:
    """Whether a rendered prompt's last turn (the reply's generation prompt) opens a thought it does
    not close, so that the reply begins inside it."""
    last_turn = prompt.rpartition(TURN_START)[2]  # all of it when it has no turns
    return last_turn.rfind(THINK_OPEN) > last_turn.rfind(THINK_CLOSE)


@dataclass
class ToolCall:
    """One call of a tool, in OpenAI's terms: `arguments` is a JSON text."""

    id: str
    name: str
    arguments: str


@dataclass
class ReplyDelta:
    """What a piece of a reply adds to each of its parts (each may be empty)."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def extend(self, other: ReplyDelta) -> None:
        """Add what `other` settled after this."""
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls += other.tool_calls


def partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (and is shorter than it)."""
    return max((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), default=0)


class ReplyParser:
    """Splits a reply into reasoning, answer and tool calls as its text arrives.

    `in_thought`: the prompt left a thought open (`leaves_thought_open`). `tools`: the names of the
    tools the request gave, whose calls are parsed; None parses no calls. `push` each piece of
    text, the last with `final=True`.
    """

    def __init__(self, in_thought: bool = False, tools: Collection[str] | None = None) -> None:
        self.state = THOUGHT if in_thought else START
        self.thought = in_thought  # whether the reply has a thought (reasoning, possibly empty)
        self.tools = None if tools is None else frozenset(tools)
        self.pending = ""  # text received and not given out yet
        self.reasoning_started = False  # the thought's leading newlines are dropped until then
        self.space = ""  # whitespace at the end of the answer, held in case a tool call follows
        self.after_call = False  # nothing but whitespace since the last valid call

    def push(self, text: str, final: bool = False) -> ReplyDelta:
        """Take the next piece of the reply; what it settles. `final`: no more text will come, so
        whatever was held back is settled too."""
        self.pending += text
        return self._run(final)

    def parse(self, pieces: Iterable[str]) -> Iterator[ReplyDelta]:
        """What each piece of a whole stream settles, the held text last (empty deltas included)."""
        for piece in pieces:
            yield self.push(piece)
        yield self.push("", final=True)

    def _run(self, final: bool) -> ReplyDelta:
        delta = ReplyDelta()
        step = {START: self._start, THOUGHT: self._thought, AFTER_THOUGHT: self._after_thought,
                ANSWER: self._answer, CALL: self._call}
        while step[self.state](delta, final):
            pass
        return delta

    # Each step gives out what it can of `pending` and returns whether the state changed (so the
    # next state reads the rest), or False to wait for more text.

    def _start(self, delta: ReplyDelta, final: bool) -> bool:
        text = self.pending.lstrip()
        if text.startswith(THINK_OPEN):
            self.pending, self.state, self.thought = text[len(THINK_OPEN):], THOUGHT, True
            return True
        if THINK_OPEN.startswith(text) and not final:
            return False  # only whitespace so far, or the beginning of <think>
        self.state = ANSWER
        return True

    def _thought(self, delta: ReplyDelta, final: bool) -> bool:
        reasoning, closed, rest = self.pending.partition(THINK_CLOSE)
        if closed:
            self._reason(delta, reasoning.rstrip("\n"))
            self.pending, self.state = rest, AFTER_THOUGHT
            return True
        # Held: the beginning of </think>, and the newlines before it (dropped if the thought ends).
        kept = len(self.pending) - (0 if final else partial_tag(self.pending, THINK_CLOSE))
        settled = self.pending[:kept].rstrip("\n")
        self._reason(delta, settled)
        self.pending = "" if final else self.pending[len(settled):]
        return False

    def _reason(self, delta: ReplyDelta, text: str) -> None:
        if not self.reasoning_started:
            text = text.lstrip("\n")
            self.reasoning_started = bool(text)
        delta.reasoning += text

    def _after_thought(self, delta: ReplyDelta, final: bool) -> bool:
        self.pending = self.pending.lstrip("\n")
        if self.pending or final:
            self.state = ANSWER
            return True
        return False

    def _answer(self, delta: ReplyDelta, final: bool) -> bool:
        if self.tools is None:
            delta.content += self.pending
            self.pending = ""
            return False
        text, opened, rest = self.pending.partition(CALL_OPEN)
        if not opened:  # hold what may begin <tool_call>
            kept = len(text) - (0 if final else partial_tag(text, CALL_OPEN))
            text, rest = text[:kept], text[kept:]
        self._say(delta, text)
        self.pending = rest
        if opened:
            self.state = CALL
            return True
        if final:  # trailing whitespace stays, unless it only follows a call
            delta.content += "" if self.after_call else self.space
            self.space = ""
        return False

    def _say(self, delta: ReplyDelta, text: str) -> None:
        """Answer text, its trailing whitespace held until what follows it is known."""
        body = text.rstrip()
        if body:
            delta.content += self.space + body
            self.space, self.after_call = text[len(body):], False
        else:
            self.space += text

    def _call(self, delta: ReplyDelta, final: bool) -> bool:
        body, closed, rest = self.pending.partition(CALL_CLOSE)
        if not closed and not final:
            return False  # the call is read whole
        call = self._tool_call(body) if closed else None
        if call is not None:
            delta.tool_calls.append(call)
            self.space, self.after_call = "", True
        else:  # not a call this request can answer: the text it is
            delta.content += self.space + CALL_OPEN + body + closed
            self.space, self.after_call = "", False
        self.pending, self.state = rest, ANSWER
        return True

    def _tool_call(self, body: str) -> ToolCall | None:
        """The call a <tool_call> block holds, or None when it is not a valid call of a given tool."""
        try:
            call = json.loads(body)
        except ValueError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or call["name"] not in self.tools:
            return None
        arguments = call.get("arguments", {})
        if not isinstance(arguments, dict):
            return None
        return ToolCall(id=f"call_{secrets.token_hex(12)}", name=call["name"],
                        arguments=json.dumps(arguments, ensure_ascii=False))

