"""The chat page in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

The served model is the tiny random one of test_server.py, first taught (some tens of optimizer
steps on one conversation) to answer "Say hi" with markup, so the page really receives `<script>`
from the model and must show it as text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
import torch.nn.functional as F

from qwen3.checkpoint import load_model
from qwen3.engine import Engine
from qwen3.sampling import SamplingParams
from qwen3.server.app import create_app
from qwen3.tokenizer import load_tokenizer
from test_server import MODEL_NAME, ServerThread, make_checkpoint

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")]

# What the user types, and what the model is taught to answer to TRIGGER.
HOSTILE = '<script>window.pwned=1</script><b>bold</b><img src=x onerror="window.pwned=2">'
TRIGGER = "Say hi"
MODEL_MARKUP = "<script>window.pwned=3</script><b>x</b>"


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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    folder = make_checkpoint(tmp_path_factory.mktemp("browser") / "tiny")
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": TRIGGER}])
    memorize(model, tokenizer, prompt, MODEL_MARKUP)
    assert Engine(model, tokenizer).generate(prompt, SamplingParams(temperature=0)).text == MODEL_MARKUP
    with ServerThread(create_app(model, tokenizer, MODEL_NAME)) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server: ServerThread):
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.url)
    page.wait_for_function(f"document.getElementById('model').textContent.startsWith({MODEL_NAME!r})")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "30")
    yield page
    context.close()
    assert not errors, errors


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
    # 150 new tokens leave room for about 40 of conversation: the second message cannot carry the first turn.
    page.fill("#max_tokens", "150")
    send(page, "Hello")
    wait_until_idle(page)
    send(page, "Hello again")
    wait_until_idle(page)
    assert page.locator(".message.assistant").count() == 2
    assert page.locator(".message.forgotten").count() == 2  # the first question and its answer
    assert page.locator(".message.notice").count() == 0
