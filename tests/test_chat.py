"""The demo and the interactive chat, driven the way a person at a terminal drives them."""

from __future__ import annotations

import dataclasses
import io
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_generate import build_checkpoint
from test_server import memorize

from qwen3.data.tokenizer import load_tokenizer
from qwen3.errors import UserError
from qwen3.infer.chat import ChatSession, run_chat
from qwen3.infer.demo import DEMO_PROMPTS, run_demo
from qwen3.infer.engine import Engine, load_engine
from qwen3.infer.sampling import SamplingParams
from qwen3.model.checkpoint import load_model, save_model

REPLY = SamplingParams(temperature=0, max_new_tokens=6)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CHAT = [sys.executable, "-m", "qwen3", "chat", "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", context=256)


@pytest.fixture(scope="module")
def engine(folder: Path) -> Engine:
    return load_engine(folder, device="cpu")


def expected_replies(engine: Engine, turns: list[str]) -> list[str]:
    """What the model answers to each turn, given the whole conversation before it."""
    messages, replies = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        replies.append(engine.generate(prompt, REPLY).text)
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


def test_multi_turn_chat_over_a_pipe(folder: Path, engine: Engine) -> None:
    turns = ["In the beginning", "And God said"]
    result = subprocess.run([*CHAT, str(folder)], input="\n".join(turns) + "\n/prompt\n",
                            capture_output=True, text=True, encoding="utf-8", timeout=120, env=ENV)
    assert result.returncode == 0, result.stderr
    first, second = expected_replies(engine, turns)
    # The second reply is the model's answer to the whole history, not to the second turn alone.
    alone = engine.generate(engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": turns[1]}]), REPLY).text
    assert second != alone
    assert f"bot> {first}\n" in result.stdout and f"bot> {second}\n" in result.stdout
    shown = result.stdout.split("you> ")[3]  # the answer to /prompt
    assert f"<|im_start|>user\n{turns[0]}<|im_end|>" in shown and f"user\n{turns[1]}" in shown
    assert result.stdout.endswith("bye\n")  # end of input (Ctrl-D) leaves cleanly


class Terminal:
    """A child process on a pseudo-terminal, read and typed into as a person would."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes the program, the pty its controlling terminal
            # as from a terminal's shell: Ctrl-C interrupts, even where the tests were started in the
            # background, which ignores SIGINT (and Python then installs no KeyboardInterrupt)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(argv[0], argv, ENV)
        self.output = ""

    def read_until(self, text: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"timed out waiting for {text!r}; got {self.output!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"terminal closed before {text!r}; got {self.output!r}")
            self.output += chunk.decode("utf-8", errors="replace")
        found, self.output = self.output.split(text, 1)[0] + text, self.output.split(text, 1)[1]
        return found

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def exit_code(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("the chat did not exit")


def test_chat_in_a_terminal_remembers_and_exits_on_ctrl_d(folder: Path, engine: Engine) -> None:
    terminal = Terminal([*CHAT, str(folder)])
    terminal.read_until("you> ")
    first, second = expected_replies(engine, ["Let there be light", "and there was"])
    terminal.type("Let there be light\n")
    assert f"bot> {first}" in terminal.read_until("you> ")
    terminal.type("/set temperature 0.5\n")
    assert "temperature = 0.5" in terminal.read_until("you> ")
    terminal.type("/set temperature 0\n")
    terminal.read_until("you> ")
    terminal.type("and there was\n")
    assert f"bot> {second}" in terminal.read_until("you> ")
    terminal.type("\x04")  # Ctrl-D on an empty line
    terminal.read_until("bye")
    assert terminal.exit_code() == 0


def test_ctrl_c_leaves_the_chat_cleanly(folder: Path) -> None:
    terminal = Terminal([*CHAT, str(folder)])
    terminal.read_until("you> ")
    # Ctrl-C: the terminal sends SIGINT. One that lands between the prompt being printed and
    # readline waiting for input is only noticed at the next signal, so press again as a person would.
    for attempt in range(5):
        terminal.type("\x03")
        try:
            terminal.read_until("bye", timeout=10)
            break
        except AssertionError:
            if attempt == 4:
                raise
    assert terminal.exit_code() == 0
    assert "Traceback" not in terminal.output


def test_history_is_trimmed_to_fit_the_context(engine: Engine) -> None:
    session = ChatSession(engine, SamplingParams(temperature=0, max_new_tokens=100))
    for turn in range(12):
        list(session.reply(f"turn {turn}: The LORD is my shepherd; I shall not want."))
        prompt_tokens = engine.last_completion.prompt_tokens
        assert prompt_tokens == len(engine.encode_prompt(session.last_prompt))  # nothing cropped
        assert prompt_tokens + min(100, engine.max_context // 2) <= engine.max_context
    assert session.messages[-2]["content"].startswith("turn 11")
    assert not any(m["content"].startswith("turn 0:") for m in session.messages)  # forgotten
    session.reset()
    assert session.messages == []


def test_commands(engine: Engine) -> None:
    session = ChatSession(engine, SamplingParams())
    assert "/reset" in session.command("/help")
    assert session.command("/set top_p 2") == "top_p must be in (0, 1], got 2.0"
    assert session.command("/set top_k many") == "top_k needs a number, got 'many'"
    assert session.command("/set seed 4") == "(seed = 4)" and session.params.seed == 4
    assert session.command("/set seed none") == "(seed = None)"
    assert "usage" in session.command("/set color blue")
    assert "top_p=1.0" in session.command("/show")
    assert "unknown command" in session.command("/frobnicate")
    assert session.command("/quit") is None
    session.command("/system Answer in verse.")
    list(session.reply("Hi"))
    assert session.last_prompt.startswith("<|im_start|>system\nAnswer in verse.<|im_end|>")
    session.command("/mode plain")
    list(session.reply("Next"))
    assert session.last_prompt.startswith("Hi") and session.last_prompt.endswith("\nNext")


THOUGHT, ANSWER = "The user greets me.", "Hello to you."


@pytest.fixture(scope="module")
def thinking_folder(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chat's model taught to think before it answers "Hi" (greedy)."""
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    reply = f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"
    memorize(model, tokenizer, prompt, reply)
    assert Engine(model, tokenizer).generate(prompt, SamplingParams(temperature=0, max_new_tokens=60)).text == reply
    taught = tmp_path_factory.mktemp("thinking") / "ckpt"
    save_model(model, taught, tokenizer=tokenizer)
    return taught


def test_thinking_is_kept_apart_from_the_answer(thinking_folder: Path) -> None:
    session = ChatSession(load_engine(thinking_folder, device="cpu"), SamplingParams(temperature=0, max_new_tokens=60))
    deltas = list(session.reply("Hi"))
    assert "".join(d.reasoning for d in deltas) == THOUGHT and "".join(d.content for d in deltas) == ANSWER
    assert session.messages[-1] == {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT}
    # In the next prompt the old turn is its answer alone, as the template renders a past turn.
    list(session.reply("And then?"))
    assert f"<|im_start|>assistant\n{ANSWER}<|im_end|>" in session.last_prompt and THOUGHT not in session.last_prompt


def test_think_and_no_think(engine: Engine) -> None:
    session = ChatSession(engine, REPLY)
    assert "thinking: the template's default" in session.command("/show")
    assert session.command("/no_think") == "(thinking off from the next reply)"
    list(session.reply("Hi"))
    assert session.last_prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "thinking: off" in session.command("/show")
    session.command("/think")
    list(session.reply("Again"))
    assert session.last_prompt.endswith("<|im_start|>assistant\n") and "thinking: on" in session.command("/show")
    plain = Engine(engine.model, dataclasses.replace(engine.tokenizer, chat_template=(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")))
    assert ChatSession(plain, REPLY).command("/think") == "this model's chat template has no thinking mode"
    with pytest.raises(UserError, match="no thinking mode"):
        ChatSession(plain, REPLY, thinking=False)


def test_thinking_over_a_pipe_and_with_no_think(thinking_folder: Path) -> None:
    chat = [*CHAT, "--max-new-tokens", "60", str(thinking_folder)]  # room for the thought and the answer
    result = subprocess.run(chat, input="Hi\n", capture_output=True, text=True, timeout=120, env=ENV)
    assert f"you> thinking> {THOUGHT}\nbot> {ANSWER}\n" in result.stdout, result.stdout
    result = subprocess.run([*chat, "--no-think"], input="Hi\n/show\n/prompt\n", capture_output=True, text=True,
                            timeout=120, env=ENV)
    assert "thinking> " not in result.stdout and "thinking: off" in result.stdout
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n" in result.stdout


def test_thinking_is_dimmed_in_a_terminal(thinking_folder: Path) -> None:
    terminal = Terminal([*CHAT, "--max-new-tokens", "60", str(thinking_folder)])
    terminal.read_until("you> ")
    terminal.type("Hi\n")
    shown = terminal.read_until("you> ")
    assert f"thinking> \x1b[2m{THOUGHT}\x1b[0m\r\nbot> {ANSWER}" in shown, repr(shown)
    terminal.type("/show\n")
    assert "thinking: the template's default" in terminal.read_until("you> ")
    terminal.type("\x04")
    terminal.read_until("bye")
    assert terminal.exit_code() == 0


def test_run_chat_with_text_streams(folder: Path) -> None:
    output = io.StringIO()
    run_chat(folder, REPLY, input_stream=io.StringIO("Hello\n/reset\n/quit\n"), output_stream=output,
             device="cpu")
    text = output.getvalue()
    assert text.count("bot> ") == 1 and "(conversation cleared)" in text and text.endswith("bye\n")


def test_demo_continues_the_five_prompts(folder: Path) -> None:
    output = io.StringIO()
    run_demo(folder, SamplingParams(max_new_tokens=4, seed=0), device="cpu", output_stream=output)
    text = output.getvalue()
    assert [line.split("] ", 1)[1].startswith(prompt)
            for line, prompt in zip(text.strip().split("\n\n"), DEMO_PROMPTS)] == [True] * 5


def test_no_checkpoint_says_how_to_train_one(tmp_path: Path) -> None:
    for run in (run_demo, run_chat):
        with pytest.raises(UserError, match="python train_qwen3.py"):
            run(tmp_path / "runs" / "seed")


def test_the_seed_chat_talks_to_the_fine_tuned_run_once_there_is_one(tmp_path, monkeypatch):
    from qwen3.infer.demo import DEFAULT_RUN, FINE_TUNED_RUN, default_chat_run

    monkeypatch.chdir(tmp_path)
    assert default_chat_run() == DEFAULT_RUN
    (FINE_TUNED_RUN / "best").mkdir(parents=True)
    (FINE_TUNED_RUN / "best" / "config.json").write_text("{}")
    assert default_chat_run() == FINE_TUNED_RUN
