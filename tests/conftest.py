"""Fixtures shared by several test modules."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import released
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Decoding a tiny model is latency-bound: extra threads only wait for each other (and on a
    shared machine for the CPU), making these tests many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def released_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A released-style Qwen3 folder (tests/released.py): 151,936 tokens, 40,960 positions, bfloat16,
    the released tokenizer, chat template and generation config; random weights, hidden 64 x 2 layers."""
    if (why := released.missing()) is not None:
        pytest.skip(why)
    return released.write_released_folder(tmp_path_factory.mktemp("released") / "Qwen3-tiny")
