"""The policy-gradient and DPO losses against direct computations by hand on a tiny model: advantages
per completion, clipping on both sides, the average over every completion token of the step, the
KL estimator, and the DPO margin; values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwen3.config import ModelConfig
from qwen3.model.decoder import Qwen3ForCausalLM
from qwen3.model.loss import IGNORE
from qwen3.train.objectives import PolicyGradientLoss, PreferenceLoss

EPSILON, BETA, TEMPERATURE = 0.2, 0.05, 0.7


@pytest.fixture
def model() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
    return Qwen3ForCausalLM(config).double()


def rollouts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences: a 3-token prompt then a 4-token completion, and a 2-token prompt then a
    2-token completion and padding (x = ids[:-1], y = ids[1:], prompts and padding not learned)."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 0], [12, 13, 14, 15, 0, 0, 0, 0]])
    y = ids[:, 1:].clone()
    y[0, :2] = IGNORE  # targets 6, 7 are the prompt's
    y[1, :1] = IGNORE  # target 13 is the prompt's
    y[0, 6:] = IGNORE  # padding
    y[1, 3:] = IGNORE
    return ids[:, :-1], y


def by_hand(model: Qwen3ForCausalLM, x, y, advantages, old, ref, divisor, kl_beta) -> torch.Tensor:
    logits = model(x) / TEMPERATURE  # the full (B, T, V) forward pass
    total = torch.zeros((), dtype=torch.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if y[b, t] == IGNORE:
                continue
            logp = logits[b, t].log_softmax(-1)[y[b, t]]
            ratio = math.e ** (logp - old[b, t])
            surrogate = torch.minimum(ratio * advantages[b],
                                      torch.clamp(ratio, 1 - EPSILON, 1 + EPSILON) * advantages[b])
            kl = torch.exp(ref[b, t] - logp) - (ref[b, t] - logp) - 1
            total = total - surrogate + kl_beta * kl
    return total / divisor


@pytest.mark.parametrize("kl_beta", [0.0, 0.1])
def test_the_policy_gradient_loss_and_its_gradient_equal_the_hand_computation(model, kl_beta):
    x, y = rollouts()
    with torch.no_grad():
        logp = (model(x) / TEMPERATURE).log_softmax(-1).gather(2, y.clamp_min(0)[..., None]).squeeze(-1)
    # Old log-probabilities that put the ratios inside, above and below the clip range.
    shifts = torch.tensor([[0.0, 0.0, 0.05, -0.5, 0.5, 0.1, 0.0], [0.0, -0.3, 0.3, 0.0, 0.0, 0.0, 0.0]],
                          dtype=torch.float64)
    old, ref = logp + shifts, logp - 0.2
    advantages = torch.tensor([1.5, -0.7], dtype=torch.float64)
    divisor = torch.tensor(6.0, dtype=torch.float64)  # the step's completion tokens: 4 + 2
    ours = PolicyGradientLoss(model, EPSILON, kl_beta, TEMPERATURE)(x, y, advantages, old, ref, divisor)
    ours_grad = torch.autograd.grad(ours, list(model.parameters()))
    hand = by_hand(model, x, y, advantages, old, ref, divisor, kl_beta)
    hand_grad = torch.autograd.grad(hand, list(model.parameters()))
    assert torch.allclose(ours, hand, atol=1e-12, rtol=1e-10)
    for a, b in zip(ours_grad, hand_grad):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-9)
    # The clipping acted on these ratios: without it (a huge epsilon) the loss differs.
    unclipped = PolicyGradientLoss(model, 100.0, kl_beta, TEMPERATURE)(x, y, advantages, old, ref, divisor)
    assert abs(unclipped - ours) > 1e-3


def test_a_fresh_policy_with_no_kl_has_the_reinforce_gradient(model):
    """At the sampling policy (ratio 1) the clipped loss is plain REINFORCE with the group
    baseline: its gradient is -(1/N) sum_t A grad logp_t."""
    x, y = rollouts()
    advantages = torch.tensor([2.0, -1.0], dtype=torch.float64)
    logits = (model(x) / TEMPERATURE).log_softmax(-1)
    logp = logits.gather(2, y.clamp_min(0)[..., None]).squeeze(-1)
    learned = y != IGNORE
    reinforce = -(logp * advantages[:, None])[learned].sum() / 6
    loss = PolicyGradientLoss(model, EPSILON, 0.0, TEMPERATURE)(x, y, advantages, logp.detach(), logp.detach(),
                                                                torch.tensor(6.0, dtype=torch.float64))
    for a, b in zip(torch.autograd.grad(loss, list(model.parameters())),
                    torch.autograd.grad(reinforce, list(model.parameters()))):
        assert torch.allclose(a, b, atol=1e-12)


def test_the_dpo_loss_equals_the_hand_computation(model):
    x, y = rollouts()
    ref = torch.tensor([-9.0, -4.5], dtype=torch.float64)  # row 0 is the chosen reply, row 1 the rejected
    loss = PreferenceLoss(model, BETA)(x, y, ref, torch.tensor(1.0, dtype=torch.float64))
    logits = model(x).log_softmax(-1)
    summed = [sum(logits[b, t, y[b, t]] for t in range(y.shape[1]) if y[b, t] != IGNORE) for b in range(2)]
    hand = -F.logsigmoid(BETA * ((summed[0] - ref[0]) - (summed[1] - ref[1])))
    assert torch.allclose(loss, hand, atol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, list(model.parameters())),
                    torch.autograd.grad(hand, list(model.parameters()))):
        assert torch.allclose(a, b, atol=1e-12)
