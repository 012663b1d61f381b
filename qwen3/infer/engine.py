"""The decode engine: prefill + KV-cache decode, batches, streaming text; for the CLI, the chat and
the server.

The seed recomputed the whole sequence for every new token. Here a prompt is run once through the
model into its slot of a preallocated `KVCache` (prefill, unpadded); each new token is then a
single-position forward pass against that cache (decode), asking the model only for the last
position's logits. Sampling, with the request's settings and stop strings, is sampling.py's; the
slots, and the masks and positions of rows at different lengths, are the cache's (kv_cache.py).
  encode_prompt       a prompt (text or ids) -> checked, never empty token ids
  IncrementalDecoder  token ids -> text pieces that never end inside a multi-byte character
  SequenceState       one sequence being generated: ids, RNG, text, stop conditions
  next_token_logits   one forward pass against the cache -> last logits and their argmax
  compile_decode_step that step under torch.compile (CUDA graphs on a GPU, Inductor's inference
                      settings on a CPU)
  Engine              `prefill` and `decode` steps over a batch of sequences (the server's scheduler
                      drives them itself), and the loop over them for one prompt (`generate`,
                      `stream`) or several (`generate_batch`); `compile=True` compiles the decode step
  load_engine         a checkpoint folder -> Engine (device "auto", optional int8/int4, compile);
                      trained_checkpoint finds the folder, or says how to train one
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from qwen3.data.tokenizer import Tokenizer, load_tokenizer
from qwen3.errors import UserError, log, logger
from qwen3.infer.quantize import check_kind, quantize as quantize_linears
from qwen3.infer.sampling import BatchSampler, SamplingParams, StopChecker, generation_defaults
from qwen3.model.checkpoint import (CheckpointError, find_checkpoint, load_generation_config, load_model, run_name,
                                    stored_dtype)
from qwen3.model.kv_cache import KVCache
from qwen3.runtime import resolve_device, weights_dtype


@dataclass
class Completion:
    """One finished generation. `token_ids` are all sampled ids, the one that stopped it included;
    `text` excludes stop tokens and stop strings."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


def encode_prompt(tokenizer: Tokenizer, prompt: str | list[int], vocab_size: int) -> list[int]:
    """Token ids of a prompt (text, or ids checked to lie in [0, vocab_size)), never empty: an empty
    prompt starts a document (the tokenizer's bos token, else its eos token)."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    else:
        ids = list(prompt)
        if not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
            raise UserError(f"prompt token ids must be integers in [0, {vocab_size})")
    if not ids:
        start = tokenizer.bos_token_id
        ids = [start if start is not None else tokenizer.eos_token_id]
    return ids


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces without splitting a UTF-8 character.

    A byte-level token may carry half of a multi-byte character; decoding it alone gives U+FFFD.
    Each push decodes only a short window: the tokens from the start of the previously returned
    piece (`prefix`) to the end. The window's text minus the previous piece's text is what is new,
    held back while it ends in U+FFFD. Decoding from a token boundary that is also a character
    boundary keeps tokenizers that drop a leading space (SentencePiece) correct too.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window
        self.read = 0  # end of the text already returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still partial)."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        seen = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(seen) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(seen):]


class SequenceState:
    """The state of one prompt being generated: its ids, RNG, text assembly and stop conditions.
    (The server's scheduler keeps one per request too.)"""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int,
                 tokenizer: Tokenizer, device: torch.device, stop_token_ids: list[int]) -> None:
        self.prompt_tokens = len(prompt_ids)
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.generator = (torch.Generator(device=device).manual_seed(params.seed)
                          if params.seed is not None else None)
        # The request's own stop ids, else the model's (`Engine.stop_token_ids`).
        self.stop_token_ids = set(params.stop_token_ids if params.stop_token_ids is not None else stop_token_ids)
        self.context = list(prompt_ids)  # prompt + generated ids, for the repetition penalty
        self.token_ids: list[int] = []
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = StopChecker(params.stop)
        self.pieces: list[str] = []
        self.finish_reason: Literal["stop", "length"] | None = None

    def add(self, token_id: int) -> str:
        """Take the sampled token; return the new text to show (possibly "")."""
        self.token_ids.append(token_id)
        self.context.append(token_id)
        if token_id in self.stop_token_ids:
            piece = self._finish("stop", self.decoder.flush())
        else:
            piece, stopped = self.stops.push(self.decoder.push(token_id))
            if stopped:
                self.finish_reason = "stop"
            elif len(self.token_ids) >= self.max_new_tokens:
                piece += self._finish("length", self.decoder.flush())
        self.pieces.append(piece)
        return piece

    def _finish(self, reason: Literal["stop", "length"], remaining: str) -> str:
        piece, stopped = self.stops.push(remaining)
        self.finish_reason = "stop" if stopped else reason
        return piece if stopped else piece + self.stops.flush()

    def completion(self) -> Completion:
        return Completion(text="".join(self.pieces), token_ids=self.token_ids,
                          finish_reason=self.finish_reason or "length",
                          prompt_tokens=self.prompt_tokens, completion_tokens=len(self.token_ids))


def next_token_logits(model: torch.nn.Module, input_ids: torch.Tensor,
                      kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Run new tokens (B, T) against the cache -> the last position's logits (B, V) and their
    argmax (B,), the greedy choice. Taken here, the argmax joins the compiled decode graph, where
    Inductor's vectorized reduction replaces eager argmax (~11 us per 8,192 logits on one core)."""
    logits = model(input_ids, kv_cache=kv_cache, logits_to_keep=1)[:, -1]
    return logits, logits.argmax(dim=-1)


DecodeStep = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def compile_decode_step(step: DecodeStep, device: torch.device, cuda_graphs: bool | None = None) -> DecodeStep:
    """`step` (`next_token_logits` of a model) under torch.compile, for one-token decode steps run
    under inference mode; `cuda_graphs` (default: on CUDA) picks the CUDA-graph settings below.

    The graph takes the cache as a view made by `KVCache.for_compiled_step`: the host half of the
    cache's bookkeeping (its Python list of lengths, which picks the shapes) runs here around the
    graph, so the graph reads no host state that changes from step to step. On CUDA, the mode is
    "reduce-overhead": the step is replayed as a CUDA graph (one kernel launch for the whole step
    instead of hundreds). A CUDA graph needs inputs at fixed addresses and few distinct shapes: the
    cache's tensors are allocated once and marked static, and attention reads a power-of-two
    width (`static_width`), so one graph is recorded per batch size and width. Where Inductor
    cannot make a CUDA graph of the step, it says so ("skipping cudagraphs due to ...") and runs
    the compiled kernels without one.

    On a CPU a small model's step is mostly per-kernel overhead, so Inductor is asked for a C++
    wrapper that calls the kernels instead of Python, for weights frozen as constants and prepacked
    for the GEMM library, for one matmul where linears read the same input (q/k/v, gate/up), and to
    autotune each product between the GEMM library and its own C++ GEMM template (whose one-row
    kernels read bfloat16 and float32 weights faster); attention reads exactly the longest row's
    columns (a symbolic size after the first recompile).
    Measured in bench/decode_bench.py (docs/generation.md). Frozen weights are part of the compiled
    code: a model whose weights change afterwards needs a new step. Other devices get a plain
    torch.compile.
    """
    cuda = device.type == "cuda" if cuda_graphs is None else cuda_graphs
    if cuda:
        compiled = torch.compile(step, mode="reduce-overhead")
    elif device.type == "cpu":
        compiled = frozen(torch.compile(step, options={
            "cpp_wrapper": True, "cpp.enable_concat_linear": True, "max_autotune": True,
            # autotuning's timing tables, which Inductor writes to stderr, are not for the user
            "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}))
        # ... nor is the deprecation warning torch 2.13's autotuner raises from its own code
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning, "torch._inductor.select_algorithm")
    else:
        compiled = torch.compile(step)

    def compiled_step(input_ids: torch.Tensor, kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        new_tokens = input_ids.shape[1]
        view = kv_cache.for_compiled_step(static_width=cuda)
        view.prepare(new_tokens)
        if cuda:
            view.mark_static()
            torch.compiler.cudagraph_mark_step_begin()
        logits, argmax = compiled(input_ids, view)
        view.count(new_tokens)
        if cuda:  # the outputs live in the CUDA graph's memory, which its next replay overwrites
            logits, argmax = logits.clone(), argmax.clone()
        return logits, argmax

    return compiled_step


def frozen(compiled: DecodeStep) -> DecodeStep:
    """`compiled` run with Inductor's `freezing` on: Dynamo reads it while it traces (to take the
    parameters as constants), which torch.compile's `options` is too late for; setting it around
    the call costs ~5 us."""
    from torch._inductor import config as inductor_config

    def frozen_step(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        previous, inductor_config.freezing = inductor_config.freezing, True
        try:
            return compiled(*args)
        finally:
            inductor_config.freezing = previous

    return frozen_step


class Engine:
    """Generates text from a model (already on its device) and its tokenizer.

    `stream` yields text pieces as they are decoded; when it is exhausted, `last_completion` holds
    the `Completion` (token counts, finish reason).

    `compile=True` runs the one-token decode steps through torch.compile. The first step compiles
    a graph for its exact shapes, the second recompiles it with the cache length symbolic (what
    changes from step to step); batch size 1 stays a constant, which makes the code simpler and
    faster than marking every dimension dynamic (measured: 15-25% per token). The prefill
    stays eager: it runs once per prompt, at a new length each time. See `compile_decode_step`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, compile: bool = False,
                 checkpoint: Path | None = None, generation_config: Mapping[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint  # the folder the model was loaded from, when it was
        generation_config = generation_config or {}
        # The model's own sampling (generation_config.json), under what a user sets.
        self.sampling_defaults = generation_defaults(generation_config)
        # What ends a reply: the config's eos ids, then the tokenizer's (eos, <|im_end|>, <|endoftext|>).
        eos = generation_config.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
        self.stop_token_ids = list(dict.fromkeys([*eos, *tokenizer.stop_token_ids]))
        self.device = model.model.embed_tokens.weight.device
        self.last_completion: Completion | None = None
        self.prefill_step: DecodeStep = functools.partial(next_token_logits, model)
        self.decode_step = compile_decode_step(self.prefill_step, self.device) if compile else self.prefill_step
        self.cache: KVCache | None = None  # the last run's, for the next one (see `_take_cache`)

    @property
    def max_context(self) -> int:
        """The most positions (prompt + generated) the model can attend over."""
        return self.model.config.max_position_embeddings

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None) -> Completion:
        for _ in self.stream(prompt, params):
            pass
        return self.last_completion

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the generated text piece by piece; then `self.last_completion` is set."""
        sequence = self._start(prompt, params or SamplingParams())
        self.last_completion = None
        for pieces in self._run([sequence]):
            if pieces[0]:
                yield pieces[0]
        self.last_completion = sequence.completion()

    def generate_batch(self, prompts: list[str | list[int]],
                       params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Generate for several prompts at once (a slot each of one cache, decoded together)."""
        if not prompts:
            return []
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(params)} sampling parameters")
        sequences = [self._start(prompt, p) for prompt, p in zip(prompts, params)]
        for _ in self._run(sequences):
            pass
        return [s.completion() for s in sequences]

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt (text or ids), never empty: see `encode_prompt`."""
        return encode_prompt(self.tokenizer, prompt, self.model.config.vocab_size)

    def _start(self, prompt: str | list[int], params: SamplingParams) -> SequenceState:
        """Encode, crop to the context, and limit max_new_tokens so prompt + completion fit."""
        params.validate()
        ids = self.encode_prompt(prompt)
        limit = self.max_context - 1  # leave room for at least one new token
        if len(ids) > limit:
            logger.warning("prompt of %d tokens does not fit the context of %d (one position is kept "
                           "for a new token); keeping its last %d tokens", len(ids), self.max_context, limit)
            ids = ids[-limit:]
        max_new = min(params.max_new_tokens, self.max_context - len(ids))
        if max_new < params.max_new_tokens:
            logger.warning("max_new_tokens limited to %d: the prompt has %d tokens and the context %d",
                           max_new, len(ids), self.max_context)
        return self.sequence(ids, params, max_new)

    def sequence(self, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int) -> SequenceState:
        """The state of one prompt to generate for, with this model's tokenizer, device and stop ids."""
        return SequenceState(prompt_ids, params, max_new_tokens, self.tokenizer, self.device, self.stop_token_ids)

    def sampler(self, sequences: list[SequenceState]) -> BatchSampler:
        """The sampling of a batch of these sequences (their settings, RNGs and seen ids)."""
        return BatchSampler([s.params for s in sequences], [s.generator for s in sequences],
                            [s.context for s in sequences], self.model.config.vocab_size, self.device)

    @torch.inference_mode()
    def prefill(self, sequences: list[SequenceState],
                cache: KVCache | None = None) -> tuple[KVCache, torch.Tensor, BatchSampler]:
        """Run each prompt through the model into its slot of `cache` (sequences[i] into slot i; by
        default a new cache with room for the most tokens any of them may add) and sample each one's
        first token -> the cache, the ids (B,) and the batch's sampler, for the decode steps.

        Nothing is padded: consecutive prompts of the same length run together, any other alone,
        each with SDPA's causal kernel over its own keys (no mask, so no (T, S) score matrix)."""
        if cache is None:
            room = max(s.max_new_tokens for s in sequences)
            cache = self.model.new_kv_cache(len(sequences), max(len(s.context) for s in sequences) + room)
        cache.reset()
        logits, argmax, start = [], [], 0
        for _, run in itertools.groupby(sequences, key=lambda s: len(s.context)):
            prompts = [s.context for s in run]
            step = self.prefill_step(torch.tensor(prompts, device=self.device),
                                     cache.slots(start, start + len(prompts)))
            logits.append(step[0])
            argmax.append(step[1])
            start += len(prompts)
        sampler = self.sampler(sequences)
        return cache, sampler(torch.cat(logits), torch.cat(argmax)), sampler

    @torch.inference_mode()
    def decode(self, cache: KVCache, tokens: torch.Tensor, sampler: BatchSampler) -> torch.Tensor:
        """One step: the last sampled ids (B,) run against the cache -> the next ids (B,)."""
        return sampler(*self.decode_step(tokens[:, None], cache))

    def _run(self, sequences: list[SequenceState]) -> Iterator[list[str]]:
        """Prefill all prompts, then decode until every sequence is finished; yield each step's
        new text per sequence. A finished row keeps decoding with the others (its tokens are
        ignored) until the last one finishes."""
        cache = self._take_cache(sequences)
        try:
            cache, tokens, sampler = self.prefill(sequences, cache)
            for _ in range(max(s.max_new_tokens for s in sequences)):
                yield [s.add(t) if s.finish_reason is None else "" for s, t in zip(sequences, tokens.tolist())]
                if all(s.finish_reason is not None for s in sequences):
                    return
                tokens = self.decode(cache, tokens, sampler)
        finally:
            self.cache = cache

    def _take_cache(self, sequences: list[SequenceState]) -> KVCache:
        """A cache with a slot per sequence and room for its prompt and every token it may add: the
        previous run's while it is large enough (its addresses, which CUDA graphs are recorded
        against, stay the same), else a new one sized to a power of two, so that a growing chat
        reallocates seldom. Taken: a stream started meanwhile gets a cache of its own."""
        needed = max(len(s.context) for s in sequences) + max(s.max_new_tokens for s in sequences)
        cache, self.cache = self.cache, None
        if cache is None or cache.batch_size != len(sequences) or cache.max_len < needed:
            cache = None  # freed before the next one is allocated
            with torch.inference_mode():  # inference tensors: the steps on them skip autograd's bookkeeping
                cache = self.model.new_kv_cache(len(sequences), 1 << (needed - 1).bit_length())
        return cache


def trained_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder `path` names (a run folder means its best/, else last/); where there is
    none, a UserError that says how to train one."""
    try:
        return find_checkpoint(path)
    except CheckpointError as error:
        raise UserError(f"no trained checkpoint ({error}); train one with `python train_qwen3.py` "
                        f"(or `make demo`), or pass a checkpoint folder") from None


def load_engine(path: str | Path, device: str = "auto", quantize: str | None = None,
                compile: bool = False, dtype: str = "auto") -> Engine:
    """An Engine for a checkpoint folder (or a run folder's best/): model, tokenizer, options. The
    weights' dtype is `weights_dtype`'s choice for `dtype`; `quantize` ("int8" or "int4", CPU only)
    then replaces the linear layers (quantize.py). What was chosen and why is logged."""
    if quantize is not None:
        check_kind(quantize)
    folder = trained_checkpoint(path)
    resolved = resolve_device(device)
    chosen, why = weights_dtype(dtype, stored_dtype(folder), resolved)
    held = str(chosen).removeprefix("torch.")
    if quantize:
        held = f"{quantize} linear layers (the rest in {held})"
    model = load_model(folder, device=resolved, dtype=chosen)
    log(f"{run_name(folder)}: {model.num_parameters():,} parameters in {held} on {resolved}: {why}")
    if quantize:
        model = quantize_linears(model, quantize)
    return Engine(model, load_tokenizer(folder), compile=compile, checkpoint=folder,
                  generation_config=load_generation_config(folder))
