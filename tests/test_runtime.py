"""The machine helpers: the GPU peak table's matching, device choice under torchrun, the batch split."""

from __future__ import annotations

import pytest
import torch

from qwen3.errors import UserError
from qwen3.runtime import gpu_peak_flops, process_device
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
