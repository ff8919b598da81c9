"""Shared fixtures: small seeded tensors, offline hubs, one thread per test process."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no download is ever attempted from tests
os.environ.setdefault("KDNB_QUICK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def gen():
    """A seeded generator for reproducible random tensors."""
    return torch.Generator().manual_seed(0)
