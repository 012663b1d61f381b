"""The chat page in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

The served model is the tiny random one of test_server.py, first taught (some tens of optimizer
steps on one conversation) to answer "Say hi" with markup, so the page really receives `<script>`
from the model and must show it as text. A second one has a context of SHORT_CONTEXT tokens, less
than the page's default Max tokens, as a `--preset tiny` model has. A third is taught to think and
then call a tool when it is asked about the weather with the tool in the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
from test_server import MODEL_NAME, ServerThread, make_checkpoint, memorize

from qwen3.data.tokenizer import load_tokenizer
from qwen3.infer.engine import Engine, load_engine
from qwen3.infer.sampling import SamplingParams
from qwen3.model.checkpoint import load_model
from qwen3.server.app import create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")]

# What the user types, and what the model is taught to answer to TRIGGER.
HOSTILE = '<script>window.pwned=1</script><b>bold</b><img src=x onerror="window.pwned=2">'
TRIGGER = "Say hi"
MODEL_MARKUP = "<script>window.pwned=3</script><b>x</b>"
SHORT_CONTEXT = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    folder = make_checkpoint(tmp_path_factory.mktemp("browser") / "tiny")
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": TRIGGER}])
    memorize(model, tokenizer, prompt, MODEL_MARKUP)
    assert Engine(model, tokenizer).generate(prompt, SamplingParams(temperature=0)).text == MODEL_MARKUP
    with ServerThread(create_app(Engine(model, tokenizer), MODEL_NAME)) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def wait_for_the_model(page) -> None:
    """Until the page has read the model's card. (A selector, not a waited-for function: Playwright
    evaluates those with eval, which the page's Content-Security-Policy forbids.)"""
    page.locator("#model", has_text=MODEL_NAME).wait_for()


@contextmanager
def open_page(browser, server: ServerThread) -> Iterator:
    """The chat page of `server` in a fresh browser context, connected, greedy; no script errors."""
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.url)
    wait_for_the_model(page)
    page.fill("#temperature", "0")
    yield page
    context.close()
    assert not errors, errors


@pytest.fixture
def page(browser, server: ServerThread):
    with open_page(browser, server) as page:
        page.fill("#max_tokens", "30")
        yield page


@pytest.fixture(scope="module")
def short_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("short") / "tiny", context=SHORT_CONTEXT)


@pytest.fixture(scope="module")
def short_server(short_checkpoint: Path) -> Iterator[ServerThread]:
    app = create_app(load_engine(short_checkpoint), MODEL_NAME)
    with ServerThread(app) as running:
        yield running


@pytest.fixture
def short_page(browser, short_server: ServerThread):
    """The page of the short-context model with its default Max tokens, which that context cannot hold."""
    with open_page(browser, short_server) as page:
        assert int(page.input_value("#max_tokens")) > SHORT_CONTEXT
        yield page


def api_reply(server: ServerThread, message: str, max_tokens: int) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": message}],
                                           temperature=0, top_p=1, max_tokens=max_tokens)
    return reply.choices[0].message.content


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_until_idle(page) -> None:
    page.wait_for_selector("#send:not([hidden])")
    page.wait_for_selector(".message.streaming", state="detached")


def test_chat_streams_a_reply(page, server: ServerThread) -> None:
    # Record every text the reply shows while it streams.
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const reply = document.querySelector('.message.assistant:last-child .content');
            if (reply && reply.textContent !== window.seen.at(-1)) window.seen.push(reply.textContent);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    send(page, "Hello there")
    wait_until_idle(page)
    reply = page.text_content(".message.assistant .content")
    assert reply == api_reply(server, "Hello there", 30)
    seen = page.evaluate("window.seen")
    assert len([text for text in seen if text]) > 1, f"the reply did not stream: {seen}"
    assert page.text_content(".message.user .content") == "Hello there"

    # The history goes with the next message, and survives a reload.
    send(page, "And again")
    wait_until_idle(page)
    assert page.locator(".message.assistant").count() == 2
    page.reload()
    assert page.locator(".message.user .content").all_text_contents()[-1] == "And again"


def test_markup_from_model_and_user_shows_as_text(page, server: ServerThread) -> None:
    page.fill("#max_tokens", "80")
    send(page, TRIGGER)  # the model answers with MODEL_MARKUP
    wait_until_idle(page)
    send(page, HOSTILE)
    wait_until_idle(page)
    assert page.locator(".message.user .content").all_text_contents() == [TRIGGER, HOSTILE]
    assert page.locator(".message.assistant .content").all_text_contents()[0] == MODEL_MARKUP
    assert page.locator("#messages b, #messages img, #messages script").count() == 0
    assert page.evaluate("window.pwned") is None


def test_stop_button(page, server: ServerThread) -> None:
    # Slow the page's network down so the reply is still arriving when Stop is pressed.
    session = page.context.new_cdp_session(page)
    session.send("Network.enable")
    session.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 200, "downloadThroughput": 300, "uploadThroughput": -1})
    page.fill("#max_tokens", "150")
    send(page, "Tell me a long story")
    page.wait_for_selector("#stop:not([hidden])")
    page.click("#stop")
    wait_until_idle(page)
    assert page.get_attribute(".message.assistant", "data-outcome") == "stopped"
    assert page.is_enabled("#input")


def test_long_conversation_forgets_oldest_turns(page) -> None:
    # Context 192, Max tokens 150: as in `qwen3 chat`, the history is kept while it leaves a reply
    # half the context (96 tokens); beyond that the oldest turns stop being sent.
    page.fill("#max_tokens", "150")
    send(page, "Hello")
    wait_until_idle(page)
    send(page, "Hello again")
    wait_until_idle(page)
    assert page.locator(".message.forgotten").count() == 0
    story = "Tell me a long story about the river and the old bridge " * 3  # 94 tokens as a chat prompt
    send(page, story)
    wait_until_idle(page)
    assert page.locator(".message.assistant").count() == 3
    assert page.locator(".message.forgotten").count() == 4  # both earlier questions and their answers
    assert page.locator(".divider + .message.user .content").text_content() == story
    assert page.locator(".message.notice").count() == 0


def record_chat_requests(page) -> list[tuple[dict, int]]:
    """(body, status) of every /v1/chat/completions request the page makes, in order."""
    requests: list[tuple[dict, int]] = []
    page.on("requestfinished", lambda request: requests.append((request.post_data_json, request.response().status))
            if request.url.endswith("/v1/chat/completions") else None)
    return requests


def test_short_context_replies_to_every_turn(short_page, short_checkpoint: Path) -> None:
    tokenizer = load_tokenizer(short_checkpoint)
    requests = record_chat_requests(short_page)
    questions = ["Hello", "Who are you?", "Tell me about the river", "And the bridge?", "Thanks"]
    for turn, question in enumerate(questions, start=1):
        send(short_page, question)
        wait_until_idle(short_page)
        assert short_page.locator(".message.notice").count() == 0
        assert short_page.locator(".message.user .content").all_text_contents() == questions[:turn]
        replies = short_page.locator(".message.assistant .content").all_text_contents()
        assert len(replies) == turn and replies[-1], f"turn {turn} got no reply: {replies}"
        # What the page last sent fits the context, reply included, and is what it shows as sent.
        body, status = requests[-1]
        assert status == 200
        prompt = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True)
        assert len(tokenizer.encode(prompt)) + body.get("max_tokens", 1) <= SHORT_CONTEXT
        sent = short_page.locator(".message:not(.forgotten):not(.notice) .content").all_text_contents()
        assert [message["content"] for message in body["messages"]] == sent[:-1]  # the last is the reply

    conversation = [{"role": "user" if index % 2 == 0 else "assistant", "content": text}
                    for index, text in enumerate(short_page.locator(".message .content").all_text_contents())]
    assert len(tokenizer.encode(tokenizer.apply_chat_template(conversation))) > SHORT_CONTEXT
    forgotten = short_page.locator(".message.forgotten")
    assert forgotten.count() >= 2
    assert "no longer fit" in short_page.text_content(".divider")
    short_page.reload()
    assert short_page.locator(".message.forgotten").count() == forgotten.count()
    assert short_page.locator(".divider").count() == 1


def test_message_too_long_for_the_context_stays_in_the_box(short_page) -> None:
    send(short_page, "Hello")
    wait_until_idle(short_page)
    long = "the quick brown fox " * SHORT_CONTEXT
    send(short_page, long)
    short_page.wait_for_selector(".message.notice")
    wait_until_idle(short_page)
    assert "too long for the model's 64-token context" in short_page.text_content(".message.notice")
    assert short_page.input_value("#input") == long
    assert short_page.locator(".message.user .content").all_text_contents() == ["Hello"]
    assert short_page.locator(".message.forgotten").count() == 0  # the history is as it was


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
THOUGHT = "The user wants the weather in Paris."
THINKING_REPLY = (f"<think>\n{THOUGHT}\n</think>\n\n"
                  '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    folder = make_checkpoint(tmp_path_factory.mktemp("thinking") / "tiny", context=1024)
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Weather?"}], tools=[WEATHER],
                                           enable_thinking=True)
    memorize(model, tokenizer, prompt, THINKING_REPLY)
    greedy = SamplingParams(temperature=0, max_new_tokens=150)
    assert Engine(model, tokenizer).generate(prompt, greedy).text == THINKING_REPLY
    with ServerThread(create_app(Engine(model, tokenizer), MODEL_NAME)) as running:
        yield running


def send_and_read_request(page, text: str) -> dict:
    """Send a message and wait for the reply; the body of the request that got it."""
    with page.expect_response(lambda response: response.url.endswith("/v1/chat/completions")) as answer:
        send(page, text)
    wait_until_idle(page)
    assert answer.value.status == 200
    return answer.value.request.post_data_json


def test_thinking_folded_above_the_answer_and_tool_calls_as_json(browser, thinking_server: ServerThread) -> None:
    with open_page(browser, thinking_server) as page:
        assert page.is_checked("#think")  # the model's template has a thinking mode: the switch shows
        page.fill("#tools", json.dumps([WEATHER]))
        page.fill("#max_tokens", "150")
        page.evaluate("""() => {
            window.thoughts = [];
            new MutationObserver(() => {
                const block = document.querySelector('.message.assistant:last-child .thinking');
                if (block) window.thoughts.push([block.querySelector('summary').textContent,
                                                 block.querySelector('.thinking-text').textContent, block.open]);
            }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
        }""")
        body = send_and_read_request(page, "Weather?")
        thoughts = page.evaluate("window.thoughts")
        streamed = {text for summary, text, _ in thoughts if summary == "Thinking…"}
        assert len(streamed) > 1 and THOUGHT.startswith(max(streamed, key=len)), thoughts  # streamed into it
        assert not any(opened for *_, opened in thoughts)  # folded all along
        assert page.text_content(".thinking summary") == "Thought"
        assert page.text_content(".thinking-text") == THOUGHT
        assert page.text_content(".message.assistant .content") == ""  # the reply is a call, no answer text
        calls = json.loads(page.text_content(".tool-calls"))
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
            ("get_weather", {"city": "Paris"})]
        assert body["chat_template_kwargs"] == {"enable_thinking": True} and body["tools"] == [WEATHER]

        # Thinking off from the next message; the thought and the call go back with the history.
        page.uncheck("#think")
        body = send_and_read_request(page, "Thanks")
        assert body["chat_template_kwargs"] == {"enable_thinking": False}
        assert body["messages"][1] == {"role": "assistant", "content": "", "reasoning_content": THOUGHT,
                                       "tool_calls": calls}
        page.reload()
        assert page.text_content(".thinking-text") == THOUGHT and not page.is_checked("#think")
        assert json.loads(page.text_content(".tool-calls")) == calls


def test_phone_width_layout(browser, server: ServerThread) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.goto(server.url)
    wait_for_the_model(page)
    # The settings panel starts closed so it does not cover the conversation; the top bar stays one line.
    assert not page.is_visible("#settings")
    assert page.get_attribute("#toggle-settings", "aria-expanded") == "false"
    bar = page.locator(".topbar").bounding_box()
    assert bar["height"] < 60, bar
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.click("#toggle-settings")
    assert page.locator("#settings").bounding_box()["y"] >= bar["height"]  # below the bar, not over it
    context.close()
