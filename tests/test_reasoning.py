"""Replies taken apart (qwen3/infer/reasoning.py): the thinking, the answer and the tool calls of fixed
outputs, whole and streamed in every way a stream can cut them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_server import CORPUS

from qwen3.data.tokenizer import CHAT_TEMPLATE, train_tokenizer
from qwen3.infer.engine import IncrementalDecoder
from qwen3.infer.reasoning import ReplyDelta, ReplyParser, leaves_thought_open, template_reads

TOOLS = ["get_weather", "get_time"]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
BROKEN = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
UNKNOWN = '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>'

# (reply, the prompt left a thought open, tools) -> (reasoning or None, content, [(name, arguments)])
CASES = {
    "thought then answer": ("<think>\nLet me think.\nTwo lines.\n</think>\n\nThe answer.", False, None,
                            ("Let me think.\nTwo lines.", "The answer.", [])),
    "no thought": ("Just an answer.\n", False, None, (None, "Just an answer.\n", [])),
    "thought opened by the prompt": ("Thinking here.\n</think>\n\nAnswer", True, None,
                                     ("Thinking here.", "Answer", [])),
    "thought cut short": ("<think>\nStill thinking\n\n", False, None, ("Still thinking", "", [])),
    "empty thought": ("<think>\n\n</think>\n\nHi", False, None, ("", "Hi", [])),
    "leading space before the thought": ("\n<think>x</think>y", False, None, ("x", "y", [])),
    "<think> later is text": ("I <think> so </think> too", False, None, (None, "I <think> so </think> too", [])),
    "look-alike tags": ("<thinking> and <tools> <tool_", False, TOOLS, (None, "<thinking> and <tools> <tool_", [])),
    "a call after thinking": (f"<think>\nThe user wants the weather.\n</think>\n\n{CALL}", False, TOOLS,
                              ("The user wants the weather.", "", [("get_weather", {"city": "Paris"})])),
    "answer and two calls": (f"Let me check.\n{CALL}\n" + CALL.replace("get_weather", "get_time")
                             .replace('{"city": "Paris"}', "{}") + "\n", False, TOOLS,
                             (None, "Let me check.", [("get_weather", {"city": "Paris"}), ("get_time", {})])),
    "no arguments": ('<tool_call>\n{"name": "get_time"}\n</tool_call>', False, TOOLS, (None, "", [("get_time", {})])),
    "calls not parsed without tools": (CALL, False, None, (None, CALL, [])),
    "broken JSON": (f"Sure.\n{BROKEN}", False, TOOLS, (None, f"Sure.\n{BROKEN}", [])),
    "unknown tool": (UNKNOWN, False, TOOLS, (None, UNKNOWN, [])),
    "arguments not an object": ('<tool_call>{"name": "get_time", "arguments": "now"}</tool_call>', False, TOOLS,
                                (None, '<tool_call>{"name": "get_time", "arguments": "now"}</tool_call>', [])),
    "name not a string": ('<tool_call>{"name": ["x"]}</tool_call>', False, TOOLS,
                          (None, '<tool_call>{"name": ["x"]}</tool_call>', [])),
    "unclosed call": ("<tool_call>\n{\"name\": \"get_time\"", False, TOOLS, (None, "<tool_call>\n{\"name\": \"get_time\"", [])),
    "a valid and a broken call": (f"{CALL}\n{BROKEN}", False, TOOLS,
                                  (None, f"\n{BROKEN}", [("get_weather", {"city": "Paris"})])),
    "text after a call": (f"{CALL}\nDone.", False, TOOLS, (None, "\nDone.", [("get_weather", {"city": "Paris"})])),
}


def summary(delta: ReplyDelta, parser: ReplyParser) -> tuple:
    return (delta.reasoning if parser.thought else None, delta.content,
            [(call.name, json.loads(call.arguments)) for call in delta.tool_calls])


def parsed(pieces: list[str], in_thought: bool, tools: list[str] | None) -> tuple:
    parser = ReplyParser(in_thought, tools)
    whole = ReplyDelta()
    for delta in parser.parse(pieces):
        whole.extend(delta)
    return summary(whole, parser)


@pytest.mark.parametrize("name", CASES)
def test_a_whole_reply(name: str) -> None:
    text, in_thought, tools, expected = CASES[name]
    parser = ReplyParser(in_thought, tools)
    assert summary(parser.push(text, final=True), parser) == expected


@pytest.mark.parametrize("name", CASES)
def test_a_streamed_reply_adds_up_to_the_whole_one(name: str) -> None:
    text, in_thought, tools, expected = CASES[name]
    assert parsed(list(text), in_thought, tools) == expected  # a character at a time
    for cut in range(len(text) + 1):
        assert parsed([text[:cut], text[cut:]], in_thought, tools) == expected, cut
        assert parsed([text[:cut], "", text[cut:cut + 3], text[cut + 3:]], in_thought, tools) == expected, cut


def test_streamed_tokens_of_our_tokenizer() -> None:
    """Our tokenizers spread the tags over several tokens: the pieces a decoder gives still parse whole."""
    tokenizer = train_tokenizer(CORPUS, vocab_size=512)
    for name, (text, in_thought, tools, expected) in CASES.items():
        decoder = IncrementalDecoder(tokenizer)
        pieces = [decoder.push(token) for token in tokenizer.encode(text)] + [decoder.flush()]
        assert "".join(pieces) == text and parsed(pieces, in_thought, tools) == expected, name


def test_streamed_tokens_of_the_released_tokenizer(released_folder: Path) -> None:
    """In the released tokenizer <think>, </think>, <tool_call> and </tool_call> are single tokens."""
    from qwen3.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(released_folder)
    assert len(tokenizer.encode("<think></think><tool_call></tool_call>")) == 4
    for name, (text, in_thought, tools, expected) in CASES.items():
        decoder = IncrementalDecoder(tokenizer)
        pieces = [decoder.push(token) for token in tokenizer.encode(text)] + [decoder.flush()]
        assert parsed(pieces, in_thought, tools) == expected, name


def test_only_what_is_settled_is_given_out() -> None:
    parser = ReplyParser(tools=TOOLS)
    assert parser.push("<thi") == ReplyDelta()  # may become <think>
    assert parser.push("nk>\nPlan") == ReplyDelta(reasoning="Plan")
    assert parser.push("\n</thi") == ReplyDelta()  # the newline is dropped if the thought ends
    assert parser.push("nk>\n\nOK.\n<tool") == ReplyDelta(content="OK.")  # the newline may precede a call
    assert parser.push('_call>\n{"name": "get_time"') == ReplyDelta()  # a call is given whole
    delta = parser.push("}\n</tool_call>")
    assert delta.content == "" and [call.name for call in delta.tool_calls] == ["get_time"]
    assert parser.push("\n", final=True) == ReplyDelta()


def test_tool_call_ids_are_openais_shape() -> None:
    parser = ReplyParser(tools=TOOLS)
    calls = parser.push(f"{CALL}\n{CALL}", final=True).tool_calls
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", call.id) for call in calls)
    assert calls[0].id != calls[1].id and calls[0].arguments == '{"city": "Paris"}'


def test_which_templates_think_and_where_the_thought_starts() -> None:
    assert template_reads(CHAT_TEMPLATE, "enable_thinking") and template_reads(CHAT_TEMPLATE, "tools")
    plain = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    assert not template_reads(plain, "enable_thinking") and not template_reads(None, "enable_thinking")
    assert not template_reads("{% if %}", "enable_thinking")  # unparsable: rendering says why
    user = "<|im_start|>user\nWhat is <think>?<|im_end|>\n"
    assert not leaves_thought_open(user + "<|im_start|>assistant\n")
    assert not leaves_thought_open(user + "<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off
    assert leaves_thought_open(user + "<|im_start|>assistant\n<think>\n")  # a template that opens it
    assert not leaves_thought_open("plain text, no turns")
