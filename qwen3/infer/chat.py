"""The interactive chat: what a person does with a checkpoint after training.

`run_chat` is a terminal chat that remembers the conversation: each reply is generated from the
whole history, rendered with the tokenizer's chat template (Qwen's <|im_start|>role ...
<|im_end|> turns) or, for a tokenizer without one or in `/mode plain`, as one running text the
model continues. When the history outgrows the context, the oldest turns are dropped.

Qwen3 thinks before it answers (<think>...</think>, reasoning.py): the thinking is written apart
from the answer (dimmed on a terminal) and kept apart in the history (`reasoning_content`), so the
next prompt renders it as the template expects. `/think` and `/no_think` (Qwen3's soft switches)
set the template's `enable_thinking` for the following turns, for a template that reads it.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from qwen3.errors import UserError
from qwen3.infer.engine import Engine, load_engine
from qwen3.infer.reasoning import ReplyDelta, ReplyParser, leaves_thought_open, template_reads
from qwen3.infer.sampling import SamplingParams

HELP = """commands:
  /help                  this list
  /reset                 forget the conversation
  /set NAME VALUE        change a sampling setting (temperature, top_k, top_p, min_p,
                         repetition_penalty, max_new_tokens, seed; "none" clears the seed)
  /show                  the current settings
  /system TEXT           set the system message (empty TEXT removes it)
  /mode chat|plain       chat template turns, or plain text continuation
  /think, /no_think      let the model think before it answers, or not (a template with a thinking mode)
  /prompt                the exact prompt of the last reply
  /quit                  leave (Ctrl-D and Ctrl-C too)"""
SETTABLE = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens", "seed")


NO_THINKING_MODE = "this model's chat template has no thinking mode"


class ChatSession:
    """A conversation: the messages so far, the settings, and how they become the model's prompt.
    `thinking` is the template's enable_thinking (None: the template's own default)."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None,
                 thinking: bool | None = None) -> None:
        self.engine = engine
        self.params = params.validate()
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.template = engine.tokenizer.chat_template is not None
        self.thinking_mode = template_reads(engine.tokenizer.chat_template, "enable_thinking")
        if thinking is not None and not self.thinking_mode:
            raise UserError(f"{NO_THINKING_MODE}: thinking cannot be turned off")
        self.thinking = thinking
        self.last_prompt = ""

    def reset(self) -> None:
        self.messages = []

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a reply after `messages`."""
        if self.template:
            system = [{"role": "system", "content": self.system}] if self.system else []
            switch = {} if self.thinking is None else {"enable_thinking": self.thinking}
            return self.engine.tokenizer.apply_chat_template(system + messages, add_generation_prompt=True, **switch)
        # Plain continuation: each user turn on a new line, each reply continuing it.
        text = ""
        for message in messages:
            if message["role"] == "user" and text:
                text += "\n"
            text += message["content"]
        return text

    def prompt_ids(self) -> list[int]:
        """The rendered history as token ids, oldest turns dropped until a reply fits the context.

        A reply is given room for max_new_tokens, but at most half the context, so a long setting
        does not erase the whole history; the newest user message is always kept.
        """
        context = self.engine.max_context
        room = min(self.params.max_new_tokens, context // 2)
        while True:
            self.last_prompt = self.render(self.messages)
            ids = self.engine.encode_prompt(self.last_prompt)
            if len(ids) + room <= context or len(self.messages) <= 1:
                return ids
            # Drop the oldest exchange: a user message and the reply that followed it.
            self.messages = self.messages[2:] if len(self.messages) > 2 else self.messages[-1:]

    def reply(self, text: str) -> Iterator[ReplyDelta]:
        """Add the user's message and stream the model's reply, its thinking apart from its answer
        (in plain mode all of it is answer); the reply joins the history."""
        self.messages.append({"role": "user", "content": text})
        ids = self.prompt_ids()
        budget = max(1, self.engine.max_context - len(ids))
        params = dataclasses.replace(self.params, max_new_tokens=min(self.params.max_new_tokens, budget))
        pieces = self.engine.stream(ids, params)
        parser = ReplyParser(leaves_thought_open(self.last_prompt)) if self.template else None
        reply = ReplyDelta()
        try:
            for delta in parser.parse(pieces) if parser else (ReplyDelta(content=piece) for piece in pieces):
                reply.extend(delta)
                if delta:
                    yield delta
        finally:  # an interrupted reply still joins the history as far as it got
            message = {"role": "assistant", "content": reply.content}
            if parser and parser.thought:
                message["reasoning_content"] = reply.reasoning
            self.messages.append(message)

    def command(self, line: str) -> str | None:
        """Run a /command; return the text to show, or None to leave the chat."""
        name, _, argument = line[1:].partition(" ")
        argument = argument.strip()
        if name in ("quit", "exit", "q"):
            return None
        if name == "help":
            return HELP
        if name == "reset":
            self.reset()
            return "(conversation cleared)"
        if name == "show":
            settings = ", ".join(f"{field}={getattr(self.params, field)}" for field in SETTABLE)
            mode = "chat template" if self.template else "plain continuation"
            return f"{settings}\nmode: {mode}; thinking: {self.thinking_state()}; system: {self.system or '(none)'}"
        if name in ("think", "no_think"):
            if not self.thinking_mode:
                return NO_THINKING_MODE
            self.thinking = name == "think"
            return f"(thinking {'on' if self.thinking else 'off'} from the next reply)"
        if name == "set":
            return self.set(argument)
        if name == "system":
            self.system = argument or None
            return f"(system message {'set' if argument else 'removed'})"
        if name == "mode":
            if argument not in ("chat", "plain"):
                return "usage: /mode chat|plain"
            if argument == "chat" and self.engine.tokenizer.chat_template is None:
                return "this tokenizer has no chat template; staying in plain mode"
            self.template = argument == "chat"
            return f"(mode: {argument})"
        if name == "prompt":
            return self.last_prompt or "(no reply yet)"
        return f"unknown command /{name}; /help lists the commands"

    def thinking_state(self) -> str:
        if not self.thinking_mode:
            return "none (the chat template has no thinking mode)"
        return {None: "the template's default", True: "on", False: "off"}[self.thinking]

    def set(self, argument: str) -> str:
        field, _, value = argument.partition(" ")
        value = value.strip()
        if field not in SETTABLE or not value:
            return f"usage: /set NAME VALUE, NAME one of {', '.join(SETTABLE)}"
        number: int | float | None
        try:
            if field == "seed" and value.lower() == "none":
                number = None
            elif field in ("top_k", "max_new_tokens", "seed"):
                number = int(value)
            else:
                number = float(value)
            self.params = dataclasses.replace(self.params, **{field: number}).validate()
        except ValueError:
            return f"{field} needs a number, got {value!r}"
        except UserError as error:
            return str(error)
        return f"({field} = {number})"


def read_line(prompt: str, input_stream: TextIO, output_stream: TextIO) -> str | None:
    """One line of input without its newline; None at end of input (Ctrl-D)."""
    if input_stream is sys.stdin and output_stream is sys.stdout and sys.stdin.isatty():
        import readline  # noqa: F401  (imported for its effect: line editing and history in input())

        try:
            return input(prompt)  # line editing and history on a terminal
        except EOFError:
            return None
    output_stream.write(prompt)
    output_stream.flush()
    line = input_stream.readline()
    return line.rstrip("\r\n") if line else None


def write_reply(reply: Iterable[ReplyDelta], output: TextIO) -> None:
    """Write a reply as it streams: its thinking, if any, on a line of its own after "thinking> "
    (dimmed on a terminal), then its answer after "bot> "."""
    dim, normal = ("\x1b[2m", "\x1b[0m") if output.isatty() else ("", "")
    thinking = answering = False
    try:
        for delta in reply:
            if delta.reasoning:
                if not thinking:
                    output.write(f"thinking> {dim}")
                    thinking = True
                output.write(delta.reasoning)
            if delta.content:
                if not answering:
                    output.write(f"{normal}\nbot> " if thinking else "bot> ")
                    answering = True
                output.write(delta.content)
            output.flush()
    finally:  # also when Ctrl-C cuts the reply
        if not answering:
            output.write(f"{normal}\nbot> " if thinking else "bot> ")
        output.write("\n")
        output.flush()


def run_chat(path: str | Path, settings: SamplingParams | Mapping[str, Any] | None = None,
             input_stream: TextIO = sys.stdin, output_stream: TextIO = sys.stdout, *,
             device: str = "auto", quantize: str | None = None, compile: bool = False,
             system: str | None = None, thinking: bool | None = None, dtype: str = "auto") -> None:
    """Chat with the checkpoint in the terminal until /quit, Ctrl-D or Ctrl-C. `settings` are the
    user's sampling settings: a SamplingParams is taken whole; of a mapping, the fields it sets
    (not None), the model's generation_config.json and then SamplingParams' defaults the rest.
    `thinking`: the chat template's enable_thinking at the start (None: the template's default)."""
    given = dataclasses.asdict(settings) if isinstance(settings, SamplingParams) else dict(settings or {})
    SamplingParams.resolve(given)  # a bad setting is refused before the model loads
    engine = load_engine(path, device, quantize, compile, dtype)
    session = ChatSession(engine, SamplingParams.resolve(given, engine.sampling_defaults), system, thinking)
    mode = "chat template" if session.template else "plain continuation"
    output_stream.write(f"Chatting with {engine.checkpoint} ({mode}, context "
                        f"{engine.max_context} tokens). /help for commands; /quit or Ctrl-D leaves.\n")
    try:
        while True:
            line = read_line("\nyou> ", input_stream, output_stream)
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                answer = session.command(line)
                if answer is None:
                    break
                output_stream.write(answer + "\n")
                continue
            write_reply(session.reply(line), output_stream)
    except KeyboardInterrupt:
        pass
    output_stream.write("\nbye\n")
    output_stream.flush()
