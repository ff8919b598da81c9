"""Checkpoints: atomic writes with SHA-256 manifests, verification, loading, the resume rule.

A checkpoint is written to a temporary file in the same folder, fsynced, given a manifest
``<name>.sha256.json`` (written the same way) and renamed into place, so a process killed
at any moment (SIGKILL included) leaves the old file or the new one, never half of one; a
checkpoint truncated or changed later fails its manifest on load. Checkpoints load with
``torch.load(weights_only=True)``, which runs no code from the file, and carry the preset,
the class count and the kdnb version, checked on load.

The resume rule: a run directory resumes only under the settings it was started with
(:func:`config_differences`, except :data:`RESUME_MAY_CHANGE`), from its newest checkpoint
that passes its manifest (:func:`load_newest_good`).

Introduced in notebooks/05_real_datasets_at_scale.ipynb.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .config import TrainConfig, json_kind, read_json_object
from .models import PRESETS, SegModel, build_model


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, fails its checksum, lacks kdnb's entries or was
    written by a newer kdnb; the message names the file and what to do."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped on resume (the message names it and why)."""


class RunWriteError(OSError):
    """A file of a run could not be written: the disk is full, over quota or read-only. The
    message names the file, the free space and what to do; nothing was left half-written."""


_NOT_WRITABLE = ("permission denied: this user may not write there", "make the run directory "
                 "writable (chmod -R u+w {folder}), or copy it elsewhere and continue there "
                 "with --run-dir ... --resume")
#: errno -> what it means for a write, and what to do
_WRITE_ERRNOS = {
    errno.ENOSPC: ("the disk is full", "free space there (old runs, checkpoints), or move the "
                   "run directory to a larger disk, then continue with --resume"),
    errno.EDQUOT: ("the disk quota is used up", "free space within the quota, or move the run "
                   "directory to another disk, then continue with --resume"),
    errno.EROFS: ("the filesystem is read-only", "remount it writable, or copy the run "
                  "directory to a writable disk and continue there with --run-dir ... --resume"),
    errno.EACCES: _NOT_WRITABLE,
    errno.EPERM: _NOT_WRITABLE,
}


def _free_space(folder: Path) -> str:
    """The free space on the disk that holds ``folder`` (or its nearest existing parent)."""
    for where in (folder, *folder.parents):
        try:
            usage = shutil.disk_usage(where)
        except OSError:
            continue
        free = (f"{usage.free / 2 ** 30:,.1f} GiB" if usage.free >= 2 ** 30
                else f"{usage.free / 2 ** 20:,.1f} MiB")
        return f"{free} free of {usage.total / 2 ** 30:,.1f} GiB"
    return "free space unknown"


def write_failure(err: BaseException, path: Path) -> RunWriteError | None:
    """``err``, raised while writing ``path``, as a :class:`RunWriteError` when the disk is
    full, over quota or read-only; None for any other error.

    torch reports a write that failed inside ``torch.save`` as a RuntimeError
    (``[enforce fail at inline_container.cc:...] . unexpected pos ...``) with the OSError
    as its context: both count.
    """
    path = Path(path)
    cause, code, torch_stopped = err, None, False
    while cause is not None and code is None:
        if isinstance(cause, OSError) and cause.errno in _WRITE_ERRNOS:
            code = cause.errno
        torch_stopped |= isinstance(cause, RuntimeError) and "inline_container" in str(cause)
        cause = cause.__cause__ or cause.__context__
    if code is None and not torch_stopped:
        return None
    folder = path.parent
    if code is None:  # torch saw a short write and no OSError says why: most often a full disk
        what, fix = (f"torch stopped mid-file ({str(err).splitlines()[0]}), which a full disk "
                     "causes"), _WRITE_ERRNOS[errno.ENOSPC][1]
    else:
        what, fix = _WRITE_ERRNOS[code]
    failure = RunWriteError(f"cannot write {path}: {what} ({_free_space(folder)} there); nothing "
                            f"was left half-written. What to do: {fix.format(folder=folder)}")
    failure.errno = code
    return failure


@contextlib.contextmanager
def writing(path: Path):
    """Turns a disk-full or read-only error raised inside the block into a
    :class:`RunWriteError` naming ``path`` (:func:`write_failure`); others pass unchanged."""
    try:
        yield
    except RunWriteError:
        raise
    except (OSError, RuntimeError) as err:
        failure = write_failure(err, path)
        if failure is None:
            raise
        raise failure from err


def manifest_path(path: Path) -> Path:
    """The manifest beside a checkpoint: ``ckpt-0000300.pt`` -> ``ckpt-0000300.pt.sha256.json``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256.json")


class _HashingWriter:
    """A file-like object that hashes the bytes ``torch.save`` writes on their way to disk."""

    def __init__(self, fh):
        self.fh, self.sha256, self.nbytes = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.nbytes += memoryview(data).nbytes
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def _fsync_dir(folder: Path) -> None:
    try:  # make a rename durable (not possible on every platform)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_durably(path: Path, write: Callable) -> None:
    """Writes through ``write(file)`` to a temporary file in the same folder, fsyncs it and
    renames it over ``path``: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path), open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        with writing(path):
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_save_json(obj, path: Path) -> None:
    """Writes JSON durably: a temporary file, fsynced, renamed over ``path``."""
    atomic_write_bytes((json.dumps(obj, indent=2) + "\n").encode(), path)


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Writes ``data`` durably: a temporary file, fsynced, renamed over ``path``."""
    _write_durably(Path(path), lambda f: f.write(data))


def append_line(path: Path, line: str) -> None:
    """Appends one line to a log whole or not at all: a write that fails (a full disk,
    Ctrl-C) is cut back off, so the log never ends in half a line this process wrote."""
    data = memoryview(line.encode())
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.fstat(fd).st_size
            try:
                while data:  # a full disk may take part of the line before it refuses
                    data = data[os.write(fd, data):]
            except BaseException:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


def atomic_save(obj, path: Path) -> str:
    """Saves ``obj`` with ``torch.save`` so that a kill at any moment leaves no half file.

    The bytes go to a temporary file (fsynced); their SHA-256 goes to a manifest beside
    the target (``<name>.sha256.json``, written the same way); then the temporary file is
    renamed over ``path``. A process killed before the rename leaves the old ``path`` (or
    none) and a stray temporary file, never a half-written checkpoint under its real name;
    a checkpoint truncated or changed later fails its manifest on load.

    Returns:
        The SHA-256 hex digest of the file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path), open(tmp, "wb") as fh:
            writer = _HashingWriter(fh)
            torch.save(obj, writer)
            fh.flush()
            os.fsync(fh.fileno())
        digest = writer.sha256.hexdigest()
        atomic_save_json({"file": path.name, "bytes": writer.nbytes, "sha256": digest,
                          "kdnb_version": __version__}, manifest_path(path))
        with writing(path):
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return digest


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(path: Path) -> bool:
    """Checks a checkpoint against its manifest; False when it has none (written by an
    older kdnb, or copied without it), True when it matches.

    Raises:
        CheckpointError: the file is shorter or longer than the manifest says, or its
            bytes differ (a truncated copy, a disk error, an edit).
    """
    manifest = manifest_path(path)
    if not manifest.is_file():
        return False
    try:
        expected = json.loads(manifest.read_text())
        nbytes, digest = int(expected["bytes"]), str(expected["sha256"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"the manifest {manifest} of checkpoint {path} is unreadable "
                              f"({err}): delete the manifest to load the checkpoint unverified, "
                              "or use another checkpoint") from err
    size = path.stat().st_size
    if size != nbytes:
        raise CheckpointError(f"checkpoint {path} is {'truncated' if size < nbytes else 'too long'}"
                              f" ({size} bytes; {manifest.name} says {nbytes}): use an earlier "
                              "checkpoint of the run (--resume picks the newest good one) or "
                              "train again")
    actual = file_sha256(path)
    if actual != digest:
        raise CheckpointError(f"checkpoint {path} fails its checksum (sha256 {actual[:16]}..., "
                              f"{manifest.name} says {digest[:16]}...): it was changed or damaged "
                              "after kdnb wrote it; use an earlier checkpoint of the run (--resume "
                              "picks the newest good one) or train again")
    return True


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in str(version).split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, newest first."""
    return sorted(Path(run_dir).glob("ckpt-*.pt"), key=lambda p: p.name, reverse=True)


def holds_run(run_dir: str | Path) -> bool:
    """Whether a directory holds a run to resume: its ``config.json`` or a checkpoint."""
    return (Path(run_dir) / "config.json").is_file() or bool(checkpoint_paths(Path(run_dir)))


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint's name (``ckpt-0000300.pt`` -> 300)."""
    return int(Path(path).stem.split("-")[-1])


#: what every kdnb checkpoint carries (checked on load)
CHECKPOINT_KEYS = ("model", "preset", "num_classes", "kdnb_version")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Loads a kdnb checkpoint safely and checks it.

    ``torch.load(weights_only=True)`` runs no code from the file. Before that the file is
    checked against its manifest (:func:`verify_checkpoint`); after, the entries every
    kdnb checkpoint carries (weights, preset, class count, kdnb version) must be there and
    the version must not be newer than this kdnb.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: truncated, changed, unreadable, not kdnb's, or too new; the
            message names the file and what to do.
    """
    path = Path(path)
    if path.is_dir():
        inside = "model.pt" if (path / "model.pt").is_file() else "a ckpt-*.pt file"
        raise FileNotFoundError(f"checkpoint {path} is a folder (a run directory?): pass the "
                                f"path of {inside} inside it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass the path of a "
                                "ckpt-*.pt or model.pt file written by kdnb")
    verify_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        first = (str(err).splitlines() or [""])[0].split(". ")[0]  # torch's first sentence
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {first}); "
                              "it may be truncated or not a kdnb checkpoint: use an earlier one "
                              "(--resume picks the newest good one) or train again") from err
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        entries = ", ".join(map(repr, missing))
        raise CheckpointError(f"{path} is not a kdnb checkpoint (no {entries} entries): pass a "
                              "model.pt or ckpt-*.pt written by kdnb")
    if _version_tuple(ckpt["kdnb_version"])[:2] > _version_tuple(__version__)[:2]:
        raise CheckpointError(f"checkpoint {path} was written by kdnb {ckpt['kdnb_version']}, "
                              f"newer than this kdnb {__version__}: upgrade kdnb (pip install -U "
                              "kdnb) or use a checkpoint written by this version")
    preset, classes = ckpt["preset"], ckpt["num_classes"]
    if not isinstance(preset, str) or preset not in PRESETS:
        raise CheckpointError(f"checkpoint {path} holds unknown model preset {preset!r} (this "
                              f"kdnb knows {', '.join(sorted(PRESETS))}): it was edited or "
                              "written by another kdnb; pass a checkpoint of a preset that "
                              "`kdnb presets` lists")
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
        raise CheckpointError(f"checkpoint {path} records num_classes={classes!r} "
                              f"({json_kind(classes)}), not an integer >= 2: it was edited or not "
                              "written by kdnb; pass a checkpoint written by kdnb")
    return ckpt


def model_from_record(ckpt: dict, path: str | Path = "checkpoint", *, preset: str | None = None,
                      num_classes: int | None = None) -> SegModel:
    """Rebuilds the model of a loaded checkpoint (:func:`load_checkpoint`), checking preset
    and class count; ``path`` names the file in errors."""
    if preset is not None and preset != ckpt["preset"]:
        raise ValueError(f"checkpoint {path} holds preset {ckpt['preset']!r}, not {preset!r}: "
                         f"pass --model {ckpt['preset']} or another checkpoint")
    if num_classes is not None and num_classes != ckpt["num_classes"]:
        raise ValueError(f"checkpoint {path} predicts {ckpt['num_classes']} classes but the "
                         f"dataset has {num_classes}: it was trained on another dataset; pass "
                         "a checkpoint trained on this one")
    model = build_model(ckpt["preset"], ckpt["num_classes"], **ckpt.get("model_kwargs", {}))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path} does not fit preset {ckpt['preset']!r} "
                         f"({str(err).splitlines()[0]}): it was written by another model") from err
    return model


def model_from_checkpoint(path: str | Path, *, preset: str | None = None,
                          num_classes: int | None = None, map_location="cpu") -> SegModel:
    """Rebuilds the model saved in a checkpoint, checking preset and class count."""
    return model_from_record(load_checkpoint(path, map_location), path, preset=preset,
                             num_classes=num_classes)


def save_checkpoint(state: dict, run_dir: Path, step: int, keep: int) -> Path:
    """Writes ``ckpt-<step>.pt`` atomically (:func:`atomic_save`) and keeps the newest ``keep``.

    Only checkpoints up to ``step`` count for ``keep``: newer ones left by an earlier
    attempt (skipped on resume as damaged) are overwritten when the run gets there, and
    never crowd out the checkpoints just written.
    """
    path = Path(run_dir) / f"ckpt-{step:07d}.pt"
    atomic_save(state, path)
    ours = [p for p in checkpoint_paths(run_dir) if checkpoint_step(p) <= step]
    for old in ours[keep:]:
        old.unlink(missing_ok=True)
        manifest_path(old).unlink(missing_ok=True)
    return path


def load_newest_good(run_dir: Path, map_location="cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint of a run that loads and passes its manifest, and its contents;
    None when the run has no checkpoint.

    Checkpoints are tried newest first. One that is truncated, fails its manifest's
    checksum, or does not load is skipped with a :class:`CheckpointWarning` that names it
    and says why, and the previous one is tried.

    Raises:
        CheckpointError: the run has checkpoints but none of them is good.
    """
    skipped = []
    for path in checkpoint_paths(run_dir):
        try:
            return path, load_checkpoint(path, map_location=map_location)
        except CheckpointError as err:
            warnings.warn(f"skipping {path.name}, trying an older checkpoint: {err}",
                          CheckpointWarning, stacklevel=2)
            skipped.append(path.name)
    if skipped:
        raise CheckpointError(f"none of the checkpoints in {run_dir} is good "
                              f"({', '.join(skipped)}; the warnings say why): start again "
                              "in a new --run-dir, or delete them to train here from step 0")
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_files(run_dir: Path) -> list[Path]:
    """Removes what killed processes left in a run directory: their temporary files, and
    manifests whose checkpoint was never renamed into place. Returns what it removed."""
    removed = []
    for tmp in Path(run_dir).glob(".*.tmp*"):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # a live process is writing it
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    for manifest in Path(run_dir).glob("*.sha256.json"):
        if not manifest.with_name(manifest.name[:-len(".sha256.json")]).exists():
            manifest.unlink(missing_ok=True)
            removed.append(manifest)
    return removed


#: Config fields a resumed run may change (everything else must match the saved run): a step
#: that completes normally is the same either way, and neither evaluation's batch, the
#: number of checkpoints kept nor the FLOP count (kdnb.cost) changes a weight (the thread
#: count can: float sums in another order).
RESUME_MAY_CHANGE = ("skip_nonfinite", "eval_batch_size", "keep_checkpoints", "count_flops")


def saved_config(path: Path) -> dict | None:
    """A run's ``config.json`` as a dict, fields added to kdnb since it was written at their
    defaults; ``None`` when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    saved = read_json_object(path, "the run's config", "delete it (--resume restores it from "
                             "the newest checkpoint) or use a new --run-dir")
    return {**TrainConfig().to_json(), **saved}


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """The fields in which ``cfg`` differs from a saved run's config (those a resume may
    change left out): a run resumes only when this is empty."""
    current = cfg.to_json()
    return sorted(k for k in set(saved) | set(current)
                  if saved.get(k) != current.get(k) and k not in RESUME_MAY_CHANGE)


