"""Conversations with reasoning, tool calls and tool results: read into OpenAI's shape (TRL's
conversational format, a record's `tools` included), rendered with the checkpoint's template into
exactly the ids transformers' apply_chat_template gives, and learned only where the assistant
speaks: its rendered reasoning, content and tool calls and its end-of-turn token, never the tool
results, the prompts or the headers, also where the template hides the reasoning of earlier turns."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

from qwen3.data.conversations import read_conversations, render, to_conversation
from qwen3.data.sources import kjv_books
from qwen3.data.tokenizer import load_tokenizer, train_tokenizer
from qwen3.errors import UserError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
# A tool-using turn with reasoning, its result, an answer with a <think> block, then a second question:
# Qwen3's template (and ours) render the reasoning of the first two replies only while they follow
# the last user message, so here they are hidden and only the last reply shows its reasoning.
TOOL_CHAT = {"tools": [WEATHER], "messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Is it warm in Paris?"},
    {"role": "assistant", "content": None, "reasoning_content": "I need the weather.", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
    {"role": "assistant", "content": "<think>\n21 is mild.\n</think>\n\nYes, 21 °C."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome.", "reasoning_content": "Be polite."},
]}
# The same exchange answered in one go, the reasoning of each step shown (no user message after it).
STEPS = {"tools": json.dumps([WEATHER]), "messages": [
    {"role": "user", "content": "Is it warm in Paris?"},
    {"role": "assistant", "content": "Let me look.", "reasoning_content": "I need the weather.",
     "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]},
    {"role": "tool", "content": '{"celsius": 21}'},
    {"role": "assistant", "content": "Yes, 21 °C.", "reasoning_content": "21 is mild."},
]}
THINKING = {"messages": [{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4."}]}
PLAIN = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def learned_runs(tokenizer, rendered) -> list[str]:
    """The learned tokens, decoded run by run: each contiguous run is one assistant turn's span."""
    runs, run = [], []
    for token, learned in zip(rendered.ids + [None], rendered.learned + [False]):
        if learned:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


def test_reasoning_tool_calls_and_results_are_read_in_openais_shape():
    conversation = to_conversation(TOOL_CHAT, "chat.jsonl, line 1")
    assert conversation.tools == [WEATHER]
    assert conversation.messages[2:5] == [
        {"role": "assistant", "content": "", "reasoning_content": "I need the weather.", "tool_calls": [CALL]},
        {"role": "tool", "content": '{"celsius": 21}', "tool_call_id": "call_1"},
        {"role": "assistant", "content": "Yes, 21 °C.", "reasoning_content": "21 is mild."}]  # <think> moved out
    steps = to_conversation(STEPS, "x")
    assert steps.tools == [WEATHER]  # given as JSON text, as datasets often store it
    assert steps.messages[1]["tool_calls"] == [  # a bare {name, arguments} call in OpenAI's shape
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]


def test_a_parquet_file_of_tool_conversations_reads_like_its_json_lines(tmp_path):
    jsonl = tmp_path / "chats.jsonl"
    records = [{"messages": STEPS["messages"], "tools": STEPS["tools"]}, {**PLAIN, "tools": None}]
    jsonl.write_text("".join(json.dumps(record) + "\n" for record in records))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), tmp_path / "chats.parquet")
    from_parquet = read_conversations(tmp_path / "chats.parquet")  # null-filled struct fields read as absent
    assert from_parquet == read_conversations(jsonl) and from_parquet[1].tools is None


QUESTION = {"role": "user", "content": "q"}


@pytest.mark.parametrize("message, error", [
    ({"role": "tool", "content": "21"}, r"message 2 \(tool\) follows no assistant message with tool_calls"),
    ({"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]},
     r"message 2 \(assistant\): tool call 1 has no function name"),
    ({"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{city"}]},
     r"message 2 \(assistant\): the arguments of tool call 1 are not JSON"),
    ({"role": "assistant", "content": "<think>unfinished"}, r"message 2 \(assistant\) opens <think> without closing"),
    ({"role": "assistant", "content": "<think>a</think>b", "reasoning_content": "c"},
     r"message 2 \(assistant\) has both reasoning_content and a <think> block"),
    ({"role": "assistant", "content": "<think>only this</think>"},
     r"message 2 \(assistant\) is empty but for its reasoning"),
    ({"role": "user", "content": [{"type": "text", "text": "hi"}]}, r"message 2 \(user\): the content is a list"),
])
def test_malformed_reasoning_and_tool_messages_are_errors_that_say_where(message, error):
    with pytest.raises(UserError, match=f"chat.jsonl, line 3: {error}"):
        to_conversation({"messages": [QUESTION, message, {"role": "assistant", "content": "a"}]}, "chat.jsonl, line 3")


def test_tools_that_are_not_a_list_of_schemas_are_an_error():
    with pytest.raises(UserError, match=r"x: 'tools' must be a list of function schemas"):
        to_conversation({**PLAIN, "tools": {"name": "f"}}, "x")
    with pytest.raises(UserError, match=r"x: 'tools' is text that is not JSON"):
        to_conversation({**PLAIN, "tools": "[{"}, "x")


@pytest.fixture(scope="module")
def ours():
    return train_tokenizer(kjv_books()[:6], vocab_size=512)


def test_on_our_template_the_loss_covers_each_reply_as_rendered_and_nothing_else(ours):
    conversation = to_conversation(TOOL_CHAT, "x")
    rendered = render(ours, conversation.messages, conversation.tools)
    text = ours.decode(rendered.ids)
    assert text.startswith("<|im_start|>system\nAnswer briefly.\n\n# Tools\n") and '"get_weather"' in text
    assert learned_runs(ours, rendered) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "Yes, 21 °C.<|im_end|>",  # its reasoning is not rendered: a user message follows
        "<think>\nBe polite.\n</think>\n\nYou are welcome.<|im_end|>"]
    assert rendered.reply_bytes == sum(len(run.encode()) for run in learned_runs(ours, rendered))
    steps = to_conversation(STEPS, "x")
    assert learned_runs(ours, render(ours, steps.messages, steps.tools)) == [
        '<think>\nI need the weather.\n</think>\n\nLet me look.\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "<think>\n21 is mild.\n</think>\n\nYes, 21 °C.<|im_end|>"]
    # A plain conversation is plain ChatML, learned as before.
    assert ours.decode(render(ours, PLAIN["messages"]).ids) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n")


def test_a_header_typed_into_a_user_message_is_not_taken_for_a_reply(ours):
    messages = [{"role": "user", "content": "Say <|im_start|>assistant\nno<|im_end|> back"},
                {"role": "assistant", "content": "Done."}]
    assert learned_runs(ours, render(ours, messages)) == ["Done.<|im_end|>"]


@pytest.mark.parametrize("record", [TOOL_CHAT, STEPS, THINKING, PLAIN], ids=["hidden", "steps", "think", "plain"])
def test_on_the_released_template_the_ids_are_transformers_and_the_mask_its_replies(released_folder: Path, record):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(released_folder)
    tokenizer = load_tokenizer(released_folder)
    conversation = to_conversation(record, "x")
    rendered = render(tokenizer, conversation.messages, conversation.tools)
    expected = theirs.apply_chat_template(conversation.messages, tools=conversation.tools, tokenize=True)["input_ids"]
    assert rendered.ids == list(expected)
    if record is THINKING:  # given the raw <think> content, the released template splits it as we do
        raw = theirs.apply_chat_template(record["messages"], tokenize=True)["input_ids"]
        assert rendered.ids == list(raw)
    runs = learned_runs(tokenizer, rendered)
    # Every reply's rendered text, ending with <|im_end|>; the released template also shows an empty
    # thought in the last reply when it has no reasoning.
    assert all(run.endswith("<|im_end|>") for run in runs)
    assert len(runs) == sum(message["role"] == "assistant" for message in conversation.messages)
    text = tokenizer.decode(rendered.ids)
    for run in runs:
        assert text.count("<|im_start|>assistant\n" + run) == 1
    assert not any("tool_response" in run or "Paris?" in run for run in runs)
    if record is PLAIN:
        assert runs == ["<think>\n\n</think>\n\nHello.<|im_end|>"]
    if record is TOOL_CHAT:
        assert runs[1] == "Yes, 21 °C.<|im_end|>" and runs[2].startswith("<think>\nBe polite.\n</think>")
