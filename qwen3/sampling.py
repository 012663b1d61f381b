"""Sampling: what a request asks for, and one sampling step over a batch of logits.

Kept apart from the decode loop (engine.py) because it is pure math on a (B, V) logits matrix and
the per-row settings; the CLI, the chat and the server's scheduler all sample through it:
  SamplingParams      what a request asks for (temperature, top-k/p, min-p, penalty, seed, stops)
  sample_next_tokens  one sampling step over a batch, each row with its own parameters and RNG
  StopChecker         withholds text that may begin a stop string; cuts the text before one
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from qwen3.errors import UserError


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. `temperature=0` is greedy (argmax)."""

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p
    min_p: float = 0.0  # drop tokens less likely than min_p * (probability of the top token)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # strings that end the text (not included)
    stop_token_ids: list[int] | None = None  # None: the tokenizer's stop tokens (eos, <|im_end|>)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplingParams:
        """The fields present in `values` (e.g. `vars(args)` of the CLI), validated; others ignored."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values}).validate()

    def validate(self) -> SamplingParams:
        """Raise UserError naming the first field with an impossible value; return self."""
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise UserError(f"{name} must be a number, got {value!r}")
            return value

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{name} must be an integer, got {value!r}")
            return value

        if integer("max_new_tokens") < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if number("temperature") < 0:
            raise UserError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if integer("top_k") < 0:
            raise UserError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < number("top_p") <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= number("min_p") <= 1:
            raise UserError(f"min_p must be in [0, 1], got {self.min_p}")
        if number("repetition_penalty") <= 0:
            raise UserError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        if self.seed is not None and integer("seed") < 0:
            raise UserError(f"seed must be a non-negative integer, got {self.seed}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise UserError(f"stop must be a list of strings, got {self.stop!r}")
        if self.stop_token_ids is not None and not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise UserError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        return self


def sample_next_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                       generators: Sequence[torch.Generator | None],
                       previous: Sequence[Sequence[int]],
                       argmax: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one token per row of `logits` (B, V) -> LongTensor (B,), each row with its own params.

    `previous[i]` holds the ids row i has seen (prompt + generated), for the repetition penalty.
    Greedy rows (temperature 0) take the argmax (`argmax`, when the caller already has it); the
    others draw from their filtered distribution with their own `torch.Generator` (None: torch's
    global RNG), so a seeded row gives the same sample whatever else is in the batch.
    """
    logits = logits.float()
    if any(p.repetition_penalty != 1.0 for p in params):
        logits = apply_repetition_penalty(logits, [p.repetition_penalty for p in params], previous)
        argmax = None  # the penalty changed the logits
    greedy = [p.temperature == 0 for p in params]
    if any(greedy) and argmax is None:
        argmax = logits.argmax(dim=-1)
    if all(greedy):
        return argmax

    device = logits.device
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)
    scores = logits / temperature[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        scores = filter_top_k_top_p(scores, [p.top_k for p in params], [p.top_p for p in params])
    probs = torch.softmax(scores, dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)

    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) is a draw from p (the Gumbel-max trick
    # in another form). It needs no normalization after filtering and one noise row per generator.
    noise = torch.empty_like(probs)
    if all(g is None for g in generators):
        noise.exponential_()
    else:
        for row, generator in enumerate(generators):
            noise[row].exponential_(generator=generator)
    sampled = (probs / noise).argmax(dim=-1)
    if any(greedy):
        sampled = torch.where(torch.tensor(greedy, device=device), argmax, sampled)
    return sampled


def apply_repetition_penalty(logits: torch.Tensor, penalties: Sequence[float],
                             previous: Sequence[Sequence[int]]) -> torch.Tensor:
    """CTRL's penalty, as transformers applies it: a seen token's logit is divided by the penalty
    when positive and multiplied by it when negative (both make it less likely for penalty > 1)."""
    logits = logits.clone()
    for row, (penalty, ids) in enumerate(zip(penalties, previous)):
        if penalty == 1.0 or not ids:
            continue
        index = torch.tensor(list(ids), device=logits.device)
        seen = logits[row, index]
        logits[row, index] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits


def filter_top_k_top_p(scores: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> torch.Tensor:
    """Set to -inf every score outside row i's top_k[i] tokens (0: no limit) and outside the smallest
    set of most likely tokens whose probability reaches top_p[i] (1: no limit)."""
    device, V = scores.device, scores.shape[-1]
    ordered = scores.sort(dim=-1, descending=True).values
    ranks = torch.arange(V, device=device)
    k = torch.tensor([k if k > 0 else V for k in top_k], device=device)
    keep = ranks[None, :] < k[:, None]
    # p > 1 turns the nucleus off for rows with top_p = 1 (cumulative sums can round above 1).
    p = torch.tensor([p if p < 1.0 else 2.0 for p in top_p], device=device)
    probs = torch.softmax(ordered.masked_fill(~keep, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    keep &= mass_before < p[:, None]  # the top token (mass 0 before it) always stays
    # The lowest kept score is the row's threshold: one comparison filters the unsorted scores.
    threshold = ordered.gather(1, keep.sum(dim=-1, keepdim=True) - 1)
    return scores.masked_fill(scores < threshold, float("-inf"))


class StopChecker:
    """Finds stop strings in streamed text.

    `push` returns the text that is safe to show: a trailing part that could be the beginning of a
    stop string is held until later text settles it. When a stop string appears, the text before it
    is returned with stopped=True, and the stop string and anything after it are dropped.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stop:
            return text, False
        text = self.held + text
        starts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if starts:
            self.held = ""
            return text[:min(starts)], True
        hold = max((k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        """The held text, once no more text will come (it did not become a stop string)."""
        held, self.held = self.held, ""
        return held
