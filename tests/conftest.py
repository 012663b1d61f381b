"""Fixtures shared by several test modules."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Decoding a tiny model is latency-bound: extra threads only wait for each other (and on a
    shared machine for the CPU), making these tests many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
