"""The interactive chat: what a person does with a checkpoint after training.

`run_chat` is a terminal chat that remembers the conversation: each reply is generated from the
whole history, rendered with the tokenizer's chat template (Qwen's <|im_start|>role ...
<|im_end|> turns) or, for a tokenizer without one or in `/mode plain`, as one running text the
model continues. When the history outgrows the context, the oldest turns are dropped.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from qwen3.errors import UserError
from qwen3.infer.engine import Engine, load_engine
from qwen3.infer.sampling import SamplingParams

HELP = """commands:
  /help                  this list
  /reset                 forget the conversation
  /set NAME VALUE        change a sampling setting (temperature, top_k, top_p, min_p,
                         repetition_penalty, max_new_tokens, seed; "none" clears the seed)
  /show                  the current settings
  /system TEXT           set the system message (empty TEXT removes it)
  /mode chat|plain       chat template turns, or plain text continuation
  /prompt                the exact prompt of the last reply
  /quit                  leave (Ctrl-D and Ctrl-C too)"""
SETTABLE = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens", "seed")


class ChatSession:
    """A conversation: the messages so far, the settings, and how they become the model's prompt."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None) -> None:
        self.engine = engine
        self.params = params.validate()
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.template = engine.tokenizer.chat_template is not None
        self.last_prompt = ""

    def reset(self) -> None:
        self.messages = []

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a reply after `messages`."""
        if self.template:
            system = [{"role": "system", "content": self.system}] if self.system else []
            return self.engine.tokenizer.apply_chat_template(system + messages, add_generation_prompt=True)
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

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's message and stream the model's answer, which joins the history."""
        self.messages.append({"role": "user", "content": text})
        ids = self.prompt_ids()
        budget = max(1, self.engine.max_context - len(ids))
        params = dataclasses.replace(self.params, max_new_tokens=min(self.params.max_new_tokens, budget))
        pieces = []
        try:
            for piece in self.engine.stream(ids, params):
                pieces.append(piece)
                yield piece
        finally:  # an interrupted reply still joins the history as far as it got
            self.messages.append({"role": "assistant", "content": "".join(pieces)})

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
            return f"{settings}\nmode: {mode}; system: {self.system or '(none)'}"
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


def run_chat(path: str | Path, settings: SamplingParams | Mapping[str, Any] | None = None,
             input_stream: TextIO = sys.stdin, output_stream: TextIO = sys.stdout, *,
             device: str = "auto", quantize: str | None = None, compile: bool = False,
             system: str | None = None, dtype: str = "auto") -> None:
    """Chat with the checkpoint in the terminal until /quit, Ctrl-D or Ctrl-C. `settings` are the
    user's sampling settings: a SamplingParams is taken whole; of a mapping, the fields it sets
    (not None), the model's generation_config.json and then SamplingParams' defaults the rest."""
    given = dataclasses.asdict(settings) if isinstance(settings, SamplingParams) else dict(settings or {})
    SamplingParams.resolve(given)  # a bad setting is refused before the model loads
    engine = load_engine(path, device, quantize, compile, dtype)
    session = ChatSession(engine, SamplingParams.resolve(given, engine.sampling_defaults), system)
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
            output_stream.write("bot> ")
            for piece in session.reply(line):
                output_stream.write(piece)
                output_stream.flush()
            output_stream.write("\n")
    except KeyboardInterrupt:
        pass
    output_stream.write("\nbye\n")
    output_stream.flush()
