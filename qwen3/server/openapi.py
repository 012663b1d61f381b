"""The API's description: the OpenAPI document at /openapi.json and Swagger UI at /docs.

The generation routes read their JSON body themselves (strictly, with a 4 MiB limit and OpenAI's
error shape, see schemas.py), so FastAPI cannot see their request models; `request_body` names them
and `install` adds their schemas to the document. Error answers are declared with the OpenAI error
model. Swagger UI comes from the swagger-ui-bundle-v2 package and is served from this server, not
a CDN: /docs works offline and under the page's Content-Security-Policy (no inline script, nothing
from other origins).
"""

from __future__ import annotations

import functools
from typing import Any

from fastapi import APIRouter, FastAPI, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from swagger_ui_bundle import swagger_ui_path

from qwen3.server.schemas import (API_SAMPLING_DEFAULTS, ChatCompletionChunk, ChatRequest, CompletionRequest,
                                  ErrorResponse)

DESCRIPTION = ("OpenAI-compatible completions and chat completions of one model, batched continuously. "
               "Every error is answered as `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`.")
# Models no route names as a JSON answer: the bodies the routes parse, and the streamed chat chunk.
EXTRA_MODELS = [(CompletionRequest, "validation"), (ChatRequest, "validation"),
                (ChatCompletionChunk, "serialization")]
REF = "#/components/schemas/{model}"

ERRORS = {
    400: "the body is not valid JSON, a field has the wrong type or an impossible value, the prompt "
         "does not fit the context (code `context_length_exceeded`), `tool_choice` names a function not "
         "in `tools`, or an option is not supported (code `unsupported_parameter`; also `enable_thinking` "
         "or `tools` where the model's chat template has no thinking mode or no tools)",
    401: "the server has an API key and the request does not carry it as `Authorization: Bearer <key>`",
    404: "no such model (code `model_not_found`)",
    413: "the body is larger than 4 MiB",
    429: "the waiting line is full (code `queue_full`): retry after `Retry-After` seconds",
    500: "the model failed while generating",
}

DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>qwen3 API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script></body>
</html>
"""
# validatorUrl null: Swagger UI would otherwise send the document to an outside validator.
DOCS_SCRIPT = """SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
                 validatorUrl: null, layout: "BaseLayout", presets: [SwaggerUIBundle.presets.apis]});
"""


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` entries of these error statuses, in the OpenAI error shape."""
    declared: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        declared[status] = {"model": ErrorResponse, "description": ERRORS[status]}
        if status == 429:
            declared[status]["headers"] = {"Retry-After": {
                "description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
    return declared


def generation_responses(answer: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A generation route's answers: JSON, or with `stream: true` server-sent events, and its errors."""
    events = (f"server-sent events, each `data: ` line a `{chunk.__name__}` JSON object (see the "
              f"schemas), the last `data: [DONE]`")
    # As OpenAPI 3.1 describes a stream: the schema of one event (its `data` field a JSON text).
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$ref": REF.format(model=chunk.__name__)}, {"$ref": REF.format(model=ErrorResponse.__name__)}]}}
    event = {"type": "object", "required": ["data"], "description": events,
             "properties": {"data": {"anyOf": [{"const": "[DONE]"}, data]}}}
    return {200: {"model": answer, "description": f"a `{answer.__name__}`, or with `stream: true` {events}",
                  "content": {"text/event-stream": {"schema": event}}},
            **errors(400, 404, 413, 429, 500)}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` declaring `model` as a route's JSON request body."""
    schema = {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, with EXTRA_MODELS and without FastAPI's 422 answers."""
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, definitions = models_json_schema(EXTRA_MODELS, ref_template=REF)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(definitions["$defs"])
    # FastAPI documents a 422 for every route with a parameter; here nothing answers 422 (the one
    # parameter is a path string, and bodies are validated into 400s).
    for operations in spec["paths"].values():
        for operation in operations.values():
            operation["responses"].pop("422", None)
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    # One model is served: its name is the one value `model` (and /v1/models/{name}) accepts, and its
    # sampling defaults (generation_config.json, else the API's) are what an absent field means.
    service = app.state.service
    defaults = {**API_SAMPLING_DEFAULTS, **service.sampling_defaults}
    for request in EXTRA_MODELS[:2]:
        properties = schemas[request[0].__name__]["properties"]
        properties["model"]["enum"] = [service.model_name]
        for name, value in defaults.items():
            properties[name]["default"] = value
    for parameter in spec["paths"]["/v1/models/{name}"]["get"]["parameters"]:
        parameter["schema"]["enum"] = [service.model_name]
    return spec


def cached_document(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        app.openapi_schema = document(app)
    return app.openapi_schema


router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def docs() -> HTMLResponse:
    return HTMLResponse(DOCS_PAGE)


@router.get("/docs/init.js")
async def docs_script() -> Response:
    return Response(DOCS_SCRIPT, media_type="text/javascript")


def install(app: FastAPI) -> None:
    """Serve /openapi.json (built on its first request) and Swagger UI at /docs."""
    app.openapi = functools.partial(cached_document, app)
    app.include_router(router)
    app.mount("/docs/assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")
