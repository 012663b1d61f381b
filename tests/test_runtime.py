"""The machine helpers: the GPU peak table's matching, device choice (MPS included, as far as a
machine without one can check it), the weights' dtype, the batch split."""

from __future__ import annotations

import pytest
import torch

from qwen3.errors import UserError
from qwen3.runtime import gpu_peak_flops, process_device, resolve_device, weights_dtype
from qwen3.train.parallel import batch_layout


@pytest.mark.parametrize("name,flops", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA H20", 148e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA A10", 125e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L40", 181e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
    ("Tesla V100-SXM2-16GB", 125e12),
    ("Tesla T4", 65e12),
    ("NVIDIA A10G", None),          # not in the table: measured by the matmul probe instead
    ("NVIDIA GeForce RTX 4080", None),
])
def test_gpu_peak_table_matches_whole_words_and_the_longest_name(name, flops):
    assert gpu_peak_flops(name) == flops


def test_an_explicit_gpu_index_is_refused_under_torchrun():
    with pytest.raises(UserError, match="every process on one GPU.*LOCAL_RANK"):
        process_device("cuda:0", world_size=2, local_rank=1)
    assert process_device("cpu", world_size=2, local_rank=1) == torch.device("cpu")


@pytest.mark.parametrize("batch,accum,world,micro_steps,rows", [
    (4, 1, 1, 1, 4),
    (4, 1, 2, 1, 2),   # accumulation cannot be split: the rows are
    (4, 2, 2, 1, 4),   # accumulation split: each process one micro-batch of the whole width
    (8, 4, 2, 2, 8),
    (4, 2, 4, 1, 2),   # both: accumulation over 2 pairs of processes, rows over each pair
])
def test_the_global_batch_is_shared_without_changing_it(batch, accum, world, micro_steps, rows):
    layout = batch_layout(batch, accum, 64, world)
    assert (layout.micro_steps, layout.rows) == (micro_steps, rows)
    assert layout.tokens_per_step == batch * accum * 64


def test_a_batch_no_process_count_can_share_is_a_clear_error():
    with pytest.raises(UserError, match="2 processes cannot share a global batch of batch_size 3 x "
                                        "grad_accum 1.*multiple of 2"):
        batch_layout(3, 1, 64, 2)


def test_auto_is_the_cpu_here_and_mps_is_refused_where_there_is_none():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="no MPS"):
        resolve_device("mps")
    with pytest.raises(UserError, match="use auto, cpu, cuda, cuda:N or mps"):
        resolve_device("tpu")


def test_torchrun_on_mps_is_refused_before_any_process_group(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(UserError, match="no process group for Apple's GPU"):
        process_device("mps", world_size=2, local_rank=0)


@pytest.mark.parametrize("device,native,stored,expected", [
    ("cpu", False, torch.bfloat16, torch.float32),   # AVX2: emulated bfloat16 is far slower than float32
    ("cpu", True, torch.bfloat16, torch.bfloat16),   # AVX512-BF16 / AMX: half the bytes per token
    ("cpu", True, torch.float32, torch.float32),     # our own float32 checkpoints stay exact on a CPU
    ("cpu", False, torch.float16, torch.float32),
    ("cuda", True, torch.float32, torch.bfloat16),   # a GPU with bfloat16: as before
    ("cuda", False, torch.float32, torch.float32),
    ("mps", True, torch.bfloat16, torch.bfloat16),   # macOS 14 and later
    ("mps", False, torch.bfloat16, torch.float32),
])
def test_weights_keep_their_16_bits_where_the_device_multiplies_them_natively(monkeypatch, device, native, stored,
                                                                             expected):
    monkeypatch.setattr("qwen3.runtime.native_bfloat16", lambda _: native)
    chosen, why = weights_dtype("auto", stored, torch.device(device))
    assert chosen == expected and str(stored).removeprefix("torch.") in why
    assert weights_dtype("bfloat16", stored, torch.device(device)) == (torch.bfloat16, "as asked (--dtype)")
    with pytest.raises(UserError, match="unknown dtype 'int3'"):
        weights_dtype("int3", stored, torch.device(device))
