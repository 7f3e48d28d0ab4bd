"""Interpretation tests run tiny models, whose steps are far shorter than a thread hand-off: one thread."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
