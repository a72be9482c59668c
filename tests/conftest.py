"""Shared test set-up."""

import os

import pytest
import torch

os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models in unit tests: with other processes on 2 cores, OpenMP threads mostly wait on
    each other, so one thread is several times faster (and results are thread-count specific)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
