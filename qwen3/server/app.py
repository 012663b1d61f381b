"""The HTTP server: an OpenAI-compatible API and a web chat page over one continuous-batching scheduler.

Existing OpenAI clients, scripts and chat UIs can point at it: `/v1/completions` and
`/v1/chat/completions` take OpenAI's request shapes and answer with OpenAI's response shapes, as JSON
or as server-sent events. The routes here only read the request and hand it to the
`CompletionService` kept in `app.state` (service.py); the model belongs to the `Scheduler` thread.
Every problem with a request is answered as an OpenAI-style JSON error with a 4xx status; nothing a
client sends can stop the server. `/openapi.json` and `/docs` describe the API (openapi.py).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen3.errors import UserError, log, logger
from qwen3.infer.engine import Engine, load_engine, trained_checkpoint
from qwen3.model.checkpoint import run_name
from qwen3.server import openapi
from qwen3.server.scheduler import Scheduler
from qwen3.server.schemas import (APIError, ChatCompletion, ChatCompletionChunk, ChatRequest, Completion,
                                  CompletionRequest, Health, ModelCard, ModelList, parse_request)
from qwen3.server.service import CHAT_DEFAULT_MAX_TOKENS, CompletionService

STATIC = Path(__file__).with_name("static")
MAX_BODY_BYTES = 4 * 1024 * 1024

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


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_batch: int = 16,
               max_queue: int | None = None, max_seq_len: int | None = None,
               chat_max_tokens: int = CHAT_DEFAULT_MAX_TOKENS) -> FastAPI:
    """The FastAPI app serving `engine`'s model as `model_name`; its scheduler runs while the app is up.

    Up to `max_batch` sequences decode together and `max_queue` (default 4 x max_batch) more wait;
    beyond that requests are answered 429. Each sequence has `max_seq_len` positions (default: the
    model's context), all allocated at once (`Scheduler`); a chat request without max_tokens gets
    at most `chat_max_tokens`.
    """
    scheduler = Scheduler(engine, max_batch=max_batch, max_queue=max_queue or 4 * max_batch,
                          max_seq_len=max_seq_len)
    app = FastAPI(title="qwen3", version="1", description=openapi.DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler
    app.state.service = CompletionService(scheduler, model_name, api_key, chat_max_tokens)
    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.include_router(pages)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # The key guards /v1 only (the page asks for it itself); the document declares it when it is set.
    guarded = api_key is not None
    app.include_router(v1, dependencies=[Security(require_api_key)] if guarded else [],
                       responses=openapi.errors(401) if guarded else None)
    openapi.install(app)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.scheduler.start()
    yield
    app.state.scheduler.stop()


async def api_error(request: Request, error: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return JSONResponse(error.response().model_dump(), status_code=error.status, headers=headers)


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    # Starlette's own answers (404, 405 with its Allow header) in the same shape, headers kept.
    response = await api_error(request, APIError(error.status_code, str(error.detail)))
    response.headers.update(error.headers or {})
    return response


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    # A bug, not the client's fault: answered in the same shape (Starlette logs the traceback).
    return await api_error(request, APIError(500, "internal server error", type="server_error"))


def service(request: Request) -> CompletionService:
    return request.app.state.service


pages = APIRouter()


@pages.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@pages.get("/health")
async def health(request: Request) -> Health:
    """Liveness and load: the sequences decoding and waiting now. Never needs the API key."""
    return service(request).health()


BEARER = HTTPBearer(auto_error=False, description="the server's --api-key")


async def require_api_key(request: Request,
                          credentials: HTTPAuthorizationCredentials | None = Security(BEARER)) -> None:
    service(request).check_api_key(request.headers.get("authorization"))


v1 = APIRouter(prefix="/v1")


@v1.get("/models")
async def list_models(request: Request) -> ModelList:
    """The one model this server serves."""
    return service(request).models()


@v1.get("/models/{name:path}", responses=openapi.errors(404))
async def get_model(request: Request, name: str) -> ModelCard:
    """The served model's card, with its context length."""
    return service(request).model_card(name)


@v1.post("/completions", response_model=None, openapi_extra=openapi.request_body(CompletionRequest),
         responses=openapi.generation_responses(Completion, Completion))
async def completions(request: Request) -> Response:
    """Continue a prompt: text, a list of texts, token ids, or lists of them."""
    body = parse_request(CompletionRequest, await read_body(request))
    return await service(request).complete(request, body)


@v1.post("/chat/completions", response_model=None, openapi_extra=openapi.request_body(ChatRequest),
         responses=openapi.generation_responses(ChatCompletion, ChatCompletionChunk))
async def chat_completions(request: Request) -> Response:
    """Answer a conversation, rendered with the checkpoint's chat template."""
    body = parse_request(ChatRequest, await read_body(request))
    return await service(request).chat(request, body)


async def read_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB")
    return bytes(body)


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 5000, api_key: str | None = None,
          max_batch: int = 16, device: str = "auto", max_seq_len: int | None = None,
          chat_max_tokens: int = CHAT_DEFAULT_MAX_TOKENS, compile: bool = False, dtype: str = "auto",
          quantize: str | None = None) -> None:
    """Serve the checkpoint at `path` (or a run folder's best/) until interrupted."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    if max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {max_batch}")
    if max_seq_len is not None and max_seq_len < 2:
        raise UserError(f"--max-seq-len must be at least 2 (a prompt token and a reply), got {max_seq_len}")
    if chat_max_tokens < 1:
        raise UserError(f"--default-max-tokens must be at least 1, got {chat_max_tokens}")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key must not be empty")
    folder = trained_checkpoint(path)
    model_name = run_name(folder)  # a run folder's best/ or last/ is named after its run
    listener = bind(host, port)  # before loading the model, so a taken port fails at once
    engine = load_engine(folder, device=device, quantize=quantize, compile=compile, dtype=dtype)
    app = create_app(engine, model_name, api_key=api_key, max_batch=max_batch, max_seq_len=max_seq_len,
                     chat_max_tokens=chat_max_tokens)
    address = f"[{host}]" if ":" in host else host
    log(app.state.scheduler.describe_cache())
    log(f"serving {model_name} on http://{address}:{listener.getsockname()[1]} (chat page at /, OpenAI API at /v1)")
    if not is_loopback(host) and api_key is None:
        logger.warning(f"warning: listening on {host} without --api-key: anyone who can reach this machine "
                       f"can use the model")
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
