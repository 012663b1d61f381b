"""The API's request handling: check a request, encode its prompts, queue its jobs, answer it.

`CompletionService` is what the routes of app.py call, one method per step, kept in `app.state`
so it can be read and tested on its own (it needs a `Scheduler`, not a running server). Requests
reach it already parsed into the models of schemas.py; it raises `APIError` for what the schemas
cannot say (an unknown model, a prompt longer than the context, unsupported options) and builds
its answers from the response models, as JSON or as server-sent events.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from qwen3.errors import UserError
from qwen3.infer.engine import encode_prompt
from qwen3.infer.sampling import SamplingParams
from qwen3.server.scheduler import Event, Job, QueueFull, Scheduler
from qwen3.server.schemas import (
    API_SAMPLING_DEFAULTS,
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    GenerationRequest,
    Health,
    Message,
    ModelCard,
    ModelList,
    Usage,
)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 1024  # a chat reply's, when the request sets none (`qwen3 serve --default-max-tokens`)


class CompletionService:
    """Serves `scheduler`'s model as `model_name`; `api_key`, when set, guards every /v1 call. A chat
    request without max_tokens gets `chat_max_tokens`, or the room its context leaves if that is less."""

    def __init__(self, scheduler: Scheduler, model_name: str, api_key: str | None = None,
                 chat_max_tokens: int = CHAT_DEFAULT_MAX_TOKENS) -> None:
        self.scheduler = scheduler
        self.tokenizer = scheduler.engine.tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.chat_max_tokens = chat_max_tokens
        self.vocab_size = scheduler.engine.model.config.vocab_size
        self.created = int(time.time())
        # The model's own sampling (generation_config.json), checked once: a bad file stops the start.
        self.sampling_defaults = scheduler.engine.sampling_defaults
        SamplingParams.resolve({}, self.sampling_defaults, SamplingParams(**API_SAMPLING_DEFAULTS))

    def health(self) -> Health:
        return Health(status="ok", model=self.model_name, **self.scheduler.stats())

    def check_api_key(self, authorization: str | None) -> None:
        """Refuse (401) a call without `Authorization: Bearer <key>` when the server has a key."""
        if self.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def model_card(self, name: str | None = None) -> ModelCard:
        """The served model's card; 404 when `name` is given and is not its name."""
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return ModelCard(id=self.model_name, object="model", created=self.created, owned_by="qwen3-from-scratch",
                         context_length=self.scheduler.context)

    def models(self) -> ModelList:
        return ModelList(object="list", data=[self.model_card()])

    async def complete(self, request: Request, body: CompletionRequest) -> Response:
        """POST /v1/completions."""
        self.check(body)
        # Tokenizing a long prompt takes a while: off the event loop, so streams keep flowing.
        prompts = await asyncio.to_thread(lambda: [self.encode(prompt, "prompt") for prompt in body.prompts()])
        return await self.respond(request, body, prompts, body.max_tokens, chat=False)

    async def chat(self, request: Request, body: ChatRequest) -> Response:
        """POST /v1/chat/completions."""
        self.check(body)
        prompt = await asyncio.to_thread(self.encode_chat, body.messages)
        return await self.respond(request, body, [prompt], body.token_limit(), chat=True)

    def check(self, body: GenerationRequest) -> None:
        self.model_card(body.model)
        body.refuse_unsupported()

    def encode(self, prompt: str | list[int], param: str) -> list[int]:
        """Token ids of a prompt given as text or ids, with room left in the context for a reply."""
        try:
            ids = encode_prompt(self.tokenizer, prompt, self.vocab_size)  # as `qwen3 generate` does
        except UserError as error:
            raise APIError(400, str(error), param=param) from None
        if len(ids) >= self.scheduler.context:
            raise APIError(400, f"the {param} is {len(ids)} tokens long; this model's context is "
                                f"{self.scheduler.context} tokens, which leaves no room for a reply",
                           param=param, code="context_length_exceeded")
        return ids

    def encode_chat(self, messages: list[Message]) -> list[int]:
        """The conversation rendered with the checkpoint's chat template, ready for the reply."""
        try:
            text = self.tokenizer.apply_chat_template([m.as_template_message() for m in messages],
                                                      add_generation_prompt=True)
        except UserError as error:
            raise APIError(400, str(error), param="messages") from None
        return self.encode(text, "messages")

    def sampling_params(self, body: GenerationRequest, prompt_ids: list[int], max_tokens: int | None,
                        chat: bool, choice: int) -> SamplingParams:
        """The settings of choice `choice` of a request; max_tokens defaults to the chat or completion
        default, or to what the context leaves when that is less."""
        room = self.scheduler.context - len(prompt_ids)
        if max_tokens is None:
            max_tokens = min(self.chat_max_tokens if chat else COMPLETION_DEFAULT_MAX_TOKENS, room)
        elif max_tokens > room:
            raise APIError(400, f"max_tokens is {max_tokens}, but the prompt is {len(prompt_ids)} tokens "
                                f"and the context {self.scheduler.context}: at most {room} tokens can be generated",
                           param="max_tokens", code="context_length_exceeded")
        # The request's settings, else the model's (generation_config.json), else the API's. The request
        # schema holds validate's ranges, so a UserError here would be a bug (a 500).
        return SamplingParams.resolve(
            {**body.sampling_settings(), "max_new_tokens": max_tokens, "stop": body.stop_list(),
             # Choice i of a seeded request is what a request with seed + i gives on its own.
             "seed": None if body.seed is None else body.seed + choice},
            self.sampling_defaults, SamplingParams(**API_SAMPLING_DEFAULTS))

    def jobs(self, body: GenerationRequest, prompts: list[list[int]], max_tokens: int | None, chat: bool,
             events: asyncio.Queue[Event]) -> list[Job]:
        """One job per prompt and choice, numbered prompt-major, all reporting to `events`."""
        if len(prompts) * body.n > self.scheduler.max_queue:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} is more sequences than this server "
                                f"queues at once ({self.scheduler.max_queue})", param="n")
        loop = asyncio.get_running_loop()
        return [Job(ids, self.sampling_params(body, ids, max_tokens, chat, choice), self.scheduler.engine,
                    index=p * body.n + choice, events=events, loop=loop)
                for p, ids in enumerate(prompts) for choice in range(body.n)]

    async def respond(self, request: Request, body: GenerationRequest, prompts: list[list[int]],
                      max_tokens: int | None, chat: bool) -> Response:
        """Queue the request's jobs, then answer as JSON or as a stream of events."""
        events: asyncio.Queue[Event] = asyncio.Queue()
        jobs = self.jobs(body, prompts, max_tokens, chat, events)
        try:
            self.scheduler.submit(jobs)
        except QueueFull as error:
            raise APIError(429, str(error), type="server_overloaded", code="queue_full") from None
        reply = Reply(chat, self.model_name, sum(len(ids) for ids in prompts), len(jobs))
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return JobStream(stream(reply, events, include_usage), self.scheduler, jobs)
        collecting = asyncio.ensure_future(collect(reply, events))
        watching = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            if not collecting.done():  # the client left (or the server is stopping)
                collecting.cancel()
                self.scheduler.cancel(jobs)
        if not collecting.done() or collecting.cancelled():
            return Response(status_code=499)  # nobody reads this: the client has gone
        return JSONResponse(collecting.result().model_dump())


class JobStream(StreamingResponse):
    """Server-sent events of running jobs; however the response ends (done, client gone, server
    stopping), its jobs are cancelled, so nobody's generation outlives its reader."""

    def __init__(self, content: AsyncIterator[str], scheduler: Scheduler, jobs: list[Job]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.scheduler = scheduler
        self.jobs = jobs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.scheduler.cancel(self.jobs)


class Reply:
    """The OpenAI response being assembled for one request: its id, texts, finish reasons, usage."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int, choices: int) -> None:
        self.chat = chat
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.choices = choices
        self.texts: list[list[str]] = [[] for _ in range(choices)]
        self.finish_reasons: list[str | None] = [None] * choices
        self.completion_tokens = 0
        self.unfinished = choices

    def record(self, event: Event) -> None:
        self.texts[event.index].append(event.text)
        if event.finish_reason is not None:
            self.finish_reasons[event.index] = event.finish_reason
            self.completion_tokens += event.completion_tokens
            self.unfinished -= 1

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens)

    def chunk(self, index: int | None, text: str = "", finish_reason: str | None = None,
              usage: bool = False, role: bool = False) -> ChatCompletionChunk | Completion:
        """A streamed chunk for one choice, or (index None) the final usage chunk with no choices.

        Serialized without unset fields: a chat delta holds only what it carries, and `usage` is
        there (null until the final chunk) only when the client asked for it."""
        header = dict(id=self.id, created=self.created, model=self.model)
        if usage:  # with include_usage, OpenAI sends "usage": null until the final usage chunk
            header["usage"] = self.usage() if index is None else None
        if self.chat:
            delta = Delta(role="assistant", content=text) if role else Delta(content=text) if text else Delta()
            choices = [] if index is None else [
                ChatChunkChoice(index=index, delta=delta, logprobs=None, finish_reason=finish_reason)]
            return ChatCompletionChunk(object="chat.completion.chunk", choices=choices, **header)
        choices = [] if index is None else [
            CompletionChoice(index=index, text=text, logprobs=None, finish_reason=finish_reason)]
        return Completion(object="text_completion", choices=choices, **header)

    def final(self) -> ChatCompletion | Completion:
        """The complete `chat.completion` or `text_completion` object."""
        texts = ["".join(pieces) for pieces in self.texts]
        header = dict(id=self.id, created=self.created, model=self.model, usage=self.usage())
        if self.chat:
            return ChatCompletion(object="chat.completion", **header, choices=[
                ChatChoice(index=i, message=AssistantMessage(role="assistant", content=text), finish_reason=reason)
                for i, (text, reason) in enumerate(zip(texts, self.finish_reasons))])
        return Completion(object="text_completion", **header, choices=[
            CompletionChoice(index=i, text=text, finish_reason=reason)
            for i, (text, reason) in enumerate(zip(texts, self.finish_reasons))])


async def stream(reply: Reply, events: asyncio.Queue[Event], include_usage: bool) -> AsyncIterator[str]:
    """The SSE lines of a streamed response: a chunk per piece of text, usage, then [DONE]."""
    if reply.chat:
        for index in range(reply.choices):
            yield sse(reply.chunk(index, usage=include_usage, role=True))
    while reply.unfinished:
        event = await events.get()
        if event.error is not None:
            yield sse(APIError(500, event.error, type="server_error").response())
            return
        reply.record(event)
        yield sse(reply.chunk(event.index, event.text, event.finish_reason, usage=include_usage))
    if include_usage:
        yield sse(reply.chunk(None, usage=True))
    yield "data: [DONE]\n\n"


async def collect(reply: Reply, events: asyncio.Queue[Event]) -> ChatCompletion | Completion:
    """Wait for every choice to finish; the complete response object."""
    while reply.unfinished:
        event = await events.get()
        if event.error is not None:
            raise APIError(500, event.error, type="server_error")
        reply.record(event)
    return reply.final()


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
