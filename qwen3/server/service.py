"""The API's request handling: check a request, encode its prompts, queue its jobs, answer it.

`CompletionService` is what the routes of app.py call, one method per step, kept in `app.state`
so it can be read and tested on its own (it needs a `Scheduler`, not a running server). Requests
reach it already parsed into the models of schemas.py; it raises `APIError` for what the schemas
cannot say (an unknown model, a prompt longer than the context, unsupported options, a thinking
mode or tools the chat template cannot render) and hands the answer to reply.py, as JSON or as
server-sent events.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from qwen3.errors import UserError
from qwen3.infer.engine import encode_prompt
from qwen3.infer.reasoning import CALL_OPEN, THINK_CLOSE, ReplyParser, leaves_thought_open, template_reads
from qwen3.infer.sampling import SamplingParams
from qwen3.server.reply import ChatReply, CompletionReply, Reply, collect, stream
from qwen3.server.scheduler import Event, Job, QueueFull, Scheduler
from qwen3.server.schemas import (API_SAMPLING_DEFAULTS, APIError, ChatRequest, CompletionRequest, GenerationRequest,
                                  Health, ModelCard, ModelList, NamedToolChoice)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 1024  # a chat reply's, when the request sets none (`qwen3 serve --default-max-tokens`)
# The chat template's variables that the server sets itself, which chat_template_kwargs may not.
RESERVED_TEMPLATE_VARIABLES = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")


@dataclass
class ChatPrompt:
    """A conversation rendered for its reply (`text`, then `opening`, as `ids`), and how to read the
    reply: whether it begins inside a thought, the names of the tools whose calls are parsed (None:
    no calls are), and the `opening` the prompt ends with, which the reply is taken to begin with
    (the start of a call it must make)."""

    text: str
    ids: list[int]
    in_thought: bool
    tools: frozenset[str] | None
    opening: str = ""

    def parser(self) -> ReplyParser:
        parser = ReplyParser(self.in_thought, self.tools)
        parser.push(self.opening)  # settles nothing: it only opens a call
        return parser


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
                         context_length=self.scheduler.context,
                         thinking=template_reads(self.tokenizer.chat_template, "enable_thinking"))

    def models(self) -> ModelList:
        return ModelList(object="list", data=[self.model_card()])

    async def complete(self, request: Request, body: CompletionRequest) -> Response:
        """POST /v1/completions."""
        self.check(body)
        # Tokenizing a long prompt takes a while: off the event loop, so streams keep flowing.
        prompts = await asyncio.to_thread(lambda: [self.encode(prompt, "prompt") for prompt in body.prompts()])
        reply = functools.partial(CompletionReply, self.model_name, sum(len(ids) for ids in prompts))
        return await self.respond(request, body, prompts, body.max_tokens, chat=False, reply=reply)

    async def chat(self, request: Request, body: ChatRequest) -> Response:
        """POST /v1/chat/completions."""
        self.check(body)
        prompt = await asyncio.to_thread(self.chat_prompt, body)
        reply = functools.partial(ChatReply, self.model_name, len(prompt.ids), parser=prompt.parser)
        return await self.respond(request, body, [prompt.ids], body.token_limit(), chat=True, reply=reply)

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

    def chat_prompt(self, body: ChatRequest) -> ChatPrompt:
        """The conversation rendered with the checkpoint's chat template, ready for the reply: with
        the request's tools (unless tool_choice is "none") and chat_template_kwargs."""
        template = self.tokenizer.chat_template
        variables = body.chat_template_kwargs.variables() if body.chat_template_kwargs else {}
        reserved = [name for name in RESERVED_TEMPLATE_VARIABLES if name in variables]
        if reserved:
            raise APIError(400, f"chat_template_kwargs may not set {reserved[0]!r}: the server sets it "
                                f"from the request", param="chat_template_kwargs")
        if "enable_thinking" in variables and template is not None and not template_reads(template, "enable_thinking"):
            raise APIError(400, "this model's chat template has no thinking mode (it never reads enable_thinking): "
                                "leave chat_template_kwargs.enable_thinking out", param="chat_template_kwargs",
                           code="unsupported_parameter")
        choice = body.tool_choice or "auto"
        names = [tool.function.name for tool in body.tools or []]
        if choice not in ("none", "auto") and not names:
            raise APIError(400, "tool_choice other than 'none' or 'auto' needs 'tools'", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not in "
                                f"'tools' ({', '.join(names)})", param="tool_choice")
        tools = names if names and choice != "none" else None
        if tools and template is not None and not template_reads(template, "tools"):
            raise APIError(400, "this model's chat template does not render tools", param="tools",
                           code="unsupported_parameter")
        if tools:  # as the client wrote them (the template writes them into the prompt as JSON)
            variables["tools"] = [tool.model_dump(exclude_unset=True) for tool in body.tools]
        try:
            text = self.tokenizer.apply_chat_template([m.as_template_message() for m in body.messages],
                                                      add_generation_prompt=True, **variables)
        except UserError as error:
            raise APIError(400, str(error), param="messages") from None
        except Exception as error:  # a template meeting values it cannot take: the request's, not a bug here
            raise APIError(400, f"the chat template failed to render these messages: {error}",
                           param="messages") from None
        in_thought = leaves_thought_open(text)
        opening = forced_call(choice, in_thought)
        return ChatPrompt(text, self.encode(text + opening, "messages"), in_thought,
                          frozenset(tools) if tools else None, opening)

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
                      max_tokens: int | None, chat: bool, reply: Callable[[int], Reply]) -> Response:
        """Queue the request's jobs, then answer as JSON or as a stream of events; `reply(choices)`
        assembles the answer."""
        events: asyncio.Queue[Event] = asyncio.Queue()
        jobs = self.jobs(body, prompts, max_tokens, chat, events)
        try:
            self.scheduler.submit(jobs)
        except QueueFull as error:
            raise APIError(429, str(error), type="server_overloaded", code="queue_full") from None
        reply = reply(len(jobs))
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


def forced_call(choice: object, in_thought: bool) -> str:
    """What the prompt ends with so that the reply begins a tool call: of the named function, or
    (tool_choice "required") of one the model names; after closing the thought the prompt left
    open. Nothing for "auto" and "none"."""
    if choice == "required":
        call = CALL_OPEN + '\n{"name": "'
    elif isinstance(choice, NamedToolChoice):
        call = CALL_OPEN + '\n{"name": ' + json.dumps(choice.function.name) + ', "arguments": '
    else:
        return ""
    return (THINK_CLOSE + "\n\n" if in_thought else "") + call


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
