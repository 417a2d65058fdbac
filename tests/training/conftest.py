"""Fixtures of the training tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """One PyTorch thread in this process: on a shared two-core machine OpenMP's threads wait
    on each other at every small operation. (The default-thread cases run in subprocesses.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
