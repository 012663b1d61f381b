"""The objectives of the stages that learn from rewards and preferences instead of next tokens: the
clipped policy gradient of GRPO and the DPO loss. Each is the model and its loss in one module, as
`CausalLMLoss` is for the others, so DDP and the loop's micro-steps treat every stage alike: the
loop calls `module(*batch, divisor)` and backpropagates the summed loss over `divisor`.

Token log-probabilities. For inputs x (B, T) and targets y (B, T), y = -100 where nothing is
learned (the prompt, padding): logp[b, t] = log softmax(h[b, t] W^T / temperature)[y[b, t]], taken
only at the learned positions, so the (n, V) logits exist for those n tokens alone.

GRPO (Shao et al. 2024), averaged per token as DAPO (Yu et al. 2025) and Dr. GRPO (Liu et al. 2025)
do, so that a token counts the same whatever the length of its completion:
    ratio_t = exp(logp_t - old_t)                     old: the policy that sampled the rollout
    L = -(1/N) sum_t min(ratio_t A, clip(ratio_t, 1 - eps, 1 + eps) A)  +  (beta/N) sum_t KL_t
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1  Schulman's k3 estimator of KL(pi || ref):
                                                       unbiased, and never negative
where A is the completion's advantage (its reward against its group's: train/stages/rl.py) and N
the completion tokens of the whole optimizer step (the loop's divisor).

DPO (Rafailov et al. 2023), per preference pair (c chosen, r rejected), log-probabilities summed
over each reply's tokens, ref those of the frozen starting model:
    L = -(1/N) sum_pairs log sigmoid(beta [(logp(c) - ref(c)) - (logp(r) - ref(r))])
with N the pairs of the optimizer step. A batch holds the B chosen replies, then their B rejected ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.model.loss import IGNORE


def token_logprobs(model: Qwen3ForCausalLM, x: torch.Tensor, y: torch.Tensor,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) of the learned targets (y != -100), each flat (n,) in float32 at least, in the
    order of y's learned positions; the entropy (of the whole next-token distribution) carries no gradient."""
    hidden = model.model(x)                     # (B, T, C)
    learned = y != IGNORE                       # (B, T)
    logits = hidden[learned] @ model.lm_head.weight.T  # (n, V), in the autocast dtype if any
    logits = (logits.float() if logits.element_size() < 4 else logits) / temperature
    log_probs = logits.log_softmax(-1)
    logp = log_probs.gather(1, y[learned][:, None]).squeeze(1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def per_token(values: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A value per sequence (B,) repeated over its learned targets, flat (n,) as token_logprobs orders them."""
    return values[:, None].expand(y.shape)[y != IGNORE]


class PolicyGradientLoss(nn.Module):
    """GRPO's clipped surrogate (and optional KL to the starting model), summed over the completion
    tokens of a micro-batch and divided by `divisor`. A batch: x, y (B, T); advantages (B,); old and
    ref (B, T) log-probabilities at the targets (ref is read only when kl_beta > 0)."""

    def __init__(self, model: Qwen3ForCausalLM, clip_epsilon: float, kl_beta: float, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.clip_epsilon = clip_epsilon
        self.kl_beta = kl_beta
        self.temperature = temperature

    def forward(self, x: torch.Tensor, y: torch.Tensor, advantages: torch.Tensor, old: torch.Tensor,
                ref: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
        logp, _ = token_logprobs(self.model, x, y, self.temperature)
        learned = y != IGNORE
        advantage = per_token(advantages, y)
        ratio = (logp - old[learned]).exp()
        clipped = ratio.clamp(1 - self.clip_epsilon, 1 + self.clip_epsilon)
        loss = -torch.minimum(ratio * advantage, clipped * advantage)
        if self.kl_beta > 0:
            log_ratio = ref[learned] - logp
            loss = loss + self.kl_beta * (log_ratio.exp() - log_ratio - 1)
        return loss.sum() / divisor


def sequence_logprobs(model: Qwen3ForCausalLM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its learned targets, (B,)."""
    logp, _ = token_logprobs(model, x, y)
    rows = torch.arange(len(y), device=y.device)[:, None].expand(y.shape)[y != IGNORE]
    return torch.zeros(len(y), device=logp.device, dtype=logp.dtype).index_add(0, rows, logp)


class PreferenceLoss(nn.Module):
    """The DPO loss of a batch of pairs: x, y (2B, T), the B chosen rows then the B rejected ones;
    ref (2B,) the starting model's summed log-probabilities of the same rows."""

    def __init__(self, model: Qwen3ForCausalLM, beta: float) -> None:
        super().__init__()
        self.model = model
        self.beta = beta

    def forward(self, x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
        chosen, rejected = (sequence_logprobs(self.model, x, y) - ref).chunk(2)
        return -F.logsigmoid(self.beta * (chosen - rejected)).sum() / divisor
