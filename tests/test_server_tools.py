"""Thinking and tool calls in the API: the prompt is what transformers renders for the same
conversation, a reply comes back as reasoning_content, content and tool_calls (streamed and whole),
and every request the checkpoint cannot honor is a clear 400.

The prompts are compared on our own folders (our chat template, always here) and on the
released-style folder (Qwen's template; skipped where its fixtures are missing). Replies are fixed
texts replayed through the reply assembly, and, through a real server and the openai client, what
a tiny model was taught to answer.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion as OpenAIChatCompletion
from openai.types.chat import ChatCompletionChunk as OpenAIChatCompletionChunk
from test_server import MODEL_NAME, ServerThread, make_checkpoint, memorize

from qwen3.data.tokenizer import Tokenizer, load_tokenizer
from qwen3.infer.engine import Engine, load_engine
from qwen3.infer.sampling import SamplingParams
from qwen3.model.checkpoint import load_model
from qwen3.server.app import create_app
from qwen3.server.reply import ChatReply, collect, stream
from qwen3.server.scheduler import Event, Scheduler
from qwen3.server.schemas import APIError, ChatRequest, parse_request
from qwen3.server.service import ChatPrompt, CompletionService

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


SYSTEM = {"role": "system", "content": "You are brief."}
ASK = {"role": "user", "content": "What is the weather in Paris, and the time?"}
CALLED = {"role": "assistant", "content": None, "reasoning_content": "I need both tools.",
          "tool_calls": [call("call_1", "get_weather", {"city": "Paris"}), call("call_2", "get_time", {})]}
RESULTS = [{"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
           {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "14:05"}]}]
CONVERSATIONS = {
    "system and user": {"messages": [SYSTEM, ASK]},
    "tools": {"messages": [SYSTEM, ASK], "tools": [WEATHER, TIME]},
    "tool calls and results": {"messages": [SYSTEM, ASK, CALLED, *RESULTS], "tools": [WEATHER, TIME]},
    "a call with text, then the answer": {"messages": [
        ASK, {**CALLED, "content": "Let me look.", "tool_calls": CALLED["tool_calls"][:1]}, RESULTS[0],
        {"role": "assistant", "content": "18 C and sunny.", "reasoning_content": "The tool said so."}],
        "tools": [WEATHER]},
    "reasoning in the history": {"messages": [
        {"role": "developer", "content": "Think first."}, {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two and two."},
        {"role": "user", "content": "And 3 + 3?"}]},
    "tool_choice none": {"messages": [ASK], "tools": [WEATHER], "tool_choice": "none"},
}


def as_transformers(request: dict) -> tuple[list[dict], list[dict] | None]:
    """The messages and tools transformers is given for a request: as sent, but a null content
    empty (the API renders it so; the released template cannot render a missing one) and a
    developer message a system one."""
    messages = copy.deepcopy(request["messages"])
    for message in messages:
        message["content"] = message["content"] if message["content"] is not None else ""
        if isinstance(message["content"], list):
            message["content"] = "".join(part["text"] for part in message["content"])
        message["role"] = "system" if message["role"] == "developer" else message["role"]
    return messages, None if request.get("tool_choice") == "none" else request.get("tools")


def service_for(engine: Engine) -> CompletionService:
    return CompletionService(Scheduler(engine, max_batch=1, max_seq_len=2048), MODEL_NAME)


def chat_request(body: dict) -> ChatRequest:
    return parse_request(ChatRequest, json.dumps({"model": MODEL_NAME, **body}).encode())


@pytest.fixture(scope="module")
def own_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tools") / "tiny", context=1024)


@pytest.fixture(scope="module")
def own_service(own_folder: Path) -> CompletionService:
    return service_for(load_engine(own_folder, device="cpu"))


@pytest.fixture(params=["own", "released"])
def folder_and_service(request: pytest.FixtureRequest, own_folder: Path, own_service: CompletionService):
    if request.param == "own":
        return own_folder, own_service
    folder = request.getfixturevalue("released_folder")
    return folder, service_for(load_engine(folder, device="cpu"))


@pytest.mark.parametrize("thinking", [None, True, False], ids=["default", "thinking", "no-thinking"])
def test_prompts_are_what_transformers_renders(folder_and_service, thinking: bool | None) -> None:
    from transformers import AutoTokenizer

    folder, service = folder_and_service
    theirs = AutoTokenizer.from_pretrained(folder)
    switch = {} if thinking is None else {"enable_thinking": thinking}
    for name, conversation in CONVERSATIONS.items():
        body = {**conversation, "chat_template_kwargs": switch}
        ours = service.chat_prompt(chat_request(body))
        messages, tools = as_transformers(body)
        expected = theirs.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                              **switch)
        assert ours.text == expected, name
        assert ours.ids == service.tokenizer.encode(expected) and ours.opening == ""
        assert not ours.in_thought
        assert ours.tools == (None if tools is None else {tool["function"]["name"] for tool in tools}), name
    assert "<tools>" not in service.chat_prompt(chat_request(CONVERSATIONS["tool_choice none"])).text


def test_a_forced_call_opens_the_reply(own_service: CompletionService) -> None:
    named = own_service.chat_prompt(chat_request({"messages": [ASK], "tools": [WEATHER, TIME], "tool_choice": {
        "type": "function", "function": {"name": "get_time"}}}))
    assert named.opening == '<tool_call>\n{"name": "get_time", "arguments": '
    assert own_service.tokenizer.decode(named.ids).endswith("<|im_start|>assistant\n" + named.opening)
    # The reply continues the opening: the parser reads the two as one call.
    delta = named.parser().push("{}}\n</tool_call>", final=True)
    assert [(c.name, c.arguments) for c in delta.tool_calls] == [("get_time", "{}")] and delta.content == ""
    required = own_service.chat_prompt(chat_request({"messages": [ASK], "tools": [WEATHER], "tool_choice": "required"}))
    assert required.opening == '<tool_call>\n{"name": "'
    delta = required.parser().push('get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', final=True)
    assert [(c.name, c.arguments) for c in delta.tool_calls] == [("get_weather", '{"city": "Oslo"}')]


def replay(prompt: ChatPrompt, pieces: list[str], finish: str = "stop") -> tuple[dict, list[dict]]:
    """A fixed reply, as the scheduler would send it, assembled whole and streamed: the JSON answer
    and the streamed chunks, each checked against the openai client's own types."""
    events = [Event(0, piece) for piece in pieces[:-1]] + [Event(0, pieces[-1], finish, len(pieces))]

    async def run() -> tuple[dict, list[str]]:
        queues = [asyncio.Queue(), asyncio.Queue()]
        for queue in queues:
            for event in events:
                queue.put_nowait(event)
        whole = await collect(ChatReply(MODEL_NAME, len(prompt.ids), 1, prompt.parser), queues[0])
        lines = [line async for line in stream(ChatReply(MODEL_NAME, len(prompt.ids), 1, prompt.parser),
                                               queues[1], include_usage=False)]
        return whole.model_dump(), lines

    whole, lines = asyncio.run(run())
    OpenAIChatCompletion.model_validate(whole)
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    for chunk in chunks:
        OpenAIChatCompletionChunk.model_validate(chunk)
    return whole, chunks


def streamed_message(chunks: list[dict]) -> dict:
    """The message a client assembles from the deltas."""
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    calls = [call for delta in deltas for call in delta.get("tool_calls") or []]
    return {"content": "".join(d.get("content") or "" for d in deltas),
            "reasoning_content": "".join(d.get("reasoning_content") or "" for d in deltas) or None,
            "tool_calls": [{key: c[key] for key in ("id", "type", "function")} for c in calls] or None,
            "indexes": [c["index"] for c in calls], "finish_reason": chunks[-1]["choices"][0]["finish_reason"]}


CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
REPLIES = {  # reply -> (reasoning_content, content, [(name, arguments)], finish_reason)
    "thinking and an answer": ("<think>\nShort question.\n</think>\n\nIt is sunny.",
                               ("Short question.", "It is sunny.", [], "stop")),
    "thinking and two calls": (f"<think>\nI need the tools.\n</think>\n\n{CALL_TEXT}\n"
                               + '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
                               ("I need the tools.", None, [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")],
                                "tool_calls")),
    "broken JSON": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
                    (None, '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', [], "stop")),
    "unknown tool": ('<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
                     (None, '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', [], "stop")),
    "thought cut short": ("<think>\nStill going", ("Still going", "", [], "length")),
}


@pytest.mark.parametrize("name", REPLIES)
def test_fixed_replies_streamed_and_whole(own_service: CompletionService, name: str) -> None:
    text, (reasoning, content, calls, finish) = REPLIES[name]
    prompt = own_service.chat_prompt(chat_request({"messages": [ASK], "tools": [WEATHER, TIME]}))
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]  # tags cut across pieces
    whole, chunks = replay(prompt, pieces, "length" if name == "thought cut short" else "stop")
    message, choice = whole["choices"][0]["message"], whole["choices"][0]
    assert (message["reasoning_content"], message["content"], choice["finish_reason"]) == (reasoning, content, finish)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"] or []] == calls
    streamed = streamed_message(chunks)
    assert streamed["content"] == (content or "") and streamed["reasoning_content"] == reasoning
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in streamed["tool_calls"] or []] == calls
    assert streamed["indexes"] == list(range(len(calls))) and streamed["finish_reason"] == finish
    # The reasoning never shows up in the content, nor a tag of a valid call.
    assert "<think>" not in (message["content"] or "") and (not calls or "<tool_call>" not in streamed["content"])


def test_without_tools_a_call_is_text(own_service: CompletionService) -> None:
    prompt = own_service.chat_prompt(chat_request({"messages": [ASK]}))
    whole, _ = replay(prompt, [CALL_TEXT])
    assert whole["choices"][0]["message"]["content"] == CALL_TEXT
    assert whole["choices"][0]["finish_reason"] == "stop"


THOUGHT_AND_CALL = f"<think>\nThe user asks for the weather.\n</think>\n\n{CALL_TEXT}"


@pytest.fixture(scope="module")
def taught_server(own_folder: Path):
    """A server whose model answers the weather question with THOUGHT_AND_CALL (greedy)."""
    model, tokenizer = load_model(own_folder), load_tokenizer(own_folder)
    prompt = service_for(Engine(model, tokenizer)).chat_prompt(chat_request({"messages": [ASK], "tools": [WEATHER]}))
    memorize(model, tokenizer, prompt.text, THOUGHT_AND_CALL)
    assert Engine(model, tokenizer).generate(prompt.ids, SamplingParams(temperature=0, max_new_tokens=120)).text \
        == THOUGHT_AND_CALL, "the model did not learn its reply"
    with ServerThread(create_app(Engine(model, tokenizer), MODEL_NAME)) as running:
        yield running


def test_a_taught_reply_through_the_openai_client(taught_server: ServerThread) -> None:
    client = openai.OpenAI(base_url=f"{taught_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    request = dict(model=MODEL_NAME, messages=[ASK], tools=[WEATHER], temperature=0, max_tokens=120)
    reply = client.chat.completions.create(**request)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == "The user asks for the weather."
    (made,) = choice.message.tool_calls
    assert made.id.startswith("call_") and made.function.name == "get_weather"
    assert json.loads(made.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(**request, stream=True))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [call for c in chunks for call in c.choices[0].delta.tool_calls or []]
    assert (reasoning, content) == ("The user asks for the weather.", "")
    assert [(c.index, c.function.name, c.function.arguments) for c in calls] == [
        (0, "get_weather", made.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The call and its result go back in the history, and the conversation goes on.
    history = [ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": made.id, "content": "18 C"}]
    follow_up = client.chat.completions.create(**{**request, "messages": history, "max_tokens": 5})
    assert follow_up.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_the_model_card_says_whether_it_can_think(own_service: CompletionService) -> None:
    assert own_service.model_card().thinking
    assert not service_for(Engine(own_service.scheduler.engine.model, plain_tokenizer(own_service))).model_card().thinking


def plain_tokenizer(service: CompletionService) -> Tokenizer:
    """The service's tokenizer with a ChatML template that has no thinking mode and no tools."""
    plain = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    plain += "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    return dataclasses.replace(service.tokenizer, chat_template=plain)


def test_what_a_template_cannot_do_is_a_400(own_service: CompletionService) -> None:
    app = create_app(Engine(own_service.scheduler.engine.model, plain_tokenizer(own_service)), MODEL_NAME)
    user = [{"role": "user", "content": "hi"}]
    cases = [({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs", "no thinking mode"),
             ({"tools": [WEATHER]}, "tools", "does not render tools")]
    with ServerThread(app) as server:
        for extra, param, words in cases:
            response = httpx.post(f"{server.url}/v1/chat/completions",
                                  json={"model": MODEL_NAME, "messages": user, "max_tokens": 2, **extra})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert (error["param"], error["code"]) == (param, "unsupported_parameter") and words in error["message"]
        # tools with tool_choice "none" stay out of the prompt, so such a template serves them.
        fine = httpx.post(f"{server.url}/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": user, "max_tokens": 2, "tools": [WEATHER], "tool_choice": "none"})
        assert fine.status_code == 200, fine.text


@pytest.mark.parametrize("body, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"namespace": 3}}, "messages"),  # the template cannot render with it
    ({"messages": [{"role": "assistant"}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages"),
    ({"messages": [{"role": "assistant", "tool_calls": [call("c", "get weather", {})]}]}, "messages"),
])
def test_bad_tool_and_thinking_requests(own_service: CompletionService, body: dict, param: str) -> None:
    with pytest.raises(APIError) as caught:
        own_service.chat_prompt(chat_request({"messages": [ASK], **body}))
    assert (caught.value.status, caught.value.param) == (400, param) and caught.value.message


@pytest.mark.parametrize("message", [
    {"role": "user", "content": "hi"}, {"role": "user"}, {"role": "user", "content": None},
    {"role": "developer", "content": [{"type": "text", "text": "x"}]}, {"role": "system", "content": "x", "tool_call_id": "c"},
    {"role": "user", "content": "x", "tool_calls": None}, {"role": "user", "content": "x", "reasoning_content": "r"},
    {"role": "assistant", "content": "x", "reasoning_content": "r"}, {"role": "assistant"},
    {"role": "assistant", "content": None, "tool_calls": [call("c", "f", {})]}, {"role": "assistant", "tool_calls": []},
    {"role": "assistant", "content": "", "tool_calls": []}, {"role": "assistant", "content": "x", "tool_call_id": "c"},
    {"role": "tool", "content": "18 C", "tool_call_id": "c"}, {"role": "tool", "content": "18 C"},
    {"role": "tool", "tool_call_id": "c"}, {"role": "tool", "content": "x", "tool_call_id": "c", "tool_calls": None},
])
def test_the_documented_message_rules_are_the_enforced_ones(message: dict) -> None:
    """The OpenAPI document states each role's rules (schemas.MESSAGE_ROLES) so that clients and
    fuzzers see them; a message is valid by the document exactly when the server accepts it."""
    jsonschema = pytest.importorskip("jsonschema_rs")  # schemathesis's validator
    schema = ChatRequest.model_json_schema(ref_template="#/$defs/{model}")
    documented = jsonschema.Draft202012Validator({**schema["$defs"]["Message"], "$defs": schema["$defs"]})
    try:
        chat_request({"messages": [message]})
        accepted = True
    except APIError as error:
        assert error.param == "messages"
        accepted = False
    assert documented.is_valid(message) == accepted
