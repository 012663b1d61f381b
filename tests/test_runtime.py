"""The machine helpers: the GPU peak table's matching."""

from __future__ import annotations

import pytest

from qwen3.runtime import gpu_peak_flops


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

