"""Shared settings of the model tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """Run the model tests on one thread: their nets are narrow, so a second thread buys
    little, and on a busy 2-core machine oversubscribed threads made the suite 3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
