"""The modeling tests run their tiny models on one thread: on small tensors the intra-op thread
pool costs more than it saves, and much more when the CPU is shared."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
