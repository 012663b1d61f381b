"""The sliced head + cross-entropy (qwen3/model/loss.py) against the plain full-logits loss, and the memory
it saves; RMSNorm's output dtype under autocast."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import qwen3.model.loss as loss_module
from qwen3.model.decoder import RMSNorm
from qwen3.model.loss import linear_cross_entropy, loss_and_hits


@pytest.fixture(params=["one slice", "slices of 7 rows"])
def slicing(request, monkeypatch):
    if request.param != "one slice":
        monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 7 * 50)  # 7 rows at vocabulary 50
    return request.param


@pytest.mark.parametrize("divisor", [None, torch.tensor(71.0)], ids=["mean", "sum over a divisor"])
def test_loss_and_both_gradients_equal_the_full_logits_loss(slicing, divisor):
    torch.manual_seed(0)
    hidden = torch.randn(3, 13, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 13))
    targets[:, :4] = -100  # a loss mask: e.g. a prompt
    reference_hidden = hidden.detach().clone().requires_grad_()
    reference_weight = weight.detach().clone().requires_grad_()
    loss = linear_cross_entropy(hidden, weight, targets, divisor)
    reference = F.cross_entropy((reference_hidden @ reference_weight.T).flatten(0, 1), targets.flatten(),
                                reduction="mean" if divisor is None else "sum")
    reference = reference if divisor is None else reference / divisor
    (2.5 * loss).backward()  # a scale, as gradient accumulation and the float16 scaler apply
    (2.5 * reference).backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(hidden.grad, reference_hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, reference_weight.grad, rtol=1e-5, atol=1e-6)


def test_a_frozen_head_gets_no_gradient_and_the_rest_still_does():
    hidden = torch.randn(8, 16, requires_grad=True)
    weight = torch.randn(50, 16)  # e.g. a LoRA run: the head is frozen
    linear_cross_entropy(hidden, weight, torch.randint(0, 50, (8,))).backward()
    assert hidden.grad is not None and weight.grad is None


def test_evaluation_sums_equal_the_full_logits(slicing):
    torch.manual_seed(0)
    hidden, weight = torch.randn(4, 9, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (4, 9))
    logits = (hidden @ weight.T).flatten(0, 1)
    nats, hits, count = loss_and_hits(hidden, weight, targets)
    assert nats.item() == pytest.approx(F.cross_entropy(logits, targets.flatten(), reduction="sum").item(), rel=1e-6)
    assert hits.item() == (logits.argmax(-1) == targets.flatten()).sum().item()
    assert count.item() == 36


def test_no_targets_at_all_is_a_zero_loss_not_nan():
    hidden = torch.randn(4, 16, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(50, 16), torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum().item() == 0.0


def test_rms_norm_returns_the_autocast_dtype_and_float32_without_it():
    norm, x = RMSNorm(16), torch.randn(2, 16)
    assert norm(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), norm(x), rtol=1e-2, atol=1e-2)


# The memory one forward + backward adds to a fresh process: the full-logits loss, or ours in
# slices of 2^22 logits (128 rows).
STEP_MEMORY = textwrap.dedent("""
    import dataclasses, sys
    import torch, torch.nn.functional as F
    import qwen3.model.loss
    from qwen3.config import preset
    from qwen3.model.decoder import Qwen3ForCausalLM
    from qwen3.runtime import peak_rss_mb

    torch.set_num_threads(1)
    qwen3.model.loss.CHUNK_ELEMENTS = 2 ** 22
    model = Qwen3ForCausalLM(dataclasses.replace(preset("tiny")[0], vocab_size=32768, max_position_embeddings=256))
    x = torch.randint(0, 32768, (8, 256))
    before = peak_rss_mb()
    if sys.argv[1] == "full":
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), x.flatten())
    else:
        loss = qwen3.model.loss.linear_cross_entropy(model.model(x), model.lm_head.weight, x)
    loss.backward()
    print(peak_rss_mb() - before)
""")


def test_the_sliced_loss_never_holds_the_full_logits():
    # 8 x 256 positions x 32,768 logits = 256 MiB per float32 copy; the plain loss keeps three
    # (logits, the saved log-softmax, their gradient), the sliced one a few slices of 16 MiB.
    added = {}
    for mode in ("full", "sliced"):
        completed = subprocess.run([sys.executable, "-c", STEP_MEMORY, mode], capture_output=True, text=True,
                                   timeout=120)
        assert completed.returncode == 0, completed.stderr[-2000:]
        added[mode] = float(completed.stdout.split()[-1])  # MiB
    assert added["full"] - added["sliced"] > 384, added  # measured: 795 and 82 MiB
