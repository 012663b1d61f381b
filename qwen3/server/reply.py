"""The answer to one request, assembled from its jobs' events: whole, or as server-sent events.

A completion's choices are the generated text as it is. A chat reply's are taken apart as they
stream (infer/reasoning.py): the thinking goes to `reasoning_content`, the answer to `content`, and
the calls of the request's tools to `tool_calls`, so each streamed chunk carries only what is
settled, and the chunks of a choice add up to the message the same request gets whole.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel

from qwen3.infer.reasoning import ReplyDelta, ReplyParser
from qwen3.infer.reasoning import ToolCall as ParsedCall
from qwen3.server.scheduler import Event
from qwen3.server.schemas import (APIError, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                  ChatCompletionChunk, Completion, CompletionChoice, Delta, FunctionCall, ToolCall,
                                  ToolCallChunk, Usage)


class Reply:
    """What every answer holds: its id, the choices' finish reasons, the token counts. Subclasses
    say what an event's text adds to a choice (`settle`) and build the chunks and the whole answer."""

    kind = "cmpl"  # the id's prefix

    def __init__(self, model: str, prompt_tokens: int, choices: int) -> None:
        self.model = model
        self.id = f"{self.kind}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.choices = choices
        self.finish_reasons: list[str | None] = [None] * choices
        self.completion_tokens = 0
        self.unfinished = choices

    def record(self, event: Event) -> Any:
        """Take a job's event; what it settles of its choice (falsy: nothing new to send yet)."""
        finished = event.finish_reason is not None
        part = self.settle(event.index, event.text, finished)
        if finished:
            self.finish_reasons[event.index] = self.finish_reason(event.index, event.finish_reason)
            self.completion_tokens += event.completion_tokens
            self.unfinished -= 1
        return part

    def settle(self, index: int, text: str, final: bool) -> Any:
        raise NotImplementedError

    def finish_reason(self, index: int, generation: str) -> str:
        return generation

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens)

    def header(self, usage: bool, last: bool) -> dict[str, Any]:
        """The fields of every chunk; with include_usage, OpenAI sends "usage": null until the last chunk."""
        header: dict[str, Any] = dict(id=self.id, created=self.created, model=self.model)
        if usage:
            header["usage"] = self.usage() if last else None
        return header

    def opening(self, usage: bool) -> list[BaseModel]:
        """The chunks a stream begins with."""
        return []

    def chunk(self, index: int | None, part: Any = None, usage: bool = False) -> BaseModel:
        """A streamed chunk of one choice, with what `record` settled and its finish reason once it
        has one, or (index None) the final usage chunk with no choices. Serialized without unset
        fields: a chat delta holds only what it carries."""
        raise NotImplementedError

    def final(self) -> BaseModel:
        raise NotImplementedError


class CompletionReply(Reply):
    """A /v1/completions answer: each choice's text as it was generated."""

    def __init__(self, model: str, prompt_tokens: int, choices: int) -> None:
        super().__init__(model, prompt_tokens, choices)
        self.texts: list[list[str]] = [[] for _ in range(choices)]

    def settle(self, index: int, text: str, final: bool) -> str:
        self.texts[index].append(text)
        return text

    def chunk(self, index: int | None, part: str | None = None, usage: bool = False) -> Completion:
        choices = [] if index is None else [CompletionChoice(
            index=index, text=part or "", logprobs=None, finish_reason=self.finish_reasons[index])]
        return Completion(object="text_completion", choices=choices, **self.header(usage, index is None))

    def final(self) -> Completion:
        return Completion(object="text_completion", id=self.id, created=self.created, model=self.model,
                          usage=self.usage(), choices=[
                              CompletionChoice(index=i, text="".join(texts), finish_reason=reason)
                              for i, (texts, reason) in enumerate(zip(self.texts, self.finish_reasons))])


def tool_call(call: ParsedCall) -> ToolCall:
    return ToolCall(id=call.id, type="function", function=FunctionCall(name=call.name, arguments=call.arguments))


class ChatReply(Reply):
    """A /v1/chat/completions answer: each choice's text parsed by its own `parser()` into
    reasoning, content and tool calls; a choice with a valid call finishes with "tool_calls"."""

    kind = "chatcmpl"

    def __init__(self, model: str, prompt_tokens: int, choices: int, parser: Callable[[], ReplyParser]) -> None:
        super().__init__(model, prompt_tokens, choices)
        self.parsers = [parser() for _ in range(choices)]
        self.parts = [ReplyDelta() for _ in range(choices)]  # each choice's parts so far

    def settle(self, index: int, text: str, final: bool) -> ReplyDelta:
        delta = self.parsers[index].push(text, final=final)
        self.parts[index].extend(delta)
        return delta

    def finish_reason(self, index: int, generation: str) -> str:
        return "tool_calls" if self.parts[index].tool_calls else generation

    def opening(self, usage: bool) -> list[ChatCompletionChunk]:
        """A first chunk per choice, with the role."""
        return [self._chunk([ChatChunkChoice(index=index, delta=Delta(role="assistant", content=""), logprobs=None,
                                             finish_reason=None)], usage) for index in range(self.choices)]

    def chunk(self, index: int | None, part: ReplyDelta | None = None, usage: bool = False) -> ChatCompletionChunk:
        if index is None:
            return self._chunk([], usage, last=True)
        delta = Delta()
        if part is not None and part.reasoning:
            delta.reasoning_content = part.reasoning
        if part is not None and part.content:
            delta.content = part.content
        if part is not None and part.tool_calls:
            first = len(self.parts[index].tool_calls) - len(part.tool_calls)  # the calls' places in the choice
            delta.tool_calls = [ToolCallChunk(index=first + i, **tool_call(call).model_dump())
                                for i, call in enumerate(part.tool_calls)]
        return self._chunk([ChatChunkChoice(index=index, delta=delta, logprobs=None,
                                            finish_reason=self.finish_reasons[index])], usage)

    def _chunk(self, choices: list[ChatChunkChoice], usage: bool, last: bool = False) -> ChatCompletionChunk:
        return ChatCompletionChunk(object="chat.completion.chunk", choices=choices, **self.header(usage, last))

    def final(self) -> ChatCompletion:
        choices = []
        for index, (parts, reason) in enumerate(zip(self.parts, self.finish_reasons)):
            calls = [tool_call(call) for call in parts.tool_calls]
            message = AssistantMessage(role="assistant", content=parts.content if parts.content or not calls else None,
                                       reasoning_content=parts.reasoning or None, tool_calls=calls or None)
            choices.append(ChatChoice(index=index, message=message, finish_reason=reason))
        return ChatCompletion(object="chat.completion", id=self.id, created=self.created, model=self.model,
                              usage=self.usage(), choices=choices)


async def stream(reply: Reply, events: asyncio.Queue[Event], include_usage: bool) -> AsyncIterator[str]:
    """The SSE lines of a streamed response: a chunk per settled piece, usage, then [DONE]."""
    for chunk in reply.opening(include_usage):
        yield sse(chunk)
    while reply.unfinished:
        event = await events.get()
        if event.error is not None:
            yield sse(APIError(500, event.error, type="server_error").response())
            return
        part = reply.record(event)
        if part or event.finish_reason is not None:
            yield sse(reply.chunk(event.index, part, usage=include_usage))
    if include_usage:
        yield sse(reply.chunk(None, usage=True))
    yield "data: [DONE]\n\n"


async def collect(reply: Reply, events: asyncio.Queue[Event]) -> BaseModel:
    """Wait for every choice to finish; the complete response object."""
    while reply.unfinished:
        event = await events.get()
        if event.error is not None:
            raise APIError(500, event.error, type="server_error")
        reply.record(event)
    return reply.final()


def sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
