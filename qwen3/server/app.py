"""The HTTP server: an OpenAI-compatible API and a web chat page over one continuous-batching scheduler.

Existing OpenAI clients, scripts and chat UIs can point at it: `/v1/completions` and
`/v1/chat/completions` take OpenAI's request shapes and answer with OpenAI's response shapes, as JSON
or as server-sent events. Request handlers only validate, tokenize and relay: the model belongs to
the `Scheduler` thread. Every problem with a request is answered as an OpenAI-style JSON error with
a 4xx status; nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen3.checkpoint import find_checkpoint
from qwen3.errors import UserError
from qwen3.engine import encode_prompt, load_engine
from qwen3.model import Qwen3ForCausalLM
from qwen3.sampling import SamplingParams
from qwen3.server.schemas import APIError, ChatRequest, CompletionRequest, GenerationRequest, parse_request
from qwen3.server.scheduler import Event, Job, QueueFull, Scheduler

STATIC = Path(__file__).with_name("static")
MAX_BODY_BYTES = 4 * 1024 * 1024
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop")

# The page loads only its own files and talks only to this server; nothing it shows can run as code.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; "
                                 b"img-src 'self' data:; connect-src 'self'; object-src 'none'; "
                                 b"base-uri 'none'; frame-ancestors 'none'; form-action 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    """ASGI middleware adding SECURITY_HEADERS to every response (streams pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


def create_app(model: Qwen3ForCausalLM, tokenizer, model_name: str, api_key: str | None = None,
               max_batch: int = 16, max_queue: int | None = None) -> FastAPI:
    """The FastAPI app serving `model` as `model_name`; its scheduler runs while the app is up.

    Up to `max_batch` sequences decode together and `max_queue` (default 4 x max_batch) more wait;
    beyond that requests are answered 429.
    """
    scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_queue=max_queue or 4 * max_batch)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.stop()

    # No /docs pages: they load scripts from a CDN, and the page must work offline.
    app = FastAPI(title="qwen3", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.add_middleware(SecurityHeaders)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if error.status == 429 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return await api_error(request, APIError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        # A bug, not the client's fault: answered in the same shape (Starlette logs the traceback).
        return await api_error(request, APIError(500, "internal server error", type="server_error"))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **scheduler.stats()}

    async def require_api_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "qwen3-from-scratch",
                "context_length": scheduler.context}

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        check_model_name(name)
        return model_card()

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = parse_request(CompletionRequest, await read_body(request))
        check_request(body)
        # Tokenizing a long prompt takes a while: off the event loop, so streams keep flowing.
        prompts = await asyncio.to_thread(lambda: [encode(prompt, "prompt") for prompt in body.prompts()])
        return await respond(request, body, prompts, body.max_tokens, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatRequest = parse_request(ChatRequest, await read_body(request))
        check_request(body)
        prompt = await asyncio.to_thread(encode_chat, [message.as_template_message() for message in body.messages])
        return await respond(request, body, [prompt], body.token_limit(), chat=True)

    app.include_router(v1)

    def check_model_name(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def check_request(body: GenerationRequest) -> None:
        check_model_name(body.model)
        body.refuse_unsupported()

    def encode(prompt: str | list[int], param: str) -> list[int]:
        try:
            ids = encode_prompt(tokenizer, prompt, model.config.vocab_size)  # as `qwen3 generate` does
        except UserError as error:
            raise APIError(400, str(error), param=param) from None
        if len(ids) >= scheduler.context:
            raise APIError(400, f"the {param} is {len(ids)} tokens long; this model's context is "
                                f"{scheduler.context} tokens, which leaves no room for a reply",
                           param=param, code="context_length_exceeded")
        return ids

    def encode_chat(messages: list[dict[str, str]]) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except UserError as error:
            raise APIError(400, str(error), param="messages") from None
        return encode(text, "messages")

    def sampling_params(body: GenerationRequest, prompt_ids: list[int], max_tokens: int | None,
                        chat: bool, choice: int) -> SamplingParams:
        room = scheduler.context - len(prompt_ids)
        if max_tokens is None:
            max_tokens = room if chat else min(COMPLETION_DEFAULT_MAX_TOKENS, room)
        elif max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        elif max_tokens > room:
            raise APIError(400, f"max_tokens is {max_tokens}, but the prompt is {len(prompt_ids)} tokens "
                                f"and the context {scheduler.context}: at most {room} tokens can be generated",
                           param="max_tokens", code="context_length_exceeded")
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
            min_p=body.min_p, repetition_penalty=body.repetition_penalty,
            # Choice i of a seeded request is what a request with seed + i gives on its own.
            seed=None if body.seed is None else body.seed + choice, stop=body.stop_list())
        try:
            return params.validate()
        except UserError as error:
            field = str(error).split()[0]
            raise APIError(400, str(error), param=field if field in SAMPLING_FIELDS else None) from None

    async def respond(request: Request, body: GenerationRequest, prompts: list[list[int]],
                      max_tokens: int | None, chat: bool) -> Response:
        """Queue one job per prompt and choice, then answer as JSON or as a stream of events."""
        if len(prompts) * body.n > scheduler.max_queue:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} is more sequences than this server "
                                f"queues at once ({scheduler.max_queue})", param="n")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        jobs = [Job(ids, sampling_params(body, ids, max_tokens, chat, choice), tokenizer, scheduler.device,
                    index=p * body.n + choice, events=events, loop=loop)
                for p, ids in enumerate(prompts) for choice in range(body.n)]
        try:
            scheduler.submit(jobs)
        except QueueFull as error:
            raise APIError(429, str(error), type="server_overloaded", code="queue_full") from None
        reply = Reply(chat, model_name, sum(len(ids) for ids in prompts), len(jobs))
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return JobStream(stream(reply, events, include_usage), scheduler, jobs)
        collecting = asyncio.ensure_future(collect(reply, events))
        watching = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            if not collecting.done():  # the client left (or the server is stopping)
                collecting.cancel()
                scheduler.cancel(jobs)
        if not collecting.done() or collecting.cancelled():
            return Response(status_code=499)  # nobody reads this: the client has gone
        return JSONResponse(collecting.result())

    return app


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

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def chunk(self, index: int, text: str, finish_reason: str | None, usage: bool,
              role: bool = False) -> dict[str, Any]:
        """A streamed `chat.completion.chunk` or `text_completion` object for one choice."""
        if self.chat:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "choices": [choice]}
        if usage:  # with include_usage, OpenAI sends "usage": null until the final usage chunk
            chunk["usage"] = None
        return chunk

    def final(self) -> dict[str, Any]:
        """The complete `chat.completion` or `text_completion` object."""
        choices = []
        for index, (pieces, reason) in enumerate(zip(self.texts, self.finish_reasons)):
            text = "".join(pieces)
            if self.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": reason})
            else:
                choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}


async def stream(reply: Reply, events: asyncio.Queue[Event], include_usage: bool) -> AsyncIterator[str]:
    """The SSE lines of a streamed response: a chunk per piece of text, usage, then [DONE]."""
    if reply.chat:
        for index in range(reply.choices):
            yield sse(reply.chunk(index, "", None, usage=include_usage, role=True))
    while reply.unfinished:
        event = await events.get()
        if event.error is not None:
            yield sse(APIError(500, event.error, type="server_error").body())
            return
        reply.record(event)
        yield sse(reply.chunk(event.index, event.text, event.finish_reason, usage=include_usage))
    if include_usage:
        yield sse({**reply.chunk(0, "", None, usage=True), "choices": [], "usage": reply.usage()})
    yield "data: [DONE]\n\n"


async def collect(reply: Reply, events: asyncio.Queue[Event]) -> dict[str, Any]:
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


async def read_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB")
    return bytes(body)


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 5000, api_key: str | None = None,
          max_batch: int = 16, device: str = "auto") -> None:
    """Serve the checkpoint at `path` (or a run folder's best/) until interrupted."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    if max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {max_batch}")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key must not be empty")
    folder = find_checkpoint(path)
    # A run folder's best/ or last/ is named after its run. (abspath, not resolve: a checkpoint is
    # a link to a hidden version folder whose name is not the checkpoint's.)
    absolute = Path(os.path.abspath(folder))
    model_name = absolute.parent.name if folder.name in ("best", "last") else absolute.name
    listener = bind(host, port)  # before loading the model, so a taken port fails at once
    engine = load_engine(folder, device=device)
    app = create_app(engine.model, engine.tokenizer, model_name, api_key=api_key, max_batch=max_batch)
    address = f"[{host}]" if ":" in host else host
    print(f"serving {model_name} on http://{address}:{listener.getsockname()[1]} "
          f"(chat page at /, OpenAI API at /v1)", file=sys.stderr)
    if not is_loopback(host) and api_key is None:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this machine "
              f"can use the model", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[listener])


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a UserError saying why the address cannot be used."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, protocol)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror or error}); "
                        f"is another server using it? Choose another with --port") from None
    return listener


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
