"""Next-token cross-entropy from the final hidden states, a slice of rows at a time.

The plain way, `cross_entropy(lm_head(h).float(), y)`, holds every position's logits at once: in the
autocast dtype, again in float32, the saved log-softmax and its gradient. At the qwen3-0.6b shape
(vocabulary 151,936) and 16k tokens per micro-batch that is 2.5e9 elements, 25-30 GB, more than the
rest of the step. Here the head and the loss run over `chunk_rows` rows at a time, so only one
slice's logits ever exist.

Training (`linear_cross_entropy`) takes the gradient in the same pass, as the fused kernels of
Liger and Apple's cut-cross-entropy do: for each slice, softmax(logits) - onehot(y) is the gradient of
the summed loss with respect to the logits, and two matmuls turn it into the gradients of the hidden
states and of the head's weight; backward only scales them by the incoming gradient. No logits are
recomputed and none are saved. Evaluation (`loss_and_hits`) runs the same slices without gradients.
`CausalLMLoss` is the model and this loss as one module: what a training step calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen3.model.decoder import Qwen3ForCausalLM

IGNORE = -100  # targets that carry no loss (transformers' and cross_entropy's convention)
CHUNK_ELEMENTS = 2 ** 25  # logits per slice: 128 MB in float32 (4,096 rows at vocabulary 8,192)


def chunk_rows(vocab_size: int) -> int:
    """Rows of one slice, so that a slice holds about CHUNK_ELEMENTS logits."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


class LinearCrossEntropy(torch.autograd.Function):
    """sum over targets != IGNORE of -log softmax(h W^T)[y], divided by `divisor` (by default the
    number of those targets: the mean); both gradients taken in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                rows: int, divisor: torch.Tensor | None) -> torch.Tensor:
        # hidden (N, C), weight (V, C), targets (N,)
        count = divisor if divisor is not None else target_count(targets)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start:start + rows], targets[start:start + rows]
            logits = (h @ weight.T).float()  # (n, V); the matmul runs in the autocast dtype, if any
            total += F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum")
            # d(summed loss)/d(logits) = softmax(logits) - onehot(y), and 0 on ignored rows: (n, V)
            kept = (y != IGNORE)[:, None]
            grad_logits = logits.softmax(-1)
            del logits
            grad_logits.scatter_add_(1, y.clamp_min(0)[:, None], -kept.float())
            grad_logits = grad_logits.mul_(kept).to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + rows] = grad_logits @ weight  # (n, C)
            if grad_weight is not None:
                grad_weight += grad_logits.T @ h  # (V, C), summed over slices in float32
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output / count  # the forward's gradients are of the sum; the output is the mean
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype),
                None, None, None)


def target_count(targets: torch.Tensor) -> torch.Tensor:
    """The targets that carry loss, at least 1: no targets at all gives a loss of 0, never 0/0."""
    return (targets != IGNORE).sum().clamp_min(1)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         divisor: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the logits hidden @ weight.T (hidden (..., C), weight (V, C)) against
    `targets` (...), leaving out targets of IGNORE, without ever holding all the logits: the mean,
    or with `divisor` the sum divided by it (a count of targets over several micro-batches)."""
    hidden, targets = hidden.flatten(0, -2), targets.flatten()
    rows = chunk_rows(weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, targets, rows, divisor)
    nats, _, _ = loss_and_hits(hidden, weight, targets)
    return nats.float() / (divisor if divisor is not None else target_count(targets))


def loss_and_hits(hidden: torch.Tensor, weight: torch.Tensor,
                  targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Without gradients: summed cross-entropy (nats), targets predicted right (the top logit) and
    targets counted, as device tensors, of hidden (..., C) @ weight.T against targets (...)."""
    hidden, targets = hidden.flatten(0, -2), targets.flatten()
    rows = chunk_rows(weight.shape[0])
    nats = torch.zeros((), dtype=torch.float64, device=hidden.device)
    hits = torch.zeros((), dtype=torch.int64, device=hidden.device)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], rows):
            y = targets[start:start + rows]
            logits = (hidden[start:start + rows] @ weight.T).float()  # (n, V)
            nats += F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum")
            hits += (logits.argmax(-1) == y).sum()
    return nats, hits, (targets != IGNORE).sum()


class CausalLMLoss(nn.Module):
    """The model plus its mean next-token cross-entropy: one module, so DDP and torch.compile see
    the whole forward pass. The loss is taken a slice of rows at a time (`linear_cross_entropy`), so
    the full logits never exist; targets of -100 are left out of the mean: that is the loss mask.
    With `divisor` the summed loss is divided by it instead of by this batch's count of targets."""

    def __init__(self, model: Qwen3ForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, divisor: torch.Tensor | None = None) -> torch.Tensor:
        return linear_cross_entropy(self.model.model(x), self.model.lm_head.weight, y, divisor)
