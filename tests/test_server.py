"""The HTTP server, driven through a real socket with the official `openai` client.

A tiny random model and a small trained tokenizer are saved once per session; a server runs in a
thread on a free 127.0.0.1 port. Greedy replies are compared with `Engine.generate` on the same
model, alone and under 16 concurrent streams. That server's model is float64: batching only
reorders floating-point sums, and in float64 a random model's argmax is not flipped by that, so
"equal to the sequential result" can be checked exactly. The command-line test serves the float32
checkpoint as users do and compares with `qwen3 generate`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F
import uvicorn

from qwen3 import cli
from qwen3.config import ModelConfig
from qwen3.data.tokenizer import load_tokenizer, train_tokenizer
from qwen3.errors import UserError
from qwen3.infer.engine import Engine
from qwen3.infer.sampling import SamplingParams
from qwen3.model.checkpoint import load_model, save_model
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.server.app import bind, create_app
from qwen3.server.scheduler import Scheduler
from qwen3.server.schemas import APIError, ChatRequest, CompletionRequest, parse_request
from qwen3.server.service import CompletionService

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "tiny"
CONTEXT = 192

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A small model learns to write one token at a time.",
    "In the beginning was the word, and the word was spoken softly by the river under the old bridge.",
    "Servers answer many clients at once; a batch of sequences shares one pass over the weights.",
    "Seven bakers baked bread at dawn, and the smell of it filled every street of the quiet town.",
    "Numbers like 42, 1024 and 3.14159 appear in text too, with punctuation: commas, dots; colons!",
] * 20


def make_checkpoint(folder: Path, context: int = CONTEXT) -> Path:
    """Save a random tiny Qwen3 of `context` tokens and a tokenizer trained on CORPUS as a checkpoint folder."""
    tokenizer = train_tokenizer(CORPUS, vocab_size=512)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=context, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    save_model(Qwen3ForCausalLM(config), folder, tokenizer=tokenizer)
    return folder


def memorize(model, tokenizer, prompt: str, reply: str) -> None:
    """Train `model` until greedy decoding of `prompt` gives `reply` then <|im_end|>."""
    start = len(tokenizer.encode(prompt))
    ids = torch.tensor([tokenizer.encode(prompt + reply + "<|im_end|>")])
    inputs, targets = ids[:, :-1], ids[0, start:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small only lose time to thread hand-offs
    model.train()
    try:
        for _ in range(300):
            logits = model(inputs)[0, start - 1:]  # the positions that predict the reply
            if bool((logits.argmax(dim=-1) == targets).all()):
                break
            optimizer.zero_grad()
            F.cross_entropy(logits, targets).backward()
            optimizer.step()
    finally:
        model.eval()
        torch.set_num_threads(threads)


class ServerThread:
    """uvicorn serving an app on a free 127.0.0.1 port from a background thread."""

    def __init__(self, app) -> None:
        self.app = app
        self.listener = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.listener]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="session")
def model(checkpoint: Path) -> Qwen3ForCausalLM:
    return load_model(checkpoint, dtype=torch.float64)


@pytest.fixture(scope="session")
def tokenizer(checkpoint: Path):
    return load_tokenizer(checkpoint)


@pytest.fixture(scope="session")
def generator(model, tokenizer) -> Engine:
    return Engine(model, tokenizer)


@pytest.fixture(scope="session")
def server(model, tokenizer) -> Iterator[ServerThread]:
    with ServerThread(create_app(Engine(model, tokenizer), MODEL_NAME, max_batch=16)) as running:
        yield running


@pytest.fixture(scope="session")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(max_tokens: int, **extra) -> dict:
    return {"model": MODEL_NAME, "max_tokens": max_tokens, "temperature": 0, **extra}


def reference(generator: Engine, prompt: str, max_tokens: int, **params):
    return generator.generate(prompt, SamplingParams(max_new_tokens=max_tokens, temperature=0, **params))


def test_health_models_and_page(server: ServerThread, client: openai.OpenAI) -> None:
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_NAME
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert httpx.get(f"{server.url}/static/{name}").status_code == 200
    # The page loads nothing from elsewhere.
    assert "http" not in page.text.replace(server.url, "")


def test_chat_matches_generate(client: openai.OpenAI, generator: Engine, tokenizer) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fox."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    expected = reference(generator, prompt, 40)

    reply = client.chat.completions.create(messages=messages, **greedy(40))
    assert reply.object == "chat.completion" and reply.model == MODEL_NAME and reply.id
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt)) == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens

    chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **greedy(40)))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.completion_tokens


def test_completions_match_generate(client: openai.OpenAI, generator: Engine) -> None:
    prompt = "The quick brown fox"
    expected = reference(generator, prompt, 30)
    reply = client.completions.create(prompt=prompt, **greedy(30))
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        expected.prompt_tokens, expected.completion_tokens)

    chunks = list(client.completions.create(prompt=prompt, stream=True, **greedy(30)))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason

    # max_tokens counts every token, and a length finish says so.
    short = client.completions.create(prompt=prompt, **greedy(3))
    assert short.usage.completion_tokens <= 3
    if short.usage.completion_tokens == 3:
        assert short.choices[0].finish_reason == "length"


def test_seeded_sampling_and_n(client: openai.OpenAI, generator: Engine) -> None:
    prompt = "Seven bakers"
    # top_k is one of the extras: the openai client sends it through extra_body.
    sampled = dict(model=MODEL_NAME, max_tokens=20, temperature=1.0, top_p=0.9, extra_body={"top_k": 50})
    expected = [generator.generate(prompt, SamplingParams(max_new_tokens=20, temperature=1.0, top_k=50,
                                                          top_p=0.9, seed=seed)).text for seed in (5, 6)]
    reply = client.completions.create(prompt=prompt, seed=5, n=2, **sampled)
    assert [c.index for c in reply.choices] == [0, 1]
    # Choice i of a seeded request is what seed + i gives alone.
    assert [c.text for c in reply.choices] == expected
    # Several prompts: choices are numbered prompt-major.
    batch = client.completions.create(prompt=[prompt, prompt], seed=5, **sampled)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [expected[0], expected[0]]


def test_stop_strings(client: openai.OpenAI, generator: Engine) -> None:
    prompt = "In the beginning"
    full = reference(generator, prompt, 40).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop, f"the reference text is too short to pick a stop string from: {full!r}"
    expected = full[:full.index(stop)]
    reply = client.completions.create(prompt=prompt, stop=stop, **greedy(40))
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(prompt=prompt, stop=[stop, "\x00never"], stream=True, **greedy(40)))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert reference(generator, prompt, 40, stop=[stop]).text == expected


def test_concurrent_streams_match_sequential(server: ServerThread, generator: Engine) -> None:
    prompts = [f"{CORPUS[i % 5][:12 + 3 * i]}" for i in range(16)]
    lengths = [24 + 5 * (i % 4) for i in range(16)]  # different lengths: rows leave at different steps
    expected = [reference(generator, p, n).text for p, n in zip(prompts, lengths)]
    scheduler = server.app.state.scheduler
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, scheduler.running)
            time.sleep(0.002)

    def run(i: int) -> str:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
            stream = c.completions.create(prompt=prompts[i], stream=True, **greedy(lengths[i]))
            return "".join(chunk.choices[0].text for chunk in stream)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(run, range(16)))
    finally:
        done.set()
        watcher.join()
    assert results == expected
    assert peak > 1, "the requests were never batched together"


BAD_REQUESTS = [
    # (path, body, status, param or None)
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "word " * (CONTEXT + 10)}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x " * CONTEXT}]},
     400, "messages"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": 12}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": [10 ** 9]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "n": 1000}, 400, "n"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "logprobs": 3}, 400, "logprobs"),
    ("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "robot", "content": "hi"}]},
     400, "messages"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {
            "name": "g"}}}, 400, "tool_choice"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
                              "chat_template_kwargs": {"enable_thinking": "yes"}}, 400, "chat_template_kwargs"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "tool", "content": "18 C"}]},
     400, "messages"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "n": 1.5}, 400, "n"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", b"\xff\xfe", 400, None),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS,
                         ids=[f"{i}-{r[0].rsplit('/', 1)[-1]}-{r[2]}" for i, r in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_an_openai_error(server: ServerThread, path: str, body, status: int, param) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_bad_input_through_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=CONTEXT + 1)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_full_queue_and_disconnect(tokenizer) -> None:
    # A wider model than the tiny one, so that a generation lasts a second or more, not milliseconds.
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(ModelConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=CONTEXT,
        tie_word_embeddings=False)).eval()
    app = create_app(Engine(model, tokenizer), MODEL_NAME, max_batch=1, max_queue=1)
    long = {"model": MODEL_NAME, "prompt": "The", "max_tokens": CONTEXT - 10, "temperature": 0,
            "stream": True}
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        scheduler = app.state.scheduler
        with http.stream("POST", "/v1/completions", json=long) as first:
            # Keep the iterator: dropping it would close the connection (a disconnect) at once.
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # it is running
            with http.stream("POST", "/v1/completions", json=long) as second:
                assert second.status_code == 200  # it waits in the queue
                third = http.post("/v1/completions", json={**long, "stream": False})
                assert third.status_code == 429, third.text
                assert third.json()["error"]["code"] == "queue_full" and third.headers["retry-after"]
        # Both clients left before their generations finished: the scheduler drops them and idles.
        deadline = time.monotonic() + 30
        while scheduler.stats()["cancelled"] < 2 or scheduler.running or scheduler.waiting:
            assert time.monotonic() < deadline, scheduler.stats()
            time.sleep(0.01)
        assert http.get("/health").json()["status"] == "ok"
        after = http.post("/v1/completions", json={**long, "stream": False, "max_tokens": 2})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] <= 2


def test_openapi_document_and_docs(server: ServerThread) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, answer in (("/v1/completions", "Completion"), ("/v1/chat/completions", "ChatCompletion")):
        operation = spec["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert body.rsplit("/", 1)[-1] in schemas
        assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(answer)
        assert "text/event-stream" in operation["responses"]["200"]["content"]
        for status in ("400", "404", "413", "429"):
            error = operation["responses"][status]["content"]["application/json"]["schema"]["$ref"]
            assert error.endswith("/ErrorResponse")
        assert "Retry-After" in operation["responses"]["429"]["headers"]
        assert "422" not in operation["responses"]
    request = schemas["CompletionRequest"]["properties"]
    assert request["model"]["enum"] == [MODEL_NAME]
    top_p = request["top_p"]["anyOf"][0]  # or null: the model's default
    assert top_p["exclusiveMinimum"] == 0 and top_p["maximum"] == 1
    # What an absent sampling field means for this model (its generation_config.json sets none).
    assert (request["temperature"]["default"], request["top_k"]["default"]) == (1.0, 0)
    # Swagger UI, served from here: the page and everything it loads come from this server.
    docs = httpx.get(f"{server.url}/docs")
    assert docs.status_code == 200 and "script-src 'self'" in docs.headers["content-security-policy"]
    assert "http" not in docs.text
    for asset in ("/docs/init.js", "/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
        assert httpx.get(server.url + asset).status_code == 200, asset
    # A wrong method is a 405 that says which methods the path has.
    wrong = httpx.put(f"{server.url}/v1/completions")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST" and wrong.json()["error"]["message"]


@pytest.mark.parametrize("field, values", [
    ("temperature", [-1e-9, 0.0, 2.0]), ("top_p", [0.0, 1e-9, 1.0, 1.0 + 1e-9]), ("top_k", [-1, 0, 50]),
    ("min_p", [-1e-9, 0.0, 1.0, 1.0 + 1e-9]), ("repetition_penalty", [0.0, 1e-9, 1.3]), ("seed", [-1, 0, 7]),
])
def test_request_ranges_are_those_of_sampling_params(field: str, values: list) -> None:
    """The request schema repeats SamplingParams.validate's ranges (for the OpenAPI document): the same."""
    for value in values:
        try:
            SamplingParams(**{field: value}).validate()
            valid = True
        except UserError:
            valid = False
        body = json.dumps({"model": MODEL_NAME, "prompt": "hi", field: value}).encode()
        try:
            parse_request(CompletionRequest, body)
            accepted = True
        except APIError as error:
            assert error.param == field
            accepted = False
        assert accepted == valid, (field, value)


def test_service_without_a_server(model, tokenizer) -> None:
    """The request handling is callable on its own: no app, no running scheduler."""
    service = CompletionService(Scheduler(Engine(model, tokenizer)), MODEL_NAME, api_key="k")
    assert service.models().data[0].context_length == CONTEXT
    assert service.encode("The quick", "prompt") == tokenizer.encode("The quick")
    assert service.encode("", "prompt") == [tokenizer.eos_token_id]  # an empty prompt starts a document
    failures = [
        (lambda: service.model_card("other"), 404, "model"),
        (lambda: service.encode([model.config.vocab_size], "prompt"), 400, "prompt"),
        (lambda: service.encode("word " * CONTEXT, "prompt"), 400, "prompt"),
        (lambda: service.check_api_key("Bearer wrong"), 401, None),
        (lambda: service.sampling_params(parse_request(CompletionRequest, b'{"model": "tiny", "prompt": "x"}'),
                                         [1] * 10, CONTEXT, chat=False, choice=0), 400, "max_tokens"),
    ]
    for call, status, param in failures:
        with pytest.raises(APIError) as caught:
            call()
        assert (caught.value.status, caught.value.param) == (status, param)
    service.check_api_key("Bearer k")
    request = parse_request(CompletionRequest, b'{"model": "tiny", "prompt": "x", "seed": 3, "n": 2}')
    params = [service.sampling_params(request, [1, 2], None, chat=False, choice=i) for i in range(2)]
    assert [p.seed for p in params] == [3, 4] and params[0].max_new_tokens == 16


def test_sampling_defaults_come_from_the_models_generation_config(model, tokenizer) -> None:
    released_like = {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    service = CompletionService(Scheduler(Engine(model, tokenizer, generation_config=released_like), max_batch=1),
                                MODEL_NAME)

    def settings(extra: dict) -> tuple:
        body = parse_request(CompletionRequest, json.dumps({"model": MODEL_NAME, "prompt": "x", **extra}).encode())
        params = service.sampling_params(body, [1], 5, chat=False, choice=0)
        return params.temperature, params.top_k, params.top_p, params.min_p, params.repetition_penalty

    assert settings({}) == (0.6, 20, 0.95, 0.0, 1.0)  # the model's, else the API's
    assert settings({"temperature": 0, "top_k": None, "min_p": 0.1}) == (0.0, 20, 0.95, 0.1, 1.0)
    with pytest.raises(UserError, match="top_k"):  # a broken generation_config.json stops the start
        CompletionService(Scheduler(Engine(model, tokenizer, generation_config={"top_k": 2.5}), max_batch=1),
                          MODEL_NAME)
    spec = create_app(Engine(model, tokenizer, generation_config=released_like), MODEL_NAME, max_batch=1).openapi()
    properties = spec["components"]["schemas"]["ChatRequest"]["properties"]
    assert [properties[name]["default"] for name in ("temperature", "top_k", "top_p", "min_p")] == [0.6, 20, 0.95, 0.0]
    assert "generation_config.json" in properties["temperature"]["description"]


def test_the_smallest_top_p_keeps_the_top_token(client: openai.OpenAI, generator: Engine) -> None:
    """top_p 5e-324 is in (0, 1] but 0 in float32: sampling still keeps the most likely token (it is
    greedy), as schemathesis found once "n": 1.0 let such a request through."""
    reply = client.completions.create(model=MODEL_NAME, prompt="The quick", max_tokens=8, top_p=5e-324, n=1.0)
    assert reply.choices[0].text == reference(generator, "The quick", 8).text


def test_integer_fields_take_numbers_without_a_fraction() -> None:
    """JSON Schema calls 1.0 an integer; the API takes it as one, and nothing else that is not."""
    def request(extra: dict) -> CompletionRequest:
        return parse_request(CompletionRequest, json.dumps({"model": MODEL_NAME, "prompt": [5.0, 6], **extra}).encode())

    body = request({"n": 2.0, "max_tokens": 3.0, "seed": 7.0, "top_k": 1.0})
    values = (body.n, body.max_tokens, body.seed, body.top_k, *body.prompt)
    assert values == (2, 3, 7, 1, 5, 6) and all(type(value) is int for value in values)
    for bad in ({"n": 1.5}, {"max_tokens": "3"}, {"n": True}, {"seed": -1.0}, {"prompt": [5.5]}):
        with pytest.raises(APIError) as caught:
            request(bad)
        assert caught.value.param == next(iter(bad))


def test_sequence_length_and_chat_default(model, tokenizer) -> None:
    """`max_seq_len` bounds each sequence and is the context the API states; a chat request without
    max_tokens gets `chat_max_tokens`, or what its context leaves when that is less."""
    scheduler = Scheduler(Engine(model, tokenizer), max_batch=2, max_seq_len=100)
    service = CompletionService(scheduler, MODEL_NAME, chat_max_tokens=50)
    assert service.models().data[0].context_length == 100 == scheduler.cache.max_len
    assert scheduler.describe_cache().startswith("KV cache: 2 slots x 100 tokens (--max-seq-len) = ")
    chat = parse_request(ChatRequest, b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}]}')
    assert service.sampling_params(chat, [1] * 10, None, chat=True, choice=0).max_new_tokens == 50
    assert service.sampling_params(chat, [1] * 80, None, chat=True, choice=0).max_new_tokens == 20
    with pytest.raises(APIError) as caught:
        service.encode([1] * 100, "prompt")
    assert caught.value.code == "context_length_exceeded"


def test_api_key(model, tokenizer) -> None:
    with ServerThread(create_app(Engine(model, tokenizer), MODEL_NAME, api_key="s3cret")) as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.get(f"{server.url}/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).completions.create(
                model=MODEL_NAME, prompt="hi", max_tokens=2)
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).choices
        # The page and the health check stay open; the page asks for the key itself.
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/").status_code == 200


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_cli_serve_matches_cli_generate(checkpoint: Path) -> None:
    """`qwen3 serve` (float32, as users run it) answers what `qwen3 generate` prints."""
    prompt, max_tokens = "Numbers like", 25
    # Both on the CPU in float32 (on a GPU machine `serve` would pick the GPU and bfloat16).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    port = free_port()
    serving = subprocess.Popen([sys.executable, "-m", "qwen3", "serve", str(checkpoint), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        generated = subprocess.run(
            [sys.executable, "-m", "qwen3", "generate", str(checkpoint), "--prompt", prompt,
             "--max-new-tokens", str(max_tokens), "--temperature", "0"],
            capture_output=True, text=True, env=env, timeout=120)
        assert generated.returncode == 0, generated.stderr
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/health")
                break
            except httpx.TransportError:
                assert serving.poll() is None, serving.stdout.read()
                assert time.monotonic() < deadline, "qwen3 serve did not start"
                time.sleep(0.1)
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = api.completions.create(prompt=prompt, **greedy(max_tokens))
        assert reply.choices[0].text == generated.stdout
    finally:
        serving.terminate()
        serving.wait(timeout=30)


def test_serve_script_without_a_checkpoint(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "serve_qwen3.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "python train_qwen3.py" in result.stderr and "Traceback" not in result.stderr


def test_cli_serve_taken_port(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["serve", str(checkpoint), "--port", str(taken.getsockname()[1])])
    assert exit_info.value.code == 2
    assert "--port" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--max-seq-len", "1"), ("--default-max-tokens", "0"), ("--max-batch", "0")])
def test_cli_serve_bad_sizes(checkpoint: Path, capsys: pytest.CaptureFixture, flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", str(checkpoint), "--port", "0", flag, value])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err
