"""The shapes of the OpenAI-compatible API: request bodies, responses, and the OpenAI error shape.

Requests are validated strictly (a number sent as a string, a float where an integer belongs, NaN or
an unknown role are refused) so a client learns about its mistake instead of getting a silently
coerced answer. The sampling fields carry the ranges `SamplingParams.validate` enforces, so that the
OpenAPI document states them and a bad value is reported with its field by pydantic; a test checks
that the two agree. Every failure becomes an `APIError`, which the app renders as
`{"error": {"message", "type", "param", "code"}}` with its HTTP status. The response models are the
ones the server builds its answers from, so the OpenAPI document describes what is really sent.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError


class APIError(Exception):
    """An error answered to the client in OpenAI's shape; never a traceback."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code))


class StrictModel(BaseModel):
    # Unknown fields are ignored (clients send many optional ones); known ones must have their type.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def integral(value: Any) -> Any:
    """A JSON number with no fraction as the integer it is: JSON Schema calls 1.0 an integer."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**constraints: Any) -> Any:
    """An integer field of the API (with pydantic's `Field` constraints): an int, or a float with no
    fraction; never a string or a bool. (The constraints must come before the conversion for the
    JSON schema to state them.)"""
    return Annotated[int, Field(**constraints), BeforeValidator(integral)]


class StreamOptions(StrictModel):
    include_usage: bool = False


StopString = Annotated[str, Field(min_length=1)]
TokenId = integer()

# The API's own sampling defaults, for what neither the request nor the model's generation_config.json
# sets (OpenAI's temperature and top_p; the extras off).
API_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def sampling(name: str, note: str = "", **constraints: Any) -> Any:
    """A sampling field: null or absent takes the model's generation_config.json value, else the API's."""
    return Field(None, description=f"{note}null or absent: the model's generation_config.json value, "
                                   f"else {API_SAMPLING_DEFAULTS[name]}", **constraints)


class GenerationRequest(StrictModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then three extras)."""

    # The ranges are SamplingParams.validate's (tests/test_server.py checks that they agree).
    model: str
    max_tokens: integer(ge=1) | None = None
    temperature: float | None = sampling("temperature", "0 is greedy; ", ge=0)
    top_p: float | None = sampling("top_p", gt=0, le=1)
    stop: StopString | list[StopString] | None = None
    seed: integer(ge=0, lt=2**63) | None = None  # seed + choice index must fit a torch seed
    n: integer(ge=1, le=16) = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: integer(ge=0) | None = sampling("top_k", "0 keeps every token; ")
    min_p: float | None = sampling("min_p", ge=0, le=1)
    repetition_penalty: float | None = sampling("repetition_penalty", "1 is none; ", gt=0)
    # OpenAI options this server cannot honor: accepted at their neutral value, refused otherwise.
    logprobs: bool | TokenId | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def sampling_settings(self) -> dict[str, Any]:
        """The sampling fields the request sets (None: not set), by SamplingParams' names."""
        return {name: getattr(self, name) for name in API_SAMPLING_DEFAULTS}

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def refuse_unsupported(self) -> None:
        for name, neutral in (("logprobs", (None, False, 0)), ("presence_penalty", (0.0,)),
                              ("frequency_penalty", (0.0,)), ("logit_bias", (None, {}))):
            if getattr(self, name) not in neutral:
                raise APIError(400, f"'{name}' is not supported by this server", param=name,
                               code="unsupported_parameter")


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: one prompt, or a batch, as text or token ids."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool = False
    suffix: str | None = None
    best_of: TokenId | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            prompts: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(item, int) for item in prompt):
            prompts = [prompt]  # one prompt given as token ids
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "'prompt' must not be empty", param="prompt")
        return prompts

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo or self.suffix or (self.best_of or 1) > 1:
            name = "echo" if self.echo else "suffix" if self.suffix else "best_of"
            raise APIError(400, f"'{name}' is not supported by this server", param=name,
                           code="unsupported_parameter")


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


# OpenAI's rule for function names; it also keeps a name from breaking the JSON a template writes it into.
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionCallParam(StrictModel):
    name: FunctionName
    arguments: str | dict[str, Any]  # OpenAI's JSON text; an object is rendered as JSON


class ToolCallParam(StrictModel):
    """A call an earlier assistant message made, sent back in the history."""

    id: str
    type: Literal["function"]
    function: FunctionCallParam


NULL, NOT_NULL = {"type": "null"}, {"not": {"type": "null"}}
# `Message.fits_its_role` as JSON Schema, so that the document states it (each branch a role).
MESSAGE_ROLES = {"anyOf": [
    {"properties": {"role": {"enum": ["system", "developer", "user"]}, "content": NOT_NULL, "reasoning_content": NULL,
                    "tool_calls": NULL, "tool_call_id": NULL}, "required": ["content"]},
    {"properties": {"role": {"const": "assistant"}, "tool_call_id": NULL},
     "anyOf": [{"properties": {"content": NOT_NULL}, "required": ["content"]},
               {"properties": {"tool_calls": {"type": "array", "minItems": 1}}, "required": ["tool_calls"]}]},
    {"properties": {"role": {"const": "tool"}, "content": NOT_NULL, "tool_call_id": NOT_NULL, "reasoning_content": NULL,
                    "tool_calls": NULL}, "required": ["content", "tool_call_id"]},
]}


class Message(StrictModel):
    """A message of the conversation. An assistant's may carry its thinking (`reasoning_content`, as
    the API returned it) and its `tool_calls`; a `tool` message answers the call `tool_call_id`."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, json_schema_extra=MESSAGE_ROLES)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def fits_its_role(self) -> Message:
        assistant = self.role == "assistant"
        if self.content is None and not (assistant and self.tool_calls):
            raise PydanticCustomError("message", f"a {self.role} message needs 'content'"
                                                 + (" or 'tool_calls'" if assistant else ""))
        if not assistant and (self.tool_calls is not None or self.reasoning_content is not None):
            raise PydanticCustomError("message", "only an assistant message has 'tool_calls' or 'reasoning_content'")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise PydanticCustomError("message", "a tool message, and only a tool message, needs 'tool_call_id'")
        return self

    def as_template_message(self) -> dict[str, Any]:
        """The message as chat templates read it: text parts joined (no content: ""), "developer"
        (OpenAI's new name for system) as system, the other fields where they are set."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(StrictModel):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments
    strict: bool | None = None


class Tool(StrictModel):
    """A function the model may call, listed in the prompt as the chat template writes it."""

    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(StrictModel):
    name: FunctionName


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: ToolChoiceFunction


class ChatTemplateKwargs(StrictModel):
    """Variables for the chat template: `enable_thinking` (Qwen3's thinking mode; only for a template
    that reads it), and any other the template reads, passed through."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    enable_thinking: bool | None = None

    def variables(self) -> dict[str, Any]:
        return {**(self.model_extra or {}),
                **({} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking})}


class ChatRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: integer(ge=1) | None = None  # OpenAI's newer name for max_tokens
    tools: list[Tool] | None = None
    # "auto" (the default): the model may call the tools; "none": they stay out of the prompt;
    # "required" or a named function: the reply is made to begin a call.
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- responses ---

FinishReason = Literal["stop", "length"]
ChatFinishReason = Literal["stop", "length", "tool_calls"]  # tool_calls: the reply holds a valid call


class ErrorDetail(BaseModel):
    message: str
    type: str  # "invalid_request_error", "server_overloaded" or "server_error"
    param: str | None  # the request field at fault, where there is one
    code: str | None  # e.g. "context_length_exceeded", "unsupported_parameter", "queue_full"


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer, and the event a stream ends with when generation fails."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None  # null only in a streamed chunk that does not end the choice


class Completion(BaseModel):
    """POST /v1/completions' answer; streamed, each event is one of these with one choice's new text
    (and, with `stream_options.include_usage`, `usage` null until a last chunk with no choices)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str  # "call_" and 24 random hex digits
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None  # the answer without the thinking; null when the reply is only tool calls
    reasoning_content: str | None = None  # the thinking, when the reply had any
    tool_calls: list[ToolCall] | None = None  # the valid calls of the request's tools


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: ChatFinishReason


class ChatCompletion(BaseModel):
    """POST /v1/chat/completions' answer."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallChunk(ToolCall):
    index: int  # the call's place among the choice's calls


class Delta(BaseModel):
    role: Literal["assistant"] | None = None  # in each choice's first chunk only
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None  # each call whole, once it is complete


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: ChatFinishReason | None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat completion: a choice's new text, or the final usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int  # prompt + completion tokens, at most
    thinking: bool  # whether chat_template_kwargs.enable_thinking is honored (the chat template reads it)


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    running: int  # sequences decoding now
    waiting: int  # sequences queued for a batch row
    max_batch: int
    cancelled: int  # sequences dropped unfinished because their client left, since the start


def parse_request(model: type[StrictModel], body: bytes) -> Any:
    """Validate a JSON body against `model`; any problem is a 400 naming the parameter."""
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise validation_error(error) from None


def validation_error(error: ValidationError) -> APIError:
    # The most specific problem: for a value matching no branch of a union (`stop: [""]`), the
    # error inside the branch it came closest to, not the first branch's type mismatch.
    first = max(error.errors(include_url=False), key=lambda problem: len(problem["loc"]))
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first['msg']})")
    location = first["loc"]
    if not location:
        return APIError(400, f"the request body must be a JSON object ({first['msg']})")
    # The path of field names and list indices, without the union-branch tags pydantic adds
    # (such as "str" or "list[int]"), e.g. messages[0].role.
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part[:1].isupper():
            continue  # the union branch a model was tried as (NamedToolChoice)
        elif part.isidentifier() and part not in ("str", "int", "float", "bool"):
            path += f".{part}" if path else part
        else:
            break
    if first["type"] == "missing":
        return APIError(400, f"'{path}' is required", param=str(location[0]))
    return APIError(400, f"invalid '{path}': {first['msg']}", param=str(location[0]))
