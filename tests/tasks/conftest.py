"""Fixtures shared by the task tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models: a second intra-op thread costs more in synchronisation than it saves (100x on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
