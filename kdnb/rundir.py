"""What guards a run directory: one process at a time, and the files a run depends on.

A run directory belongs to one training process: :class:`RunLock` locks ``.lock`` (and
writes the PID and host of its holder into it) before the run writes anything else, and
removes it when the run ends. A second process into the same directory is refused while
the holder lives; the lock dies with its process, so a killed run's directory is taken
over by the next run (with a warning), on any host.

A run also depends on files outside its directory: the teacher of a distillation run and
the pretext encoder it started from (``TrainConfig.teacher``, ``encoder_init``).
:func:`input_digests` hashes them and every checkpoint keeps the digests. A resume whose
teacher hashes differently is refused (:func:`input_differences`): a run continued with
another teacher would be a mix of two runs that neither file describes. A changed pretext
encoder only warns, since a resumed run loads every weight from its checkpoint.

Introduced in notebooks/00_setup_and_data.ipynb.
"""
from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

from .checkpoint import file_sha256, writing

try:
    import fcntl
except ImportError:  # not POSIX (Windows): runs go unlocked
    fcntl = None
from .config import TrainConfig

__all__ = ["RunLock", "RunLockedError", "check_run_dir", "input_digests", "input_differences"]

#: Config fields that name a file a run depends on (hashed into its checkpoints).
INPUT_FILES = ("teacher", "encoder_init")


def check_run_dir(run_dir: str | Path) -> None:
    """Refuses a run directory that is not, and cannot become, a folder: a file, a symlink
    to itself (or in a loop), a symlink to nothing, a path through a file.

    Raises:
        FileExistsError: naming the path, what it is and the fix.
    """
    path = Path(run_dir)
    for where in (*reversed(path.parents), path):
        said = (f"the run directory {path}" if where == path
                else f"the run directory {path} cannot be created: {where}")
        try:
            where.stat()
        except FileNotFoundError:
            if where.is_symlink():
                raise FileExistsError(f"{said} is a symlink to {os.readlink(where)}, which does "
                                      f"not exist: remove the link (rm {where}) or choose "
                                      "another --run-dir") from None
            return  # the rest is created by the run
        except OSError as err:  # ELOOP: a symlink to itself, or a loop of them
            raise FileExistsError(f"{said} is a symlink loop ({err.strerror}; it points to "
                                  f"{os.readlink(where)}): remove the link (rm {where}) or "
                                  "choose another --run-dir") from None
        if not where.is_dir():
            raise FileExistsError(f"{said} is a file, not a folder: move the file away or "
                                  "choose another --run-dir")


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """``.lock`` in a run directory, held by one process for the length of a run.

    The lock is the kernel's (``fcntl.flock`` on the open file), so it ends with its
    process however that process ends, on this host and on another one sharing the
    filesystem; the file's JSON (PID, host, start time) only names the holder in the
    message. A process that dies without :meth:`release` leaves the file, and the next
    run takes it over. On a filesystem without file locks the run goes on unlocked, with
    a warning. Use as a context manager, or :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fh = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def acquire(self) -> "RunLock":
        if fcntl is None:
            warnings.warn("no file locks on this platform: start one process per run directory")
            return self
        while True:
            with writing(self.path):  # a read-only run directory says so, with the fix
                fh = open(self.path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = _holder(fh.read())
                fh.close()
                raise RunLockedError(
                    f"{self.path.parent} is in use: {holder} trains there. Wait for it to "
                    "end (or stop it), or choose another --run-dir") from None
            except OSError as err:  # no file locks here (some network or FUSE filesystems)
                fh.close()
                warnings.warn(f"{self.path}: this filesystem has no file locks ({err}); the run "
                              "goes on unlocked: start one process per run directory")
                return self
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file that its holder removed while we opened it
                break
            fh.close()
        fh.seek(0)
        left = fh.read()
        if left.strip():
            warnings.warn(f"{self.path} was left by {_holder(left)}, which has ended (killed?): "
                          "taking the run directory over")
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.time()}))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self.path.unlink(missing_ok=True)  # while still held: no one locks a removed file
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(text: str) -> str:
    """Who a lock file names, for a message."""
    try:
        info = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"process {int(info['pid'])} on host {info['host']} (since {since})"
    except (ValueError, TypeError, KeyError, OverflowError, OSError):
        return "another process"


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
    checkpoint did not hash, or one the run no longer finds, is not compared). The teacher
    counts; a changed ``encoder_init`` is only warned about (the checkpoint holds every
    weight it set)."""
    problems = []
    for field in INPUT_FILES:
        if field in saved and field in current and saved[field] != current[field]:
            line = (f"the {field} {getattr(cfg, field)} is not the file this run was trained "
                    f"with (SHA-256 {current[field][:12]}..., the checkpoint says "
                    f"{saved[field][:12]}...)")
            if field == "teacher":
                problems.append(line)
            else:
                warnings.warn(line + ": resuming anyway, every weight comes from the checkpoint")
    return problems
