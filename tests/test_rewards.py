"""Rewards and the files reinforcement learning and DPO read: the built-in rewards, a user's
reward function found or refused before any work, a reward that fails or returns nonsense named
with its prompt, and prompts and preference pairs in the formats people have, or clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qwen3.data.prompts import read_pairs, read_prompts
from qwen3.errors import UserError
from qwen3.train.rewards import answer_text, book_reward, load_reward, math_reward, score
from qwen3.train.stages.rl import pass_at_k


@pytest.mark.parametrize("reply,answer,expected", [
    ("42", 42, 1.0), ("The answer is 41, no: 42.", "42", 1.0), ("\\boxed{1,234} and 7", 1234, 1.0),
    ("<think>maybe 7</think>\n\n12", 12, 1.0), ("<think>12</think>\n\n7", 12, 0.0), ("no number", 3, 0.0),
    ("-0.5", "-.5", 1.0), ("3.0", "3", 1.0),
])
def test_the_math_reward_reads_the_last_number_or_the_boxed_answer(reply, answer, expected):
    assert math_reward(reply, {"answer": answer}) == expected


def test_the_book_reward_wants_the_name_alone_after_any_thinking():
    assert book_reward("Genesis", {"answer": "Genesis"}) == 1.0
    assert book_reward("<think>Moses</think>\n\nGenesis ", {"answer": "Genesis"}) == 1.0
    assert book_reward("Genesis 1", {"answer": "Genesis"}) == 0.0
    assert answer_text("<think>\na\n</think>\n\nb") == "b"


def test_a_users_reward_is_imported_before_any_work_or_refused(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def yes(completion, record):\n    return completion.strip() == 'yes'\n"
                                            "def broken(completion, record):\n    return record['missing']\n"
                                            "def words(completion, record):\n    return 'many'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rewards:yes")(" yes", {}) is True
    with pytest.raises(UserError, match="cannot import nowhere_module"):
        load_reward("nowhere_module:reward")
    with pytest.raises(UserError, match="my_rewards has no function absent"):
        load_reward("my_rewards:absent")
    with pytest.raises(UserError, match="name a built-in reward \\(book, math\\) or a function as MODULE:FUNCTION"):
        load_reward("unknown")
    with pytest.raises(UserError, match="the reward raised KeyError: 'missing' on prompt 3 of p.jsonl"):
        score(load_reward("my_rewards:broken"), "x", {}, "prompt 3 of p.jsonl")
    with pytest.raises(UserError, match="the reward returned 'many' on prompt 1: it must return a finite number"):
        score(load_reward("my_rewards:words"), "x", {}, "prompt 1")
    assert score(load_reward("my_rewards:yes"), "yes", {}, "prompt 1") == 1.0
    sys.modules.pop("my_rewards", None)


def write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_prompts_end_with_a_user_turn_and_keep_their_fields(tmp_path):
    prompts = read_prompts(write(tmp_path / "p.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": 4}]))
    assert prompts == [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
                        "answer": 4}]
    for record, message in [({"messages": [{"role": "assistant", "content": "hi"}]}, "end with a assistant turn"),
                            ({"prompt": "2+2?"}, "line 1: expected a JSON object with a 'messages' list"),
                            ({"messages": [{"role": "user", "content": " "}]}, "messages message 1 \\(user\\) is empty"),
                            ({"messages": [{"role": "robot", "content": "x"}]}, "needs a role among")]:
        with pytest.raises(UserError, match=message):
            read_prompts(write(tmp_path / "bad.jsonl", [record]))


def test_pairs_in_trls_formats_and_their_mistakes(tmp_path):
    explicit = {"prompt": "Which book?", "chosen": "Genesis", "rejected": "Exodus"}
    conversational = {"prompt": [{"role": "user", "content": "Which book?"}],
                      "chosen": [{"role": "assistant", "content": "Genesis"}],
                      "rejected": [{"role": "assistant", "content": "Exodus"}]}
    implicit = {"chosen": [{"role": "user", "content": "Which book?"}, {"role": "assistant", "content": "Genesis"}],
                "rejected": [{"role": "user", "content": "Which book?"}, {"role": "assistant", "content": "Exodus"}]}
    pairs = read_pairs(write(tmp_path / "pairs.jsonl", [explicit, conversational, implicit]))
    assert pairs[0] == pairs[1] == pairs[2] == {key: conversational[key] for key in ("prompt", "chosen", "rejected")}
    for record, message in [({**explicit, "rejected": ""}, "'rejected' is empty"),
                            ({"prompt": "x", "chosen": "y"}, "expected a JSON object with 'chosen' and 'rejected'"),
                            ({**explicit, "prompt": [{"role": "assistant", "content": "x"}]},
                             "the prompt must end with a user turn")]:
        with pytest.raises(UserError, match=message):
            read_pairs(write(tmp_path / "bad.jsonl", [record]))


def test_pass_at_k_is_the_unbiased_estimate():
    assert pass_at_k(0, 8, 8) == 0.0 and pass_at_k(1, 8, 8) == 1.0
    assert pass_at_k(2, 10, 1) == pytest.approx(0.2)
    assert pass_at_k(2, 10, 3) == pytest.approx(1 - (8 * 7 * 6) / (10 * 9 * 8))
