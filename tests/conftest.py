"""Shared fixtures: small seeded tensors, offline hubs, one thread per test process, and a
JupyterLab server for the lab and browser tests."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no download is ever attempted from tests
os.environ.setdefault("KDNB_QUICK", "1")

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_jupyterlab(root_dir: Path, log: Path, *, token: str, env: dict | None = None,
                       args: tuple[str, ...] = ()):
    """JupyterLab on 127.0.0.1 at a free port, with ``token``, over ``root_dir``; yields the
    port once the server answers, stops it on exit. Its output goes to ``log``."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
             "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={root_dir}", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}",
                                                timeout=10):
                        break
                except OSError:  # not listening yet
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
