"""Chat fine-tuning: the loss mask is exact, every conversation format renders the same tokens, bad
input is a clear error, and `qwen3 sft` lowers the held-out reply loss, teaches the model to stop,
resumes exactly and runs under torchrun."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import torch
from transformers import AutoModelForCausalLM

from qwen3 import cli
from qwen3.config import ModelConfig, apply_overrides, preset
from qwen3.data import kjv
from qwen3.data.conversations import held_out, pack, read_conversations, render
from qwen3.data.kjv import CHAT_PROMPTS
from qwen3.data.sources import kjv_books
from qwen3.data.tokenizer import IM_END, train_tokenizer
from qwen3.errors import UserError
from qwen3.model.checkpoint import load_config, load_model, load_trainer_state, save_model
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.train.chat_scores import score_chat
from qwen3.train.loop import run, setup, train
from qwen3.train.start import resume_configs


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Who wrote Psalms?"},
    {"role": "assistant", "content": "David, mostly."},
    {"role": "user", "content": "And Ésaïe — ünïcode?"},
    {"role": "assistant", "content": "Isaiah: «the prophet»."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(kjv_books()[:6], vocab_size=512)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer, one_thread) -> Path:
    """A tiny random model with the tokenizer: what the fine-tuning tests start from."""
    folder = tmp_path_factory.mktemp("sft") / "base"
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id))
    save_model(model, folder, tokenizer=tokenizer)
    return folder


def test_the_loss_is_on_every_assistant_token_and_its_end_of_turn_token_only(tokenizer):
    rendered = render(tokenizer, CONVERSATION)
    # The template writes <|im_start|>role\ncontent<|im_end|>\n per message; each piece tokenizes alone.
    expected_ids, expected_learned = [], []
    for message in CONVERSATION:
        head = tokenizer.encode(f"<|im_start|>{message['role']}\n")
        content = tokenizer.encode(message["content"])
        close, newline = tokenizer.encode(IM_END), tokenizer.encode("\n")
        reply = message["role"] == "assistant"
        expected_ids += head + content + close + newline
        expected_learned += [False] * len(head) + [reply] * (len(content) + len(close)) + [False] * len(newline)
    assert rendered.ids == expected_ids
    assert rendered.learned == expected_learned
    learned_text = tokenizer.decode([i for i, learned in zip(rendered.ids, rendered.learned) if learned])
    assert learned_text == "David, mostly.<|im_end|>Isaiah: «the prophet».<|im_end|>"


def test_packed_rows_carry_the_mask_and_drop_conversations_longer_than_a_row(tokenizer):
    short = render(tokenizer, CONVERSATION[1:3])
    long = render(tokenizer, CONVERSATION)
    packed = pack([short, long, short, short], row_tokens=len(short.ids) * 2 + 1, pad_id=0)
    assert packed.too_long == 1 and packed.conversations == 3 and len(packed.rows) == 2
    targets = packed.targets()  # y: the next token where it is learned, else -100
    first = short.ids + short.ids
    assert packed.rows[0, :len(first)].tolist() == first
    learned = short.learned + short.learned + [False]
    assert targets[0].tolist() == [token if keep else -100 for token, keep in zip(first[1:] + [0], learned[1:])]
    assert (targets[1, len(short.ids) - 1:] == -100).all()  # the padding carries no loss


def write_formats(folder: Path) -> list[Path]:
    """One two-message conversation (with a system turn where the format has one) in every format."""
    system, user, assistant = (m["content"] for m in CONVERSATION[:3])
    records = {
        "messages.jsonl": {"messages": CONVERSATION[:3]},
        "sharegpt.jsonl": {"conversations": [{"from": "system", "value": system}, {"from": "human", "value": user},
                                             {"from": "gpt", "value": assistant}]},
        "array.json": [{"messages": CONVERSATION[:3]}],
    }
    paths = []
    for name, record in records.items():
        path = folder / name
        path.write_text(json.dumps(record) + "\n" if name.endswith(".jsonl") else json.dumps(record))
        paths.append(path)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{"messages": CONVERSATION[:3]}]),
                                folder / "messages.parquet")
    return paths + [folder / "messages.parquet"]


def test_every_format_loads_to_the_same_rendered_tokens(tokenizer, tmp_path):
    rendered = {path.name: render(tokenizer, read_conversations(path)[0].messages) for path in write_formats(tmp_path)}
    reference = render(tokenizer, CONVERSATION[:3])
    assert all(value == reference for value in rendered.values()), list(rendered)
    pair = tmp_path / "pair.jsonl"
    pair.write_text(json.dumps({"prompt": CONVERSATION[1]["content"], "completion": CONVERSATION[2]["content"]}))
    assert render(tokenizer, read_conversations(pair)[0].messages) == render(tokenizer, CONVERSATION[1:3])


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', r"bad\.jsonl, line 2: invalid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"line 2: the conversation has no assistant turn"),
    ('{"messages": [{"role": "function", "content": "x"}]}', r"line 2: message 1 has the unknown role 'function'"),
    ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]}',
     r"line 2: message 2 \(gpt\) is empty"),
    ('{"text": "plain"}', r"line 2: no conversation found \(fields: 'text'\)"),
])
def test_bad_conversations_are_errors_naming_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + line + "\n")
    with pytest.raises(UserError, match=message):
        read_conversations(path)


def test_qwen3_sft_with_bad_data_says_so_in_one_line_and_writes_nothing(base, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sft", str(base), "--data", str(path), "--out", str(tmp_path / "out"), "--set", "device=cpu"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"qwen3 sft: error: {path}, line 1: the conversation has no assistant turn, so nothing to learn"]
    assert not (tmp_path / "out" / "last").exists()


def arithmetic(path: Path, count: int = 300) -> str:
    """Short question-and-answer conversations: a --data file that renders in milliseconds."""
    lines = [json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                      {"role": "assistant", "content": f"{a + b}."}]})
             for a in range(count // 10) for b in range(10)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def sft_configs(base: Path, out: Path, **values):
    _, train_config = preset("sft")
    settings = dict(init_from=str(base), out_dir=str(out), device="cpu", dtype="float32", peak_flops=1e11,
                    seq_len=64, batch_size=4, warmup_steps=5, log_interval=2)
    settings.update(values)
    return apply_overrides(load_config(base), train_config, settings)


@pytest.mark.slow
def test_fine_tuning_on_the_embedded_set_lowers_the_reply_loss_and_teaches_the_model_to_stop(
        base, tmp_path, monkeypatch):
    monkeypatch.setattr(kjv, "TRAINING_VERSES", 1500)  # ~4,400 conversations: renders in seconds
    out = tmp_path / "run"
    result = train(*sft_configs(base, out, max_steps=60, eval_interval=60, seq_len=128))
    before, after = (score_chat(path, limit=90, max_new_tokens=16) for path in (base, out / "best"))
    assert after.reply_loss < before.reply_loss - 0.4, (before, after)
    assert after.end_of_turn_share > before.end_of_turn_share + 0.2, (before, after)  # 0 -> 0.33
    assert result.final_eval.loss == pytest.approx(result.best_val_loss)
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["sources"] == ["builtin:kjv-chat"] and run["data"]["val_conversations"] > 0
    samples = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"samples"' in line]
    assert [row["prompt"] for row in samples[-1]["samples"]] == CHAT_PROMPTS  # the embedded set's own questions


def test_an_interrupted_fine_tuning_resumed_ends_equal_to_an_uninterrupted_one(base, tmp_path):
    data = arithmetic(tmp_path / "sums.jsonl")
    settings = dict(data=[data], max_steps=12, eval_interval=6)
    reference = train(*sft_configs(base, tmp_path / "reference", **settings))
    stopped = train(*sft_configs(base, tmp_path / "run", **settings), should_stop=lambda step: step == 5)
    assert stopped.interrupted and stopped.step == 5
    cli.main(["train", "--resume", str(tmp_path / "run")])  # the stage and data come from the run
    ours, theirs = load_model(tmp_path / "run" / "last"), load_model(tmp_path / "reference" / "last")
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "run" / "run.json").read_text())["train"]["stage"] == "sft"
    assert reference.step == 12


def uneven(path: Path, count: int = 200) -> str:
    """Conversations with replies of 2 and 27 tokens, so packed rows hold unequal numbers of reply
    tokens: a mean per micro-batch or per process would weigh their tokens unequally."""
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Count to {n}, {name}."},
                                      {"role": "assistant", "content": " ".join(map(str, range(1, n + 1)))}]})
             for name in range(count // 2) for n in (1, 12)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_accumulated_micro_batches_learn_every_reply_token_equally(base, tmp_path):
    data = uneven(tmp_path / "counts.jsonl")
    whole = train(*sft_configs(base, tmp_path / "whole", data=[data], max_steps=3, batch_size=4, grad_accum=1))
    halves = train(*sft_configs(base, tmp_path / "halves", data=[data], max_steps=3, batch_size=2, grad_accum=2))
    for (name, a), b in zip(load_model(whole.out_dir / "last").state_dict().items(),
                            load_model(halves.out_dir / "last").state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), name
    losses = [[json.loads(line)["loss"] for line in (run.out_dir / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for run in (whole, halves)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_qwen3_eval_scores_a_fine_tuned_run_on_its_held_out_replies(base, tmp_path, capsys):
    result = train(*sft_configs(base, tmp_path / "run", data=[arithmetic(tmp_path / "sums.jsonl")], max_steps=4,
                                eval_interval=4))
    capsys.readouterr()
    cli.main(["eval", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    assert "held-out conversations" in printed
    assert f"loss:         {result.final_eval.loss:.4f} nats/token" in printed
    assert f"tokens:       {result.final_eval.tokens:,}" in printed


def test_two_processes_under_torchrun_fine_tune_like_one(base, tmp_path):
    data = uneven(tmp_path / "counts.jsonl")
    settings = dict(data=[data], max_steps=4, eval_interval=4, log_interval=1)
    single = train(*sft_configs(base, tmp_path / "single", **settings))
    flags = {k: v for k, v in sft_configs(base, tmp_path, **settings)[1].__dict__.items()
             if k in ("device", "dtype", "peak_flops", "seq_len", "batch_size", "warmup_steps", "log_interval",
                      "eval_interval")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "qwen3",
               "sft", str(base), "--data", data, "--out", str(tmp_path / "ddp"), "--max-steps", "4",
               *[arg for key, value in flags.items() for arg in ("--set", f"{key}={value}")]]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    single_events = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    ours = {e["step"]: e["loss"] for e in events if "loss" in e}
    theirs = {e["step"]: e["loss"] for e in single_events if "loss" in e}
    assert sorted(ours) == sorted(theirs) == [1, 2, 3, 4]
    # The ranks hold unequal numbers of reply tokens; each token still counts once in the step's loss.
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], abs=1e-5), step
    val = [e["val_loss"] for e in events if "val_loss" in e]
    assert val == [pytest.approx(single.best_val_loss, abs=1e-5)]
    # Rank 0 alone sampled at the last step, the first user turns of held-out conversations; the others went on.
    held = [c.messages[0]["content"] for c in read_conversations(data) if held_out(c, 0.1)][:3]
    assert len(held) == 3
    assert [(e["step"], [row["prompt"] for row in e["samples"]]) for e in events if "samples" in e] == [(4, held)]


def test_lora_trains_only_the_adapters_and_the_merged_checkpoint_computes_the_peft_models_logits(base, tmp_path):
    data = arithmetic(tmp_path / "sums.jsonl")
    out = tmp_path / "lora"
    state = setup(*sft_configs(base, out, data=[data], max_steps=6, eval_interval=6, adamw_lr=1e-2, lora_rank=4,
                               lora_targets=["q_proj", "v_proj", "down_proj"]))
    before = {name: p.detach().clone() for name, p in state.model.named_parameters()}
    run(state)
    changed = {name for name, p in state.model.named_parameters() if not torch.equal(p, before[name])}
    adapters = {name for name in before if ".lora_" in name}
    assert changed == adapters and len(adapters) == 2 * 3 * 2  # A and B, 3 targets, 2 layers
    input_ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft_logits = state.model.eval()(input_ids)
        merged = load_model(out / "last")
        assert (merged(input_ids) - peft_logits).abs().max() < 1e-5
        # A plain folder: transformers loads it; peft loads the adapter beside it onto the base.
        from peft import PeftModel  # imported here: it takes seconds, and only this test needs it

        reference = AutoModelForCausalLM.from_pretrained(out / "last", attn_implementation="eager").eval()
        assert (reference(input_ids).logits - peft_logits).abs().max() < 1e-4
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager"),
                                            out / "last" / "adapter").eval()
        assert (adapted(input_ids).logits - peft_logits).abs().max() < 1e-4


def test_an_interrupted_lora_run_resumed_ends_equal_to_an_uninterrupted_one(base, tmp_path):
    settings = dict(data=[arithmetic(tmp_path / "sums.jsonl")], max_steps=8, eval_interval=4, lora_rank=2)
    train(*sft_configs(base, tmp_path / "reference", **settings))
    train(*sft_configs(base, tmp_path / "run", **settings), should_stop=lambda step: step == 3)
    train(*resume_configs(tmp_path / "run"), resume=True)
    ours, theirs = (load_trainer_state(tmp_path / name / "last")["adapter"] for name in ("run", "reference"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert digest(tmp_path / "run" / "last" / "model.safetensors") == digest(
        tmp_path / "reference" / "last" / "model.safetensors")
