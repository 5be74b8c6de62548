"""Inference tests run tiny models: one intra-op thread is faster than two on a loaded machine (each tiny
op would otherwise pay a thread-pool barrier), and the results do not depend on it."""

import pytest
import torch

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
