"""Samples during training: recorded at the due evaluation steps, the same in two runs, shown in the
progress output, without changing the training (its RNG stream, exact resume, training mode), and
rendered as a chat turn in the sft stage."""

from __future__ import annotations

import pytest
import torch
from test_train import events, tiny, train_losses, write_corpus

from qwen3.config import ModelConfig, TrainConfig
from qwen3.data.kjv import OPENINGS
from qwen3.data.tokenizer import train_tokenizer
from qwen3.infer.engine import Engine
from qwen3.infer.sampling import SamplingParams
from qwen3.model.checkpoint import load_model
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.train.loop import train
from qwen3.train.samples import SAMPLE_TOKENS, generate_samples, openings
from qwen3.train.stages.pretrain import Pretraining
from qwen3.train.start import resume_configs

PROMPTS = ["The king", "A child"]
SAMPLED = dict(max_steps=30, log_interval=5, eval_interval=10, sample_interval=20, sample_prompts=PROMPTS)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("samples")
    return {"source": write_corpus(folder / "corpus.txt"), "cache": str(folder / "cache"), "root": folder}


@pytest.fixture(scope="module")
def sampled_run(shared):
    out = shared["root"] / "sampled"
    train(*tiny(shared, out, **SAMPLED))
    return out


def samples(out):
    return [(e["step"], e["samples"]) for e in events(out) if "samples" in e]


def test_samples_are_recorded_at_due_evaluations_the_same_in_every_run(sampled_run, shared, capsys):
    recorded = samples(sampled_run)
    # Evaluations at 10, 20, 30: samples at the multiple of sample_interval and at the last step.
    assert [step for step, _ in recorded] == [20, 30]
    for _, rows in recorded:
        assert [row["prompt"] for row in rows] == PROMPTS
        assert all(row["greedy"] and row["sampled"] for row in rows)
    again = shared["root"] / "again"
    train(*tiny(shared, again, **SAMPLED))
    assert samples(again) == recorded
    log = capsys.readouterr().err
    assert f"step 30 samples:\n  The king\n     greedy: {recorded[-1][1][0]['greedy'].strip()}" in log


def test_sampling_leaves_the_training_unchanged(sampled_run, shared, tmp_path):
    plain = tmp_path / "plain"
    train(*tiny(shared, plain, **{**SAMPLED, "sample_interval": 0}))
    assert samples(plain) == []
    assert train_losses(plain) == train_losses(sampled_run)
    ours, theirs = load_model(plain / "last"), load_model(sampled_run / "last")
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_with_samples_continues_exactly(sampled_run, shared, tmp_path):
    out = tmp_path / "run"
    stopped = train(*tiny(shared, out, **SAMPLED), should_stop=lambda step: step == 24)
    assert stopped.interrupted and [step for step, _ in samples(out)] == [20]
    train(*resume_configs(out), resume=True)
    assert samples(out) == samples(sampled_run)
    assert train_losses(out) == train_losses(sampled_run)


@pytest.fixture(scope="module")
def model_and_tokenizer(one_thread):
    tokenizer = train_tokenizer(["The king went to the city. A child walked with the king."] * 50, vocab_size=300)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         max_position_embeddings=64))
    return model.train(), tokenizer


def test_samples_draw_nothing_from_the_global_rng_and_restore_training_mode(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    before = torch.get_rng_state()
    rows = generate_samples(model, tokenizer, PROMPTS, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training
    assert rows == generate_samples(model, tokenizer, PROMPTS, seed=3)
    other_seed = generate_samples(model, tokenizer, PROMPTS, seed=4)
    assert [row["greedy"] for row in other_seed] == [row["greedy"] for row in rows]
    assert [row["sampled"] for row in other_seed] != [row["sampled"] for row in rows]


def test_sft_samples_continue_the_prompt_as_a_user_turn_of_the_chat_template(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rows = generate_samples(model, tokenizer, PROMPTS, seed=3, chat=True)
    engine = Engine(model, tokenizer)
    for row in rows:
        turn = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)
        assert turn.startswith("<|im_start|>user\n") and turn.endswith("<|im_start|>assistant\n")
        greedy = SamplingParams(max_new_tokens=SAMPLE_TOKENS, temperature=0.0)
        assert row["greedy"] == engine.generate(turn, greedy).text
    model.train()


def test_held_out_openings_take_each_texts_first_line_then_the_next_lines():
    texts = ["First line of the first text\nits second line\n", "\n  Another text, one line only  \n", "x"]
    assert openings(texts, count=4, words=3) == ["First line of", "Another text, one", "x", "its second line"]
    assert openings(["same words\nsame words\nnew"], count=3) == ["same words", "new"]  # distinct prompts


def test_pretraining_on_the_embedded_corpus_keeps_its_fixed_openings(tmp_path):
    tokenizer = train_tokenizer(["In the beginning God created the heaven and the earth."] * 20, vocab_size=300)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    stage = Pretraining.prepare(TrainConfig(cache_dir=str(tmp_path / "cache")), str(tmp_path / "tokenizer"), 256)
    assert stage.sample_prompts() == OPENINGS
