"""Generation: parity with transformers, cache and batch consistency, sampling, stops, streaming, CLI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3.config import ModelConfig
from qwen3.data.tokenizer import load_tokenizer, train_tokenizer
from qwen3.errors import UserError
from qwen3.infer.engine import Engine, IncrementalDecoder, load_engine
from qwen3.infer.sampling import BatchSampler, SamplingParams, StopChecker
from qwen3.model.checkpoint import save_model
from qwen3.model.decoder import Qwen3ForCausalLM

CORPUS = """In the beginning God created the heaven and the earth.
And the earth was without form, and void; and darkness was upon the face of the deep.
And God said, Let there be light: and there was light.
The LORD is my shepherd; I shall not want.
"""
GREEDY = SamplingParams(temperature=0, max_new_tokens=24)


def build_checkpoint(folder: Path, context: int = 128) -> Path:
    """A small random model of ours with a tokenizer trained on CORPUS. The large initializer
    spreads the logits so greedy choices are far from ties."""
    tokenizer = train_tokenizer([CORPUS] * 4, vocab_size=400)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=context, initializer_range=0.25)
    save_model(Qwen3ForCausalLM(config), folder, tokenizer=tokenizer)
    return folder


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("gen") / "ckpt")


@pytest.fixture(scope="module")
def engine(folder: Path) -> Engine:
    return load_engine(folder, device="cpu")


def transformers_greedy(folder: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    input_ids = torch.tensor([prompt_ids])
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                            max_new_tokens=max_new_tokens)
    return output[0, len(prompt_ids):].tolist()


def test_greedy_matches_transformers_on_our_checkpoint(folder: Path, engine: Engine) -> None:
    for prompt in ("In the beginning", "The LORD is"):
        ids = engine.tokenizer.encode(prompt)
        ours = engine.generate(ids, GREEDY).token_ids
        assert ours == transformers_greedy(folder, ids, GREEDY.max_new_tokens)


def test_greedy_matches_transformers_on_another_shape(tmp_path: Path, folder: Path) -> None:
    """A transformers-initialized Qwen3: head_dim != hidden/heads, one KV head, untied LM head."""
    transformers = pytest.importorskip("transformers")
    tokenizer = load_tokenizer(folder)
    config = transformers.Qwen3Config(
        vocab_size=tokenizer.vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=24, max_position_embeddings=96,
        tie_word_embeddings=False, rope_theta=50000.0, initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(1)
    transformers.Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = load_engine(tmp_path, device="cpu")
    assert not engine.model.config.tie_word_embeddings and engine.model.config.head_dim == 24
    ids = tokenizer.encode("And God said")
    ours = engine.generate(ids, GREEDY).token_ids
    assert ours == transformers_greedy(tmp_path, ids, GREEDY.max_new_tokens)


def test_cached_decoding_equals_recomputing(engine: Engine) -> None:
    ids = engine.tokenizer.encode("And the earth")
    cached = engine.generate(ids, GREEDY).token_ids
    sequence = list(ids)
    with torch.inference_mode():
        for _ in range(len(cached)):
            logits = engine.model(torch.tensor([sequence]))[0, -1]
            sequence.append(int(logits.argmax()))
    assert cached == sequence[len(ids):]


def test_batched_equals_one_by_one(engine: Engine) -> None:
    prompts = ["In", "And God said, Let there be light", "The LORD is my", [5, 6, 7, 8, 9, 10, 11]]
    batched = engine.generate_batch(prompts, GREEDY)
    for prompt, completion in zip(prompts, batched):
        single = engine.generate(prompt, GREEDY)
        assert completion.token_ids == single.token_ids
        assert completion.text == single.text
        assert completion.prompt_tokens == single.prompt_tokens


def test_rows_that_join_and_leave_a_cache_decode_as_each_prompt_alone(engine: Engine) -> None:
    """Prompts prefilled into the free slots of one cache at different times, then a row leaving
    and the last row moving into its slot (what the server's scheduler does as requests join and
    leave), decode exactly as each prompt alone."""
    prompts = ["In the beginning God", "And", "The LORD is my"]
    alone = [engine.generate(prompt, GREEDY).token_ids for prompt in prompts]
    states = [engine.sequence(engine.tokenizer.encode(prompt), GREEDY, GREEDY.max_new_tokens) for prompt in prompts]
    cache = engine.model.new_kv_cache(len(prompts), 64)
    _, first_tokens, _ = engine.prefill(states[:1], cache.slots(0, 1))
    _, second_tokens, _ = engine.prefill(states[1:], cache.slots(1, 3))
    tokens = torch.cat([first_tokens, second_tokens])
    for state, token in zip(states, tokens.tolist()):
        state.add(token)
    assert cache.length == max(len(s.context) for s in states) - 1  # the last token is not cached yet
    rows, sampler, running = [0, 1, 2], engine.sampler(states), cache
    for step in range(1, GREEDY.max_new_tokens):
        if step == 5:  # the middle row leaves; the last moves into its slot
            cache.copy_slot(1, cache, 2)
            running, rows, tokens = cache.slots(0, 2), [0, 2], tokens[[0, 2]]
            sampler = engine.sampler([states[row] for row in rows])
        tokens = engine.decode(running, tokens, sampler)
        for row, token in zip(rows, tokens.tolist()):
            states[row].add(token)
    assert [s.token_ids for s in states] == [alone[0], alone[1][:5], alone[2]]


def test_batch_takes_per_prompt_params(engine: Engine) -> None:
    short = SamplingParams(temperature=0, max_new_tokens=3)
    batched = engine.generate_batch(["In the", "And"], [short, GREEDY])
    assert [c.completion_tokens for c in batched] == [3, GREEDY.max_new_tokens]
    assert batched[0].finish_reason == "length"
    with pytest.raises(UserError, match="2 prompts but 1"):
        engine.generate_batch(["a", "b"], [short])


def test_same_seed_gives_the_same_sample(engine: Engine) -> None:
    def sample(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=seed, max_new_tokens=20)
        return engine.generate("In the beginning", params).token_ids

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    batch = engine.generate_batch(["a", "b"], SamplingParams(temperature=1.0, seed=3, max_new_tokens=8))
    again = engine.generate_batch(["a", "b"], SamplingParams(temperature=1.0, seed=3, max_new_tokens=8))
    assert [c.token_ids for c in batch] == [c.token_ids for c in again]


def sample_once(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                previous: list[list[int]]) -> torch.Tensor:
    """One sampling step of a batch whose sampler is built for it alone."""
    return BatchSampler(params, generators, previous, logits.shape[-1], logits.device)(logits)


def test_sampling_filters() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(400, 1)
    previous = [[]] * 400

    def draw(**fields: float) -> set[int]:
        params = [SamplingParams(temperature=1.0, **fields)] * 400
        return set(sample_once(logits, params, [None] * 400, previous).tolist())

    assert draw() == {0, 1, 2, 3, 4}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.5) == {0}  # p(token 0) = 0.64 already reaches 0.5
    assert draw(top_p=0.8) == {0, 1}  # 0.64 + 0.24
    assert draw(min_p=0.3) == {0, 1}  # p1 / p0 = e^-1 = 0.37; p2 / p0 = 0.14
    row = logits[:1]
    greedy = SamplingParams(temperature=0)
    assert sample_once(row, [greedy], [None], [[]]).tolist() == [0]
    penalized = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample_once(row, [penalized], [None], [[0]]).tolist() == [1]  # 3/2 < 2
    # Greedy and sampled rows mix in one batch; a generator makes its row reproducible.
    mixed = [greedy, SamplingParams(temperature=1.0)]
    rngs = [None, torch.Generator().manual_seed(0)]
    first = sample_once(logits[:2], mixed, rngs, [[], []])
    rngs = [None, torch.Generator().manual_seed(0)]
    assert torch.equal(sample_once(logits[:2], mixed, rngs, [[], []]), first)
    assert first[0] == 0


def test_batch_sampler_over_many_steps_equals_a_fresh_sampler_each_step() -> None:
    """Settings built once and the seen ids kept as a device mask that each sampled token joins give
    the tokens that a sampler built from the whole history at every step gives."""
    torch.manual_seed(0)
    vocab, steps = 50, 20
    params = [SamplingParams(temperature=0, repetition_penalty=1.5),
              SamplingParams(temperature=0.9, top_k=10, repetition_penalty=1.3, seed=1),
              SamplingParams(temperature=1.2, top_p=0.8, min_p=0.05, seed=2),
              SamplingParams(temperature=0.7, repetition_penalty=2.0, seed=3)]
    prompts = [[1, 2, 3], [4], [5, 6], [7, 7, 8]]

    def rngs() -> list[torch.Generator | None]:
        return [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in params]

    logits = torch.randn(steps, len(params), vocab) * 3
    sampler, fresh_rngs = BatchSampler(params, rngs(), prompts, vocab, "cpu"), rngs()
    history = [list(prompt) for prompt in prompts]
    for step in range(steps):
        tokens = sampler(logits[step])
        assert torch.equal(tokens, sample_once(logits[step], params, fresh_rngs, history))
        for ids, token in zip(history, tokens.tolist()):
            ids.append(token)
    assert history[0][3:] != [int(row[0].argmax()) for row in logits]  # the penalty took effect


def test_sampling_params_validation() -> None:
    for field, value in [("top_p", 0.0), ("temperature", -1), ("top_k", -2), ("max_new_tokens", 0),
                         ("min_p", 2.0), ("repetition_penalty", 0), ("seed", "x"), ("stop", "end")]:
        with pytest.raises(UserError, match=field):
            SamplingParams(**{field: value}).validate()
    assert SamplingParams.resolve({"temperature": 0, "other": 1}).temperature == 0


def test_stop_string_ends_the_text_before_it(engine: Engine) -> None:
    full = engine.generate("In the beginning", GREEDY)
    start = next(i for i in range(4, len(full.text) - 3) if "\ufffd" not in full.text[i:i + 3])
    stop = full.text[start:start + 3]
    stopped = engine.generate("In the beginning", SamplingParams(temperature=0, max_new_tokens=24, stop=[stop]))
    assert stopped.text == full.text[:full.text.index(stop)]
    assert stopped.finish_reason == "stop"
    streamed = "".join(engine.stream("In the beginning", SamplingParams(temperature=0, stop=[stop])))
    assert streamed == stopped.text


def test_stop_token_ends_generation(engine: Engine) -> None:
    full = engine.generate("And", GREEDY)
    stop_id = full.token_ids[3]
    stopped = engine.generate("And", SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=[stop_id]))
    assert stopped.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]
    assert stopped.finish_reason == "stop"
    assert full.finish_reason == "length" and full.completion_tokens == GREEDY.max_new_tokens


def test_stop_checker_holds_back_a_possible_start() -> None:
    checker = StopChecker(["\nUser:", "END"])
    assert checker.push("Hello\nUs") == ("Hello", False)
    assert checker.push("ual") == ("\nUsual", False)
    assert checker.push(" fine E") == (" fine ", False)
    assert checker.push("ND of it") == ("", True)
    checker = StopChecker(["END"])
    assert checker.push("almost EN") == ("almost ", False)
    assert checker.flush() == "EN"
    assert StopChecker([]).push("anything") == ("anything", False)


def test_streaming_never_splits_a_multibyte_character(engine: Engine) -> None:
    tokenizer = engine.tokenizer
    text = "Grüße 😀 日本語 ok"  # none of it in the tokenizer's corpus: byte-level pieces
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # characters really are split across tokens
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(token) for token in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    # Through the engine: the pieces are the completion's text.
    pieces = list(engine.stream("In", SamplingParams(temperature=0, max_new_tokens=30)))
    assert "".join(pieces) == engine.last_completion.text


def test_long_prompt_is_cropped_with_a_warning(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    context = engine.max_context
    long_prompt = list(range(10, 10 + 2 * context))
    with caplog.at_level(logging.WARNING, logger="qwen3.infer.engine"):
        completion = engine.generate(long_prompt, SamplingParams(temperature=0, max_new_tokens=10))
    assert completion.prompt_tokens == context - 1
    assert completion.completion_tokens == 1  # limited so prompt + completion fit the context
    assert "keeping its last" in caplog.text and "max_new_tokens limited" in caplog.text
    cropped = engine.generate(long_prompt[-(context - 1):], SamplingParams(temperature=0, max_new_tokens=1))
    assert cropped.token_ids == completion.token_ids


def test_bad_prompt_ids_are_a_user_error(engine: Engine) -> None:
    with pytest.raises(UserError, match="token ids"):
        engine.generate([10**9], GREEDY)


@pytest.mark.slow
def test_compiled_decoding_matches_eager(folder: Path, engine: Engine) -> None:
    compiled = load_engine(folder, device="cpu", compile=True)
    for prompt in ("In the", "And God said, Let there"):  # one compiled graph serves every length
        assert compiled.generate(prompt, GREEDY).token_ids == engine.generate(prompt, GREEDY).token_ids
    sampled = SamplingParams(temperature=0.8, top_k=50, seed=3, max_new_tokens=12, stop_token_ids=[])
    assert compiled.generate("In the", sampled).token_ids == engine.generate("In the", sampled).token_ids
    # The frozen-weights setting is scoped to the decode step, not left on for other compiled code.
    from torch._inductor import config as inductor_config
    assert inductor_config.freezing is False


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen3", *args], capture_output=True, text=True,
                          encoding="utf-8", timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_generate_streams_only_the_text(folder: Path, engine: Engine) -> None:
    result = run_cli("generate", str(folder), "--prompt", "In the beginning", "--temperature", "0",
                     "--max-new-tokens", "12", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    expected = engine.generate("In the beginning", SamplingParams(temperature=0, max_new_tokens=12))
    assert result.stdout == expected.text


def test_cli_generate_missing_folder_is_one_line(tmp_path: Path) -> None:
    result = run_cli("generate", str(tmp_path / "nothing"), "--prompt", "x")
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "no such folder" in result.stderr
