"""Sampling: what a request asks for, and one sampling step over a batch of logits.

Kept apart from the decode loop (engine.py) because it is pure math on a (B, V) logits matrix and
the per-row settings; the CLI, the chat and the server's scheduler all sample through it:
  SamplingParams      what a request asks for (temperature, top-k/p, min-p, penalty, seed, stops);
                      `resolve` puts the user's settings over the model's generation_config.json;
                      DEMO_PARAMS, the demo's and the training samples' settings
  BatchSampler        the sampling steps of a batch, each row with its own parameters and RNG
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
    stop_token_ids: list[int] | None = None  # None: the model's stop tokens (Engine.stop_token_ids)

    @classmethod
    def resolve(cls, given: Mapping[str, Any], model: Mapping[str, Any] | None = None,
                base: SamplingParams | None = None) -> SamplingParams:
        """Each field from `given` where it is set (not None; other keys, e.g. the rest of a CLI's
        arguments, are ignored), else from the model's own defaults (`model`, the fields its
        generation_config.json sets: `generation_defaults`), else from `base` (the caller's own
        defaults; these fields' defaults when None). Validated."""
        values = {f.name: getattr(base or cls(), f.name) for f in fields(cls)}
        values.update(model or {})
        values.update({name: value for name, value in given.items() if name in values and value is not None})
        return cls(**values).validate()

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


# The settings a model's generation_config.json may give (transformers' names are ours).
MODEL_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def generation_defaults(generation_config: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling a model's generation_config.json asks for, as SamplingParams fields: those of
    MODEL_SAMPLING_FIELDS it sets to a number, and temperature 0 (greedy) where `do_sample` is false.
    What the file leaves out is the caller's to default, as transformers and vLLM do."""
    defaults = {name: generation_config[name] for name in MODEL_SAMPLING_FIELDS
                if isinstance(generation_config.get(name), (int, float))
                and not isinstance(generation_config.get(name), bool)}
    if generation_config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


# The demo's settings (infer/demo.py), which the training samples also draw with (train/samples.py).
DEMO_PARAMS = SamplingParams(max_new_tokens=60, temperature=0.8, top_k=40, repetition_penalty=1.1)


class BatchSampler:
    """Samples the next token of every row of a batch, each row with its own settings and RNG.

    The rows' settings become device tensors once, when the batch is formed, not from Python lists
    at every token (each a host-to-device copy); the ids each row has seen, for the repetition
    penalty, are a (B, V) mask on the device that every sampled token is added to.

    Greedy rows (temperature 0) take the argmax; the others draw from their filtered distribution
    with their own `torch.Generator` (None: torch's global RNG), so a seeded row gives the same
    sample whatever else is in the batch.
    """

    def __init__(self, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                 previous: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str) -> None:
        self.generators = list(generators)
        greedy = [p.temperature == 0 for p in params]
        self.any_greedy, self.all_greedy = any(greedy), all(greedy)
        self.greedy = torch.tensor(greedy, device=device) if self.any_greedy and not self.all_greedy else None
        self.temperature = (torch.tensor([[p.temperature or 1.0] for p in params], device=device)
                            if not self.all_greedy else None)
        self.top_k = self.top_p = self.min_p = self.penalty = self.seen = None
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            self.top_k = torch.tensor([[p.top_k if p.top_k > 0 else vocab_size] for p in params], device=device)
            # p > 1 turns the nucleus off for rows with top_p = 1 (cumulative sums can round above 1).
            self.top_p = torch.tensor([[p.top_p if p.top_p < 1.0 else 2.0] for p in params], device=device)
        if any(p.min_p > 0 for p in params):
            self.min_p = torch.tensor([[p.min_p] for p in params], device=device)
        if any(p.repetition_penalty != 1.0 for p in params):
            self.penalty = torch.tensor([[p.repetition_penalty] for p in params], device=device)
            rows = [row for row, ids in enumerate(previous) for _ in ids]
            ids = [i for seen in previous for i in seen]
            self.seen = torch.zeros(len(params), vocab_size, dtype=torch.bool, device=device)
            self.seen[rows, ids] = True

    def __call__(self, logits: torch.Tensor, argmax: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) -> the next ids (B,); `argmax` is the logits' argmax when the caller has it."""
        logits = logits.float()
        if self.seen is not None:
            # CTRL's penalty, as transformers applies it: a seen token's logit is divided by the
            # penalty when positive and multiplied by it when negative (both make it less likely
            # for penalty > 1); a penalty of 1 leaves the logit exactly as it is.
            penalized = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
            logits = torch.where(self.seen, penalized, logits)
            argmax = None  # the penalty changed the logits
        if self.any_greedy and argmax is None:
            argmax = logits.argmax(dim=-1)
        if self.all_greedy:
            sampled = argmax
        else:
            sampled = self._draw(logits / self.temperature)
            if self.greedy is not None:
                sampled = torch.where(self.greedy, argmax, sampled)
        if self.seen is not None:
            self.seen.scatter_(1, sampled[:, None], True)
        return sampled

    def _draw(self, scores: torch.Tensor) -> torch.Tensor:
        if self.top_k is not None:
            scores = filter_top_k_top_p(scores, self.top_k, self.top_p)
        probs = torch.softmax(scores, dim=-1)
        if self.min_p is not None:
            probs = probs.masked_fill(probs < self.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) is a draw from p (the Gumbel-max
        # trick in another form). It needs no normalization after filtering and one noise row per
        # generator.
        noise = torch.empty_like(probs)
        if all(g is None for g in self.generators):
            noise.exponential_()
        else:
            for row, generator in enumerate(self.generators):
                noise[row].exponential_(generator=generator)
        return (probs / noise).argmax(dim=-1)


def filter_top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every score outside row i's top_k[i] tokens and outside the smallest set of most
    likely tokens whose probability reaches top_p[i]; both (B, 1), V and 2 meaning no limit."""
    ordered = scores.sort(dim=-1, descending=True).values
    keep = torch.arange(scores.shape[-1], device=scores.device)[None, :] < top_k
    probs = torch.softmax(ordered.masked_fill(~keep, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    keep &= mass_before < top_p
    keep[:, 0] = True  # the top token always stays, even for a top_p float32 rounds to 0 (5e-324)
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
