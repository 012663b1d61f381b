"""The slot KV cache: slots are isolated, rows joining and leaving decode as recomputing would, the
server's cache is allocated once, and the compiled step with CUDA graphs' settings matches eager."""

from __future__ import annotations

import asyncio
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from qwen3.config import ModelConfig
from qwen3.data.tokenizer import train_tokenizer
from qwen3.errors import UserError
from qwen3.infer.engine import Engine, compile_decode_step, next_token_logits
from qwen3.infer.sampling import SamplingParams
from qwen3.model.decoder import KVCache, Qwen3ForCausalLM
from qwen3.runtime import available_memory
from qwen3.server.scheduler import Job, Scheduler

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = ["The quick brown fox jumps over the lazy dog, and the dog sleeps on in the sun. " * 3,
          "Seven bakers baked bread at dawn; the smell of it filled every street of the town. " * 3]


def small_model(context: int, vocab_size: int = 320) -> Qwen3ForCausalLM:
    """A random model whose large initializer spreads the logits, so greedy choices are far from ties."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=context, initializer_range=0.25)
    return Qwen3ForCausalLM(config).eval()


def slot_state(cache: KVCache, slot: int) -> list[torch.Tensor]:
    return [t[slot].clone() for t in cache.keys + cache.values] + [cache.lengths[slot].clone()]


@torch.inference_mode()
def test_prefill_into_a_slot_leaves_the_other_slots_alone() -> None:
    model = small_model(context=64)
    cache = model.new_kv_cache(3, 64)
    model(torch.randint(0, 320, (1, 7)), kv_cache=cache.slots(0, 1))
    model(torch.randint(0, 320, (1, 12)), kv_cache=cache.slots(2, 3))
    before = [slot_state(cache, slot) for slot in (0, 2)]
    model(torch.randint(0, 320, (1, 20)), kv_cache=cache.slots(1, 2))  # a prefill into slot 1
    assert cache.filled == [7, 20, 12] and cache.lengths.tolist() == [7, 20, 12]
    assert all(torch.equal(a, b) for a, b in zip(before[0], slot_state(cache, 0)))
    assert all(torch.equal(a, b) for a, b in zip(before[1], slot_state(cache, 2)))
    untouched = slot_state(cache, 2)
    model(torch.randint(0, 320, (2, 1)), kv_cache=cache.slots(0, 2))  # a decode step of slots 0 and 1
    assert cache.filled == [8, 21, 12]
    assert all(torch.equal(a, b) for a, b in zip(untouched, slot_state(cache, 2)))


def test_static_width_is_a_power_of_two_within_the_cache() -> None:
    cache = small_model(context=600).new_kv_cache(2, 600)
    view = cache.for_compiled_step(static_width=True)
    widths = []
    for filled in ([0, 0], [3, 9], [255, 10], [256, 256], [511, 2], [598, 1]):
        cache.filled[:] = filled
        view.prepare(1)
        assert view.past is None  # always the masked path: one graph whatever the lengths
        widths.append(view.width)
    assert widths == [256, 256, 256, 512, 512, 600]
    cache.filled[:] = [600, 0]
    with pytest.raises(ValueError, match="KV cache is full"):
        view.prepare(1)


@pytest.mark.parametrize("static_width", [False, True], ids=["longest-row width", "static width"])
@torch.inference_mode()
def test_rows_joining_and_leaving_decode_as_recomputing(static_width: bool) -> None:
    """Sequences join free slots and leave (the last ones moving into the freed slots, as the
    server's scheduler does) while the others decode: at every step each row's logits are close to
    those of the whole sequence run without a cache, and the greedy tokens are the same."""
    model = small_model(context=96)
    cache = model.new_kv_cache(4, 96)
    prompts = {"a": 5, "b": 9, "c": 2, "d": 13, "e": 1}
    joins = {0: ["a", "b"], 3: ["c"], 6: ["d", "e"]}
    leaves = {5: ["b"], 9: ["a", "d"]}
    rows: list[str] = []  # rows[i]: the sequence in slot i
    sequences: dict[str, list[int]] = {}
    generator = torch.Generator().manual_seed(0)

    def check(name: str, logits: torch.Tensor) -> int:
        expected = model(torch.tensor([sequences[name]]))[0, -1]
        torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
        assert int(logits.argmax()) == int(expected.argmax())
        return int(logits.argmax())

    for step in range(14):
        for name in leaves.get(step, []):  # the last rows take the freed slots
            hole = rows.index(name)
            rows[hole] = rows[-1]
            cache.copy_slot(hole, cache, len(rows) - 1)
            rows.pop()
        if step > 0:  # one decode step over the running slots
            view = cache.slots(0, len(rows))
            tokens = torch.tensor([[sequences[name][-1]] for name in rows])
            if static_width:
                view = view.for_compiled_step(static_width=True)
                view.prepare(1)
            logits = model(tokens, kv_cache=view, logits_to_keep=1)[:, -1]
            if static_width:
                view.count(1)
            for name, row in zip(rows, logits):
                sequences[name].append(check(name, row))
        for name in joins.get(step, []):  # a prefill into the next free slot
            sequences[name] = torch.randint(0, 320, (prompts[name],), generator=generator).tolist()
            slot = cache.slots(len(rows), len(rows) + 1)
            slot.reset()
            rows.append(name)
            logits = model(torch.tensor([sequences[name]]), kv_cache=slot, logits_to_keep=1)[0, -1]
            sequences[name].append(check(name, logits))
        assert [cache.filled[i] for i in range(len(rows))] == [len(sequences[n]) - 1 for n in rows]
    assert rows == ["e", "c"]


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor storage that an operation allocates (views and in-place results,
    which share an input's storage, do not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
        return out


def make_jobs(scheduler: Scheduler, lengths: list[tuple[int, int]], loop: asyncio.AbstractEventLoop) -> list[Job]:
    """Greedy jobs of (prompt tokens, max tokens) with random prompts, that never stop early."""
    generator = torch.Generator().manual_seed(1)
    vocab_size = scheduler.engine.model.config.vocab_size
    events: asyncio.Queue = asyncio.Queue()
    jobs = []
    for index, (prompt_tokens, max_tokens) in enumerate(lengths):
        prompt = torch.randint(10, vocab_size, (prompt_tokens,), generator=generator).tolist()
        params = SamplingParams(temperature=0, max_new_tokens=max_tokens, stop_token_ids=[])
        jobs.append(Job(prompt, params, scheduler.engine, index, events, loop))
    return jobs


def run_jobs(scheduler: Scheduler, jobs: list[Job]) -> tuple[int, int]:
    """Drive the scheduler's rounds (as its thread does) with one or two arrivals every third round
    while slots are free, until every job is done -> (rounds, the most jobs that ran together)."""
    waiting, rounds, peak = list(jobs), 0, 0
    with torch.inference_mode():
        while waiting or scheduler.batch is not None:
            free = scheduler.max_batch - scheduler.running
            take = min(free, 1 + rounds % 2, len(waiting)) if rounds % 3 == 0 else 0
            scheduler.run_round([waiting.pop(0) for _ in range(take)])
            peak = max(peak, scheduler.running)
            rounds += 1
    return rounds, peak


def assert_as_alone(scheduler: Scheduler, jobs: list[Job]) -> None:
    engine = Engine(scheduler.engine.model, scheduler.engine.tokenizer)
    for job in jobs:
        alone = engine.generate(job.state.context[:job.state.prompt_tokens], job.state.params)
        assert job.state.token_ids == alone.token_ids


def test_scheduler_cache_stays_put_while_jobs_join_and_leave() -> None:
    """Jobs of many lengths join and leave a running batch: the scheduler keeps its one cache (same
    memory, the size it states), nothing it allocates meanwhile is as large as one slot of it, and
    each job generates what it generates alone."""
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    context, max_batch = 512, 4
    model = small_model(context, tokenizer.vocab_size)
    scheduler = Scheduler(Engine(model, tokenizer), max_batch=max_batch)
    cache = scheduler.cache
    assert scheduler.context == context
    assert cache.nbytes == KVCache.bytes_needed(model.config, max_batch, context, torch.float32)
    assert scheduler.describe_cache() == "KV cache: 4 slots x 512 tokens (the model's context) = 1.0 MiB (float32, cpu)"
    addresses = [t.data_ptr() for t in cache.keys + cache.values]
    one_slot = KVCache.bytes_needed(model.config, 1, context, torch.float32)

    loop = asyncio.new_event_loop()  # never run: the events wait in it, unread
    lengths = [(1 + 7 * i % 40, 1 + 5 * i % 17) for i in range(22)] + [(30, context - 31)]
    jobs = make_jobs(scheduler, lengths, loop)
    with LargestAllocation() as allocations:
        rounds, peak = run_jobs(scheduler, jobs)
    loop.close()
    assert peak == max_batch and rounds > context - 31
    assert scheduler.cache is cache and [t.data_ptr() for t in cache.keys + cache.values] == addresses
    assert allocations.largest < one_slot, (allocations.largest, one_slot)
    assert_as_alone(scheduler, jobs)


@pytest.mark.slow
def test_compiled_scheduler_matches_alone() -> None:
    """`qwen3 serve --compile` on a CPU: batches of changing sizes and lengths through the compiled
    step generate what each job generates alone, eagerly."""
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    scheduler = Scheduler(Engine(small_model(128, tokenizer.vocab_size), tokenizer, compile=True), max_batch=3)
    loop = asyncio.new_event_loop()
    jobs = make_jobs(scheduler, [(5, 9), (12, 4), (5, 12), (3, 6), (20, 10)], loop)
    assert run_jobs(scheduler, jobs)[1] == 3
    loop.close()
    assert_as_alone(scheduler, jobs)


def test_a_cache_too_large_for_the_memory_is_a_user_error() -> None:
    if available_memory(torch.device("cpu")) is None:
        pytest.skip("the free memory of this machine is not known")
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    with pytest.raises(UserError, match="--max-batch or --max-seq-len"):
        Scheduler(Engine(small_model(512, tokenizer.vocab_size), tokenizer), max_batch=10**8)


@pytest.mark.slow
@torch.inference_mode()
def test_compiled_step_with_cuda_graph_settings_matches_eager() -> None:
    """The CUDA path's compiled step (mode reduce-overhead, static cache addresses, power-of-two
    widths), run on a CPU, where Inductor skips the CUDA graph itself: rows of different lengths
    decode the eager tokens through a width boundary, and the graphs compiled stay few."""
    from torch._dynamo.utils import counters

    model = small_model(context=320)
    step = functools.partial(next_token_logits, model)
    compiled = compile_decode_step(step, torch.device("cpu"), cuda_graphs=True)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 320, (n,), generator=generator).tolist() for n in (250, 3, 40)]
    results = []
    for decode in (step, compiled):
        cache = model.new_kv_cache(3, 320)
        tokens = []
        for slot, prompt in enumerate(prompts):
            tokens.append(step(torch.tensor([prompt]), cache.slots(slot, slot + 1))[1])
        tokens = [torch.cat(tokens)]
        for _ in range(12):  # the longest row passes 256 columns
            tokens.append(decode(tokens[-1][:, None], cache)[1])
        assert cache.length == 262
        results.append(torch.stack(tokens))
        if decode is step:
            graphs = counters["stats"]["unique_graphs"]
    assert torch.equal(results[0], results[1])
    assert counters["stats"]["unique_graphs"] - graphs <= 3


def test_without_max_seq_len_the_cache_takes_what_fits_half_the_free_memory(monkeypatch) -> None:
    """A model whose context would not fit: slots of the largest power of two that fits half the free
    memory, said in the start-up line; --max-seq-len, or a context that fits, as before."""
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    engine = Engine(small_model(4096, tokenizer.vocab_size), tokenizer)
    per_position = KVCache.bytes_needed(engine.model.config, 4, 1, torch.float32)
    monkeypatch.setattr("qwen3.server.scheduler.available_memory", lambda device: 3000 * per_position)
    scheduler = Scheduler(engine, max_batch=4)
    assert scheduler.context == 1024  # 1,500 positions fit half of it
    assert "(the most that fits 50% of the" in scheduler.describe_cache()
    assert "the model's context is 4,096; --max-seq-len sets it" in scheduler.describe_cache()
    assert Scheduler(engine, max_batch=4, max_seq_len=600).context == 600
    monkeypatch.setattr("qwen3.server.scheduler.available_memory", lambda device: 10_000 * per_position)
    assert Scheduler(engine, max_batch=4).context == 4096
    monkeypatch.setattr("qwen3.server.scheduler.available_memory", lambda device: 300 * per_position)
    with pytest.raises(UserError, match="4 slots of even 256 positions"):
        Scheduler(engine, max_batch=4)
