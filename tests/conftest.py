"""Shared fixtures: small seeded tensors, offline hubs, one thread per test process."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no download is ever attempted from tests
os.environ.setdefault("KDNB_QUICK", "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"

torch.set_num_threads(1)


@pytest.fixture
def gen():
    """A seeded generator for reproducible random tensors."""
    return torch.Generator().manual_seed(0)


def load_fixture_script(name: str):
    """Imports ``tests/fixtures/<name>.py`` (the scripts that regenerate golden values)."""
    spec = importlib.util.spec_from_file_location(name, FIXTURES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
