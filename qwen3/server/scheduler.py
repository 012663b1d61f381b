"""Continuous batching: one thread owns the model and decodes every running request together.

Why: a decode step reads all the weights to produce one token per row, so it costs about the same
for 1 row as for 16. Serving requests one at a time leaves that capacity idle; running them as one
batch multiplies aggregate throughput. Requests arrive and finish at different times, so the batch is
continuous: a new request joins at the next step and a finished one leaves at once, without waiting
for the others.

How the batch is laid out. One `KVCache` of `max_batch` slots, each of `context` positions, is
allocated when the scheduler is made and never again: its size is known at start-up and does not
change with the traffic. `context` is `--max-seq-len`, else the model's context where that fits half
the free memory, else the largest power of two that does (a released Qwen3's 40,960 positions x 16
slots would need ~70 GiB): the start-up line says which and why. Running requests ("jobs") hold
slots 0 .. n-1, jobs[i] slot i, each sequence from the slot's first column, so rows of different
lengths need no padding (the cache masks each row's keys by its own length). A new job's prompt is
prefilled into the next free slot, unpadded, without touching the others' slots; when jobs leave,
the last running jobs move into the slots they freed (one slot's copy each), so the running jobs
stay in slots 0 .. n-1 and a decode step runs over one contiguous view of the cache.

Prefill, decode steps, sampling and per-token handling (stop tokens, stop strings, text decoding,
finish reasons) are the `Engine`'s, so a request served alone produces exactly what
`qwen3 generate` produces.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass

import torch

from qwen3.errors import UserError, logger
from qwen3.infer.engine import Engine
from qwen3.infer.sampling import BatchSampler, SamplingParams
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.model.kv_cache import KVCache
from qwen3.runtime import available_memory

# Without --max-seq-len the cache may take this share of the free memory (the rest is for the
# activations of a step and everything else on the machine), in slots of at least MIN_CONTEXT positions.
KV_MEMORY_SHARE = 0.5
MIN_CONTEXT = 256


class QueueFull(Exception):
    """More requests are waiting than the scheduler accepts; the client should retry later."""


@dataclass
class Event:
    """What a job sends back to its client: new text, and at the end the finish reason and count."""

    index: int  # which choice of the request
    text: str = ""
    finish_reason: str | None = None  # "stop" or "length" on the job's last event
    completion_tokens: int = 0
    error: str | None = None  # set when the model failed; the job is over


class Job:
    """One sequence a client waits for: the engine's sequence state and the way back to the client.

    Events go to `events`, an asyncio queue of the client's event loop, possibly shared by the
    several choices (`n`) of one request. `cancelled` is set from the client's side (disconnect)
    and read by the scheduler thread, which then drops the row.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, engine: Engine,
                 index: int, events: asyncio.Queue[Event], loop: asyncio.AbstractEventLoop) -> None:
        self.state = engine.sequence(prompt_ids, params, params.max_new_tokens)
        self.index = index
        self.events = events
        self.loop = loop
        self.cancelled = False


def send(messages: list[tuple[Job, Event]]) -> None:
    """Deliver events to their clients' event loops: one wake-up per loop, not one per event."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
    for job, event in messages:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(deliver, batch)
        except RuntimeError:  # the loop is closed: nobody is listening
            for job, _ in batch:
                job.cancelled = True


def deliver(messages: list[tuple[Job, Event]]) -> None:
    """Runs in the client's event loop."""
    for job, event in messages:
        job.events.put_nowait(event)


@dataclass
class Batch:
    """Running jobs, jobs[i] in slot i of the scheduler's cache."""

    jobs: list[Job]
    tokens: torch.Tensor  # (B,) each row's last sampled id, not cached yet; kept on the device
    sampler: BatchSampler  # the rows' sampling settings and seen ids, on the device


class Scheduler:
    """Owns the model in one thread; `submit` jobs from any thread, read their events in asyncio.

    At most `max_batch` jobs decode together; up to `max_queue` more wait, and `submit` raises
    QueueFull beyond that rather than letting a backlog grow without bound. Each job has
    `context` positions for its prompt and reply: the model's context, or `max_seq_len` when that
    is smaller (the cache takes max_batch x context positions; a UserError says so when they do
    not fit the device's free memory). The engine's decode step is compiled when it was made so.
    """

    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 64,
                 max_seq_len: int | None = None) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be at least 1, got {max_batch}, {max_queue}")
        self.engine = engine
        self.device = engine.device
        self.context, self.context_reason = self._choose_context(engine, max_batch, max_seq_len)
        self.cache = self._allocate_cache(engine.model, max_batch)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.condition = threading.Condition()
        self.waiting: deque[Job] = deque()  # guarded by `condition`
        self.stopping = False
        self.batch: Batch | None = None  # the scheduler thread's alone
        self.running = 0  # len(batch.jobs), readable from other threads
        self.cancelled_jobs = 0  # jobs dropped unfinished because their client left, for /health
        self.thread: threading.Thread | None = None

    def _choose_context(self, engine: Engine, slots: int, max_seq_len: int | None) -> tuple[int, str]:
        """Positions per slot, and why: `max_seq_len` (at most the model's context) when given;
        else the model's context, or where `slots` of it would take more than KV_MEMORY_SHARE of the
        device's free memory, the largest power of two that fits that share."""
        model_context = engine.max_context
        if max_seq_len is not None:
            return min(max_seq_len, model_context), "--max-seq-len"
        free = available_memory(self.device)
        per_position = KVCache.bytes_needed(engine.model.config, slots, 1, engine.model.model.embed_tokens.weight.dtype)
        if free is None or per_position * model_context <= free * KV_MEMORY_SHARE:
            return model_context, "the model's context"
        fits = int(free * KV_MEMORY_SHARE // per_position)
        if fits < MIN_CONTEXT:
            raise UserError(f"{slots} slots of even {MIN_CONTEXT} positions would take more than "
                            f"{KV_MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB free on {self.device}: "
                            f"lower --max-batch or --max-seq-len")
        context = 1 << (fits.bit_length() - 1)
        return context, (f"the most that fits {KV_MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB free "
                         f"(the model's context is {model_context:,}; --max-seq-len sets it)")

    def _allocate_cache(self, model: Qwen3ForCausalLM, slots: int) -> KVCache:
        dtype = model.model.embed_tokens.weight.dtype
        needed = KVCache.bytes_needed(model.config, slots, self.context, dtype)
        free = available_memory(self.device)
        if free is not None and needed > free:
            raise UserError(f"the KV cache of {slots} slots x {self.context} tokens needs "
                            f"{needed / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free on "
                            f"{self.device}: lower --max-batch or --max-seq-len")
        with torch.inference_mode():  # inference tensors (the scheduler thread runs in inference mode)
            return model.new_kv_cache(slots, self.context)

    def describe_cache(self) -> str:
        """The start-up line about the cache: slots, positions and why, memory."""
        size = self.cache.nbytes
        size = f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
        dtype = str(self.cache.keys[0].dtype).removeprefix("torch.")
        return (f"KV cache: {self.cache.batch_size} slots x {self.context:,} tokens ({self.context_reason}) = "
                f"{size} ({dtype}, {self.device})")

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="qwen3-scheduler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Finish the current step, end the thread, and tell every unfinished job's client."""
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread is not None:
            self.thread.join()
        leftover = list(self.waiting) + (self.batch.jobs if self.batch else [])
        self._fail(leftover, "the server is shutting down")
        self.waiting.clear()
        self.batch = None

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs for the next step; QueueFull when the waiting line has no room for them."""
        with self.condition:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"the server is busy ({len(self.waiting)} sequences waiting, at most "
                                f"{self.max_queue}); retry shortly")
            self.waiting.extend(jobs)
            self.condition.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """Stop generating for these jobs (their client left); finished ones are unaffected."""
        with self.condition:
            for job in jobs:
                job.cancelled = True
                if job in self.waiting:
                    self.waiting.remove(job)
                    self.cancelled_jobs += 1

    def stats(self) -> dict[str, int]:
        return {"running": self.running, "waiting": len(self.waiting), "max_batch": self.max_batch,
                "cancelled": self.cancelled_jobs}

    # --- the scheduler thread ---

    def _loop(self) -> None:
        with torch.inference_mode():
            while (arrivals := self._next_arrivals()) is not None:
                self.run_round(arrivals)

    def run_round(self, arrivals: list[Job]) -> None:
        """One round of the scheduler thread: admit the arrivals, then one decode step for the batch.
        A failure fails the jobs it concerns; the scheduler carries on."""
        if arrivals:
            try:
                self._admit(arrivals)
            except Exception as error:  # a failing request must not take the server down
                logger.exception("prefill failed")
                self._fail(arrivals, f"generation failed: {error}")
        if self.batch is not None:
            try:
                self._step()
            except Exception as error:
                logger.exception("decode step failed")
                self._fail(self.batch.jobs, f"generation failed: {error}")
                self._set_batch(None)

    def _next_arrivals(self) -> list[Job] | None:
        """Waiting jobs that fit in the batch (blocking while there is nothing to do); None: stop."""
        with self.condition:
            while not self.stopping and not self.waiting and self.batch is None:
                self.condition.wait()
            if self.stopping:
                return None
            free = self.max_batch - self.running
            return [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the newcomers into the free slots after the running jobs', send their first
        tokens, join the batch."""
        running = self.running
        _, tokens, sampler = self.engine.prefill([job.state for job in jobs],
                                                 self.cache.slots(running, running + len(jobs)))
        arrivals = Batch(jobs, tokens, sampler)
        self._add(arrivals)
        if self.batch is not None:
            jobs = self.batch.jobs + jobs
            arrivals = Batch(jobs, torch.cat([self.batch.tokens, tokens]),
                             self.engine.sampler([job.state for job in jobs]))
        self._set_batch(self._compact(arrivals))

    def _step(self) -> None:
        """One token for every running job; finished and cancelled jobs leave the batch."""
        batch = self.batch
        batch.tokens = self.engine.decode(self.cache.slots(0, len(batch.jobs)), batch.tokens, batch.sampler)
        self._add(batch)
        self._set_batch(self._compact(batch))

    def _add(self, batch: Batch) -> None:
        """Give each row its sampled token and send the text it completes to the row's client."""
        messages = []
        for job, token in zip(batch.jobs, batch.tokens.tolist()):
            if job.cancelled:
                continue
            piece = job.state.add(token)
            if job.state.finish_reason is not None:
                messages.append((job, Event(job.index, piece, job.state.finish_reason, len(job.state.token_ids))))
            elif piece:
                messages.append((job, Event(job.index, piece)))
        send(messages)

    def _compact(self, batch: Batch) -> Batch | None:
        """The batch without its finished and cancelled jobs. The last running jobs move into the
        slots that the others freed, so the running jobs keep slots 0 .. n-1; nothing is allocated
        but the small per-row tensors (last tokens, sampler)."""
        running = [i for i, job in enumerate(batch.jobs) if job.state.finish_reason is None]
        kept = [i for i in running if not batch.jobs[i].cancelled]
        if len(kept) < len(running):
            with self.condition:  # `cancel` counts too, from another thread
                self.cancelled_jobs += len(running) - len(kept)
        if len(kept) == len(batch.jobs):
            return batch  # nobody left
        if not kept:
            return None
        # Slot i < len(kept) keeps its job, or takes the next of the kept jobs beyond len(kept).
        staying, movers = set(kept), iter(i for i in kept if i >= len(kept))
        order = [i if i in staying else next(movers) for i in range(len(kept))]
        for slot, source in enumerate(order):
            if slot != source:
                self.cache.copy_slot(slot, self.cache, source)
        jobs = [batch.jobs[i] for i in order]
        return Batch(jobs, batch.tokens[order], self.engine.sampler([job.state for job in jobs]))

    def _set_batch(self, batch: Batch | None) -> None:
        self.batch = batch
        self.running = len(batch.jobs) if batch is not None else 0

    @staticmethod
    def _fail(jobs: list[Job], message: str) -> None:
        send([(job, Event(job.index, error=message)) for job in jobs
              if job.state.finish_reason is None and not job.cancelled])
