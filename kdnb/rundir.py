"""What guards a run directory: one process at a time, and the files a run depends on.

A run directory belongs to one training process: :class:`RunLock` writes ``.lock`` (the
PID and host of its holder) before the run writes anything else, and removes it when the
run ends, however it ends. A second process into the same directory is refused while the
holder lives; a lock left by a killed process on this host (its PID no longer runs) is
taken over with a warning. A lock from another host cannot be checked from here: the
message says to delete it once that process is known to be gone.

A run also depends on files outside its directory: the teacher of a distillation run and
the pretext encoder it started from (``TrainConfig.teacher``, ``encoder_init``).
:func:`input_digests` hashes them; every checkpoint keeps the digests, and a resume whose
files hash differently is refused (:func:`input_differences`), since a run continued with
another teacher would be a mix of two runs that neither file describes.

Introduced in notebooks/00_setup_and_data.ipynb.
"""
from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

from .checkpoint import _alive, file_sha256
from .config import TrainConfig

__all__ = ["RunLock", "RunLockedError", "input_digests", "input_differences"]

#: Config fields that name a file a run depends on (hashed into its checkpoints).
INPUT_FILES = ("teacher", "encoder_init")


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """``.lock`` in a run directory, held by one process for the length of a run.

    Use as a context manager, or :meth:`acquire` / :meth:`release`. The lock file is
    created with ``O_EXCL``, so two processes starting at once cannot both take it.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self.held = False

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):  # the second try follows the removal of a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale()
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise RunLockedError(f"could not take {self.path}: another process took it at the "
                             "same moment; wait for it to end")

    def _clear_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}  # half-written by a process killed while taking it
        pid, host = holder.get("pid"), holder.get("host")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
        if isinstance(pid, int) and host == socket.gethostname() and _alive(pid):
            raise RunLockedError(
                f"{self.path.parent} is in use: process {pid} on this host has trained there "
                f"since {since}. Wait for it to end (or stop it), or choose another --run-dir")
        if host not in (None, socket.gethostname()):
            raise RunLockedError(
                f"{self.path.parent} is locked by process {pid} on host {host} (since "
                f"{since}), which cannot be checked from here: if that process has ended, "
                f"delete {self.path} and run again; else choose another --run-dir")
        warnings.warn(f"{self.path} was left by process {pid}, which no longer runs "
                      "(killed?): taking the run directory over")
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def input_digests(cfg: TrainConfig) -> dict[str, str]:
    """SHA-256 of each file the config depends on (:data:`INPUT_FILES`) that exists.

    A teacher given in memory (``cfg.teacher`` a label, not a file) has no digest.
    """
    digests = {}
    for field in INPUT_FILES:
        value = getattr(cfg, field)
        if value and Path(value).is_file():
            digests[field] = file_sha256(Path(value))
    return digests


def input_differences(saved: dict, current: dict, cfg: TrainConfig) -> list[str]:
    """One line per input file whose digest differs from the checkpoint's (a file the
    checkpoint did not hash, or one the run no longer finds, is not compared)."""
    return [f"the {field} {getattr(cfg, field)} is not the file this run was trained with "
            f"(SHA-256 {current[field][:12]}..., the checkpoint says {saved[field][:12]}...)"
            for field in INPUT_FILES
            if field in saved and field in current and saved[field] != current[field]]
