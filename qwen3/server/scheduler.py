"""Continuous batching: one thread owns the model and decodes every running request together.

Why: a decode step reads all the weights to produce one token per row, so it costs about the same
for 1 row as for 16. Serving requests one at a time leaves that capacity idle; running them as one
batch multiplies aggregate throughput. Requests arrive and finish at different times, so the batch is
continuous: a new request joins at the next step and a finished one leaves at once, without waiting
for the others.

How the batch is laid out. All running requests ("jobs") share one `KVCache`, its rows right-aligned
(left-padded); the cache masks the padding and numbers each row's own tokens. Every decode step
appends one token to every row, so the rows stay right-aligned. New jobs are prefilled together into
a cache of their own, then both caches are merged into a new one whose length is the longest row
(`KVCache.merge`); when jobs leave, the survivors are merged the same way, so padding never
accumulates. A membership change thus costs one copy of the cache, about what one decode step reads
anyway.

Prefill, decode steps, sampling and per-token handling (stop tokens, stop strings, text decoding,
finish reasons) are the `Engine`'s, so a request served alone produces exactly what
`qwen3 generate` produces.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass

import torch

from qwen3.engine import Engine, SequenceState
from qwen3.model import KVCache, Qwen3ForCausalLM
from qwen3.sampling import BatchSampler, SamplingParams

logger = logging.getLogger(__name__)


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

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, device: torch.device,
                 index: int, events: asyncio.Queue[Event], loop: asyncio.AbstractEventLoop) -> None:
        self.state = SequenceState(prompt_ids, params, params.max_new_tokens, tokenizer, device)
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
    """Running jobs and their shared cache, row i of the cache being jobs[i]'s."""

    jobs: list[Job]
    cache: KVCache
    tokens: torch.Tensor  # (B,) each row's last sampled id, not cached yet; kept on the device
    sampler: BatchSampler  # the rows' sampling settings and seen ids, on the device


class Scheduler:
    """Owns the model in one thread; `submit` jobs from any thread, read their events in asyncio.

    At most `max_batch` jobs decode together; up to `max_queue` more wait, and `submit` raises
    QueueFull beyond that rather than letting a backlog grow without bound.
    """

    def __init__(self, model: Qwen3ForCausalLM, tokenizer, max_batch: int = 16, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be at least 1, got {max_batch}, {max_queue}")
        self.engine = Engine(model, tokenizer)
        self.device = self.engine.device
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.condition = threading.Condition()
        self.waiting: deque[Job] = deque()  # guarded by `condition`
        self.stopping = False
        self.batch: Batch | None = None  # the scheduler thread's alone
        self.running = 0  # len(batch.jobs), readable from other threads
        self.cancelled_jobs = 0  # jobs dropped unfinished because their client left, for /health
        self.thread: threading.Thread | None = None

    @property
    def context(self) -> int:
        return self.engine.max_context

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
        """Prefill the newcomers together, send their first tokens, join the batch."""
        # The prefill's cache has room for the whole generation: with no batch running, it is the batch.
        arrivals = Batch(jobs, *self.engine.prefill([job.state for job in jobs]))
        self._add(arrivals)
        self._set_batch(self._merge([self.batch, arrivals]))

    def _step(self) -> None:
        """One token for every running job; finished and cancelled jobs leave the batch."""
        batch = self.batch
        batch.tokens = self.engine.decode(batch.cache, batch.tokens, batch.sampler)
        self._add(batch)
        self._set_batch(self._merge([batch]))

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

    def _merge(self, batches: list[Batch | None]) -> Batch | None:
        """One batch of the unfinished, uncancelled jobs of `batches`, its cache as short as can be."""
        parts = []
        for batch in batches:
            if batch is not None:
                rows = [i for i, job in enumerate(batch.jobs) if job.state.finish_reason is None]
                kept = [i for i in rows if not batch.jobs[i].cancelled]
                if len(kept) < len(rows):
                    with self.condition:  # `cancel` counts too, from another thread
                        self.cancelled_jobs += len(rows) - len(kept)
                if kept:
                    parts.append((batch, kept))
        if len(parts) == 1 and len(parts[0][1]) == len(parts[0][0].jobs):
            return parts[0][0]  # nobody joined or left
        jobs = [batch.jobs[i] for batch, rows in parts for i in rows]
        if not jobs:
            return None
        # The last sampled token of each job is not cached yet: a job may still add
        # max_new_tokens - len(token_ids) positions.
        room = max(job.state.max_new_tokens - len(job.state.token_ids) for job in jobs)
        return Batch(jobs, KVCache.merge([(batch.cache, rows) for batch, rows in parts], room),
                     torch.cat([batch.tokens[rows] for batch, rows in parts]),
                     self.engine.sampler([job.state for job in jobs]))

    def _set_batch(self, batch: Batch | None) -> None:
        self.batch = batch
        self.running = len(batch.jobs) if batch is not None else 0

    @staticmethod
    def _fail(jobs: list[Job], message: str) -> None:
        send([(job, Event(job.index, error=message)) for job in jobs
              if job.state.finish_reason is None and not job.cancelled])
