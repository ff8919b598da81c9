"""Training: the loop, checkpoints, exact resume, evaluation.

One code path for CPU and CUDA (bf16 autocast and channels-last on CUDA), for one process
and for ``torchrun`` (DDP). The data order is a pure function of ``(seed, step)`` and
every augmentation is seeded per sample, so a run resumed from a checkpoint at step k
continues exactly as if it had never stopped.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON record per line),
checkpoints ``ckpt-<step>.pt``, ``final.json`` and ``model.pt``. Checkpoints and
``model.pt`` are written atomically, each with a SHA-256 manifest ``<name>.sha256.json``:
a run killed at any moment (SIGKILL included) resumes from its newest good checkpoint, and
a truncated or altered one is named and skipped. A NaN or Inf loss stops the run before
anything from that step is written (``skip_nonfinite`` skips such steps instead); the
data and the teacher are checked before any long work starts.

Introduced in notebooks/00_setup_and_data.ipynb.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import __version__
from .config import TrainConfig
from .data import build_dataset, dataset_info, validate_dataset
from .metrics import SegMetric
from .models import SegModel, build_model, get_preset

IGNORE_INDEX = 255
Callback = Callable[[dict], None]


# --------------------------------------------------------------------------- machine
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if dist.is_available() and dist.is_initialized() and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but CUDA is not available here: use --device cpu")
    return device


def init_distributed() -> tuple[int, int]:
    """Joins the process group when launched by ``torchrun``; returns ``(rank, world)``."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------- data order
class StepSampler(Sampler):
    """Batches of ``(index, epoch)`` keys for steps ``start..steps-1``, a function of the seed.

    Epoch ``e`` is a permutation drawn from ``seed + e``; a global batch is the next
    ``batch_size`` keys (an epoch's remainder is dropped), and DDP rank ``r`` of ``world``
    takes keys ``r::world`` of it. Resuming at step k therefore reproduces exactly the
    batches an uninterrupted run would have seen.
    """

    def __init__(self, n: int, batch_size: int, steps: int, *, seed: int, start: int = 0,
                 rank: int = 0, world: int = 1):
        if n < batch_size:
            raise ValueError(f"the training set has {n} samples, fewer than one batch of "
                             f"{batch_size}: lower --batch-size or add data")
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by {world} processes")
        self.n, self.batch_size, self.steps, self.seed = n, batch_size, steps, seed
        self.start, self.rank, self.world = start, rank, world
        self.per_epoch = n // batch_size

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, order = -1, None
        for step in range(self.start, self.steps):
            e, b = divmod(step, self.per_epoch)
            if e != epoch:
                epoch = e
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e))
            keys = order[b * self.batch_size:(b + 1) * self.batch_size].tolist()
            yield [(i, e) for i in keys[self.rank::self.world]]


def collate(batch):
    """Stacks ``(image, mask[, index])`` samples into batch tensors."""
    return tuple(torch.stack(x) if isinstance(x[0], torch.Tensor) else torch.tensor(x)
                 for x in zip(*batch))


class Indexed(Dataset):
    """Adds each sample's dataset index, so per-sample caches can be looked up."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index = key if isinstance(key, int) else key[0]
        return (*self.dataset[key], index)


# --------------------------------------------------------------------------- schedule
def poly_lambda(steps: int, power: float, warmup: int = 0) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1 - step / steps) ** power
    return factor


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------- checkpoints
class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, fails its checksum, lacks kdnb's entries or was
    written by a newer kdnb; the message names the file and what to do."""


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or Inf; the message names the step, the loss terms and the fix."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped on resume (the message names it and why)."""


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
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_save_json(obj, path: Path) -> None:
    """Writes JSON durably: a temporary file, fsynced, renamed over ``path``."""
    _write_durably(Path(path), lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


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
        with open(tmp, "wb") as fh:
            writer = _HashingWriter(fh)
            torch.save(obj, writer)
            fh.flush()
            os.fsync(fh.fileno())
        digest = writer.sha256.hexdigest()
        atomic_save_json({"file": path.name, "bytes": writer.nbytes, "sha256": digest,
                          "kdnb_version": __version__}, manifest_path(path))
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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      *np_state[2:])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, newest first."""
    return sorted(Path(run_dir).glob("ckpt-*.pt"), key=lambda p: p.name, reverse=True)


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


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, num_classes: int, batch_size: int = 16,
             device: torch.device | str = "cpu", amp: bool = True, progress: bool = False,
             rank: int = 0, world: int = 1) -> dict:
    """mIoU, per-class IoU and pixel accuracy of ``model`` on ``dataset``.

    Under DDP each rank evaluates a strided shard and the confusion matrices are summed.
    Returns :meth:`SegMetric.compute`'s dict with ``"images"``, the number scored.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    metric = SegMetric(num_classes, IGNORE_INDEX, device=device)
    indices = list(range(rank, len(dataset), world))
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="eval", leave=False)
    use_amp = amp and device.type == "cuda"
    for batch in batches:
        images, masks = collate([dataset[i] for i in batch])
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(images)
        metric.update(logits.argmax(1), masks)
    metric.all_reduce()
    model.train(was_training)
    return {**metric.compute(), "images": len(dataset)}


# --------------------------------------------------------------------------- the loop
def config_hash(cfg: TrainConfig) -> str:
    """A short hash of the settings that change the trained weights (a cache key).

    Settings at their default value are left out, so a new config field does not
    invalidate the models cached before it existed.
    """
    defaults = TrainConfig().to_dict()
    d = {k: v for k, v in cfg.to_dict().items() if v != defaults[k]}
    if d.get("teacher"):  # by file name: the same teacher cached under another data root
        d["teacher"] = Path(d["teacher"]).name
    for k in ("eval_every", "log_every", "ckpt_every", "keep_checkpoints", "workers",
              "threads", "eval_batch_size", "device"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:10]


#: Config fields a resumed run may change (everything else must match the saved run): a step
#: that completes normally is the same either way.
RESUME_MAY_CHANGE = ("skip_nonfinite",)


def saved_config(path: Path) -> dict | None:
    """A run's ``config.json`` as a dict, fields added to kdnb since it was written at their
    defaults; ``None`` when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): restore it, or use a new "
                         "--run-dir") from err
    return {**json.loads(json.dumps(TrainConfig().to_dict())), **saved}


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """The fields in which ``cfg`` differs from a saved run's config (those a resume may
    change left out): a run resumes only when this is empty."""
    current = json.loads(json.dumps(cfg.to_dict()))
    return sorted(k for k in set(saved) | set(current)
                  if saved.get(k) != current.get(k) and k not in RESUME_MAY_CHANGE)


class Trainer:
    """Supervised training of one model (a teacher, or a student baseline).

    Args:
        cfg: the run's :class:`TrainConfig`.
        run_dir: where config, metrics, checkpoints and results go.
        callbacks: functions called with every log record (``{"kind": "train" | "eval",
            "step", ...}``): notebooks draw live curves with them.
        progress: show a tqdm bar.

    Call :meth:`fit` (``resume=True`` continues from the newest good checkpoint).
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *,
                 callbacks: list[Callback] | None = None, progress: bool = True):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.callbacks = list(callbacks or [])
        self.progress = progress
        self.rank, self.world = init_distributed()
        self.device = resolve_device(cfg.device)
        if cfg.sync_bn and self.device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA (torch's SyncBatchNorm is GPU-only); on CPU "
                             "leave it off: each process then normalizes its own shard")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        info = dataset_info(cfg.data)
        self.num_classes = info["num_classes"]
        get_preset(cfg.model)  # fail on a bad preset name before any data is read
        self.train_set = build_dataset(cfg.data, cfg.root, "train", train=True,
                                       crop_size=cfg.crop_size, scale_range=cfg.scale_range,
                                       flip=cfg.flip, seed=cfg.seed, **cfg.data_kwargs)
        self.eval_set = build_dataset(cfg.data, cfg.root, cfg.eval_split, train=False,
                                      **cfg.data_kwargs)
        # Damaged files, bad labels or a crop that padding would fill fail here, before
        # models are built or a step runs, not hours into the run.
        validate_dataset(self.train_set)
        validate_dataset(self.eval_set)
        seed_everything(cfg.seed)
        model = build_model(cfg.model, self.num_classes, encoder_weights=cfg.encoder_weights,
                            **cfg.model_kwargs)
        if self.world > 1 and cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.cuda = self.device.type == "cuda"
        model = model.to(self.device)
        if self.cuda and cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if self.cuda else None)
                    if self.world > 1 else model)
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, poly_lambda(cfg.steps, cfg.poly_power, cfg.warmup_steps))
        self.step = 0
        self.step_skipped = False  # set by optimizer_step
        self.last_checkpoint: Path | None = None
        self._first_bad = None  # (loss names, first bad step, its terms), on the device

    # -- hooks for subclasses (the distillation trainer extends these)
    def loader_dataset(self) -> Dataset:
        return self.train_set

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_modules(self) -> list[nn.Module]:
        """The modules that train: checked for NaN before a checkpoint, and whose buffers a
        skipped step restores."""
        return [self.model]

    def train_step(self, images: torch.Tensor, masks: torch.Tensor, *extra) -> dict[str, torch.Tensor]:
        """One optimizer step; returns detached loss tensors (no host sync)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda and self.cfg.amp):
            logits = self.ddp(images)
            loss = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer_step(loss)
        return {"loss": loss.detach()}

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """``optimizer.step()``; with ``skip_nonfinite``, no step when the loss or a gradient
        is NaN or Inf.

        The check costs one host sync per step (and one all-reduce under DDP, so every
        rank skips together); :meth:`fit` then restores the buffers the forward pass
        changed, so a skipped step leaves weights, BatchNorm statistics and optimizer state
        as they were. The learning-rate schedule still advances.
        """
        self.step_skipped = False
        if not self.cfg.skip_nonfinite:
            self.optimizer.step()
            return
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        finite = torch.stack([torch.isfinite(loss.detach()).all(),
                              *(torch.isfinite(g).all() for g in grads)]).all()
        if self.world > 1:
            flag = finite.float()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag > 0
        if bool(finite):
            self.optimizer.step()
        else:
            self.step_skipped = True

    # -- bookkeeping
    def emit(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        for callback in self.callbacks:
            callback(record)

    def model_record(self) -> dict:
        """What rebuilds the model: weights, preset, class count, options, config."""
        return {"model": self.model.state_dict(), "preset": self.model.preset,
                "num_classes": self.num_classes, "model_kwargs": dict(self.cfg.model_kwargs),
                "kdnb_version": __version__, "config": self.cfg.to_dict(), "step": self.step}

    def state_dict(self) -> dict:
        metrics = self.run_dir / "metrics.jsonl"
        return {
            **self.model_record(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(), "extra": self.extra_state(),
            # how much of metrics.jsonl this state has seen: resume cuts the rest (replayed)
            "metrics_bytes": metrics.stat().st_size if metrics.is_file() else 0,
        }

    def save(self) -> Path | None:
        """Writes ``ckpt-<step>.pt`` (atomically, with its manifest) and prunes old ones.

        Only checkpoints up to the current step count for ``keep_checkpoints``: newer ones
        left by an earlier attempt (skipped on resume as damaged) are overwritten when the
        run gets there, and never crowd out the checkpoints it has just written.
        """
        if self.rank != 0:
            return None
        path = self.run_dir / f"ckpt-{self.step:07d}.pt"
        atomic_save(self.state_dict(), path)
        self.last_checkpoint = path
        ours = [p for p in checkpoint_paths(self.run_dir) if checkpoint_step(p) <= self.step]
        for old in ours[self.cfg.keep_checkpoints:]:
            old.unlink(missing_ok=True)
            manifest_path(old).unlink(missing_ok=True)
        return path

    def load(self, ckpt: dict) -> None:
        if ckpt["preset"] != self.model.preset or ckpt["num_classes"] != self.num_classes:
            raise ValueError(f"checkpoint holds {ckpt['preset']!r} with {ckpt['num_classes']} "
                             f"classes; this run trains {self.model.preset!r} with "
                             f"{self.num_classes}: use another run directory")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = int(ckpt["step"])
        set_rng_state(ckpt["rng"])
        self.load_extra_state(ckpt.get("extra", {}))
        self._cut_metrics(ckpt.get("metrics_bytes"))

    def _cut_metrics(self, nbytes: int | None) -> None:
        """Cuts ``metrics.jsonl`` back to what the resumed state had logged: the steps after
        it are replayed, and a line half-written by a killed process goes with them."""
        path = self.run_dir / "metrics.jsonl"
        if self.rank != 0 or not path.is_file():
            return
        if nbytes is None:  # a checkpoint from before metrics_bytes: drop a partial line only
            nbytes = path.read_bytes().rfind(b"\n") + 1
        if path.stat().st_size > nbytes:
            os.truncate(path, nbytes)

    def resume(self) -> bool:
        """Loads the newest good checkpoint; returns False if the run has none.

        Checkpoints are tried newest first. One that is truncated, fails its manifest's
        checksum, or does not load is skipped with a :class:`CheckpointWarning` that names
        it and says why, and the previous one is tried.

        Raises:
            CheckpointError: the run has checkpoints but none of them is good.
        """
        skipped = []
        for path in checkpoint_paths(self.run_dir):
            try:
                ckpt = load_checkpoint(path, map_location=self.device)
            except CheckpointError as err:
                warnings.warn(f"skipping {path.name}, trying an older checkpoint: {err}",
                              CheckpointWarning, stacklevel=2)
                skipped.append(path.name)
                continue
            self.load(ckpt)
            self.last_checkpoint = path
            return True
        if skipped:
            raise CheckpointError(f"none of the checkpoints in {self.run_dir} is good "
                                  f"({', '.join(skipped)}; the warnings say why): start again "
                                  "in a new --run-dir, or delete them to train here from step 0")
        return False

    def _check_config(self) -> None:
        path = self.run_dir / "config.json"
        current = json.loads(json.dumps(self.cfg.to_dict()))
        saved = saved_config(path)
        if saved is not None:
            diff = config_differences(saved, self.cfg)
            if diff:
                raise ValueError(f"{self.run_dir} holds a run with another config (differs in "
                                 f"{diff}): resume with the same settings or use a new --run-dir")
        if self.rank == 0 and saved != current:
            atomic_save_json(current, path)

    # -- non-finite losses
    def _watch_losses(self, losses: dict[str, torch.Tensor]) -> None:
        """Remembers on the device the first step whose loss terms are not all finite, and
        those terms: no host sync (:meth:`check_finite` reads it at the sync points)."""
        values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        if self._first_bad is None:
            self._first_bad = (list(losses), torch.full((), -1, device=values.device),
                               torch.zeros_like(values))
        keys, step, terms = self._first_bad
        first = (step < 0) & ~torch.isfinite(values).all()
        self._first_bad = (keys, torch.where(first, self.step, step),
                           torch.where(first, values, terms))

    def check_finite(self, *, weights: bool = False) -> None:
        """Stops the run at the first NaN or Inf loss seen so far (one host sync).

        :meth:`fit` calls it at every log line and before every evaluation; with
        ``weights`` (every parameter and buffer is checked too) before every checkpoint
        and before the final export, so nothing written ever holds NaN weights.

        Raises:
            NonFiniteLossError: naming the step, its loss terms and what to do.
        """
        first = (self._first_bad[1] if self._first_bad is not None
                 else torch.full((), -1, device=self.device)).double()
        packed = [torch.where(first >= 0, first, math.inf)]
        if weights:
            tensors = [t for m in self.state_modules() for t in (*m.parameters(), *m.buffers())
                       if t.is_floating_point()]
            packed.append(torch.stack([torch.isfinite(t).all() for t in tensors]).all().double())
        packed = torch.stack(packed)
        if self.world > 1:  # every rank stops together
            dist.all_reduce(packed, op=dist.ReduceOp.MIN)
        values = packed.tolist()
        where = (f"the newest checkpoint, {self.last_checkpoint.name}, is clean"
                 if self.last_checkpoint is not None else "no checkpoint was written yet")
        fix = ("lower the learning rate or add warm-up steps (in a new --run-dir), check the "
               "data for a bad image or label, or resume with --resume --skip-nonfinite to skip "
               "such steps")
        if math.isfinite(values[0]):
            step = int(values[0])
            terms = "on another process"
            if self._first_bad is not None and int(self._first_bad[1]) == step:
                keys, _, found = self._first_bad
                terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(keys, found.tolist()))
            raise NonFiniteLossError(f"the loss is not finite at step {step} ({terms}); the run "
                                     f"stopped before writing anything from that step on and "
                                     f"{where}. What to do: {fix}")
        if weights and values[1] == 0:
            raise NonFiniteLossError(f"the weights hold NaN or Inf at step {self.step} although "
                                     f"every loss was finite (a gradient overflowed); nothing was "
                                     f"written from this step on and {where}. What to do: {fix}")

    def fit(self, *, resume: bool = False) -> dict:
        """Trains to ``cfg.steps`` and returns the final evaluation record.

        With ``resume``, continues from the newest good checkpoint (:meth:`resume`); the
        run directory may hold what a killed process left behind (temporary files, a
        half-written log line), which is cleaned up first.

        Raises:
            NonFiniteLossError: a loss became NaN or Inf (unless ``skip_nonfinite``).
        """
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.last_checkpoint, self._first_bad = None, None
        if resume:
            self._check_config()
            if self.rank == 0:
                remove_stale_files(self.run_dir)
            if not self.resume():
                self._cut_metrics(0)  # a run killed before its first checkpoint starts over
        else:
            if checkpoint_paths(self.run_dir):
                raise FileExistsError(f"{self.run_dir} already holds checkpoints: pass --resume "
                                      "to continue that run, or choose a new --run-dir")
            self._check_config()
            if self.rank == 0:  # what a run killed before its first checkpoint left
                remove_stale_files(self.run_dir)
            self._cut_metrics(0)
        if self.step == 0:
            # The training stream (dropout) is a function of the seed alone, whatever ran
            # since the model was built; every rank gets its own.
            seed_everything(cfg.seed + 1_000_003 * self.rank)
        sampler = StepSampler(len(self.train_set), cfg.batch_size, cfg.steps, seed=cfg.seed,
                              start=self.step, rank=self.rank, world=self.world)
        # The loader gets its own generator: drawing its base seed from the global RNG would
        # shift dropout's random stream on resume.
        loader = DataLoader(self.loader_dataset(), batch_sampler=sampler, num_workers=cfg.workers,
                            collate_fn=collate, pin_memory=self.cuda,
                            generator=torch.Generator().manual_seed(cfg.seed))
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.model}",
                       dynamic_ncols=True)
        self.train_mode()
        sums: dict[str, torch.Tensor] = {}
        count, skipped, t0 = 0, 0, time.perf_counter()
        for images, masks, *extra in loader:
            images = images.to(self.device, non_blocking=True)
            masks = masks.to(self.device, non_blocking=True)
            if self.cuda and cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            buffers = ([b.clone() for m in self.state_modules() for b in m.buffers()]
                       if cfg.skip_nonfinite else None)
            self.step_skipped = False
            losses = self.train_step(images, masks, *extra)
            self.scheduler.step()
            self.step += 1
            count += 1
            if self.step_skipped:  # undo what the forward pass did to BatchNorm statistics
                skipped += 1
                live = [b for m in self.state_modules() for b in m.buffers()]
                for buffer, saved in zip(live, buffers):
                    buffer.copy_(saved)
            else:
                self._watch_losses(losses)
                for k, v in losses.items():  # summed on the device: no sync per step
                    sums[k] = sums[k] + v if k in sums else v.clone()
            if bar is not None:
                bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.check_finite()
                if self.world > 1 and sums:  # the mean over ranks: one collective per line
                    keys = sorted(sums)
                    packed = torch.stack([sums[k].float() for k in keys])
                    dist.all_reduce(packed)
                    sums = dict(zip(keys, packed / self.world))
                record = {"kind": "train", "step": self.step,
                          **{k: (v / (count - skipped)).item() for k, v in sums.items()},
                          "lr": self.scheduler.get_last_lr()[0],
                          "s_per_step": (time.perf_counter() - t0) / count}
                if cfg.skip_nonfinite:
                    record["skipped"] = skipped
                self.emit(record)
                if bar is not None and "loss" in record:
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                sums, count, skipped, t0 = {}, 0, 0, time.perf_counter()
            last = self.step == cfg.steps
            if cfg.eval_every and self.step % cfg.eval_every == 0 and not last:
                self.check_finite()
                self.emit({"kind": "eval", "step": self.step, "split": cfg.eval_split,
                           **self.evaluate()})
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last:
                self.check_finite(weights=True)
                self.save()
        if bar is not None:
            bar.close()
        self.check_finite(weights=True)
        final = {"kind": "eval", "step": self.step, "split": cfg.eval_split, **self.evaluate()}
        self.emit(final)
        if self.rank == 0:
            atomic_save_json(final, self.run_dir / "final.json")
            self.export(self.run_dir / "model.pt")
        return final

    def train_mode(self) -> None:
        """Training mode; with ``freeze_bn`` BatchNorm layers stay in eval mode."""
        self.model.train()
        if self.cfg.freeze_bn:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def evaluate(self, dataset: Dataset | None = None) -> dict:
        result = evaluate(self.model, dataset or self.eval_set, num_classes=self.num_classes,
                          batch_size=self.cfg.eval_batch_size, device=self.device,
                          amp=self.cfg.amp, rank=self.rank, world=self.world)
        self.train_mode()
        return result

    def export(self, path: Path) -> None:
        """Writes the weights alone (what ``kdnb eval`` and distillation load)."""
        atomic_save(self.model_record(), path)


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


# --------------------------------------------------------------------------- distillation
#: the loss FAKD augments -> FAKDLoss's ``on`` (FAKD replaces that loss by its bound).
FAKD_BASES = {"kd": "logits", "nfd": "nfd", "mse": "feats"}


def _as_options(value) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    return {"weight": value}


def resolve_methods(methods: dict) -> dict:
    """Folds ``fakd`` into the loss it augments.

    FAKD's bound *contains* the loss it augments (at ``lambda = 0`` it is that loss), so
    ``{"kd": 1, "fakd": {}}`` becomes one FAKD module on logits with KD's weight,
    temperature and pixels (all of them, unlabelled ones included, as pixel KD by default:
    ``keep_ignored``), and ``{"nfd": 2, "fakd": {}}`` one on normalized features. Other
    losses stay as they are.
    """
    from .losses import METHODS

    spec = {k: _as_options(v) for k, v in methods.items()}
    if "fakd" not in spec:
        return spec
    fakd = spec.pop("fakd")
    on = fakd.pop("on", None)
    if on is not None:
        by_on = {v: k for k, v in FAKD_BASES.items()}
        if on not in by_on or by_on[on] not in spec:
            raise ValueError(f"fakd on={on!r} needs its base loss in the methods: "
                             + ", ".join(f"on={v!r} with {k}" for k, v in FAKD_BASES.items()))
        base = by_on[on]
    else:
        bases = [b for b in FAKD_BASES if b in spec]
        if not bases:
            extra = " (cwd + fakd has no implemented bound yet)" if "cwd" in spec else ""
            raise ValueError("fakd augments another loss: add one of kd, nfd or mse to the "
                             f"methods (for example kd=1,fakd){extra}")
        if len(bases) > 1:
            raise ValueError(f"fakd can augment one of {bases}: choose with fakd's option "
                             "on=logits (kd), on=nfd or on=feats (mse)")
        base = bases[0]
    base_options = spec.pop(base)
    layer = base_options.pop("layer", "head")
    if "layer" in fakd:
        raise ValueError("fakd takes the layer of the loss it augments: set the layer option "
                         f"on {base}, not on fakd")
    if layer != "head":
        if base == "kd":
            raise ValueError(f"kd reads the logits, so its layer can only be 'head', got "
                             f"{layer!r}")
        fakd["layer"] = layer  # the feature bounds hold at any layer (no classifier in them)
    weight = base_options.pop("weight", METHODS[base].weight)
    carried = {}
    if base == "kd":
        if "temperature" in base_options:
            carried["temperature"] = base_options.pop("temperature")
        # The bound covers the pixels KD covers: every pixel unless KD leaves some out (its
        # ignore_index). On a pixel without a label there is no Sigma_y, so it is plain KD.
        kd_ignore = base_options.pop("ignore_index", None)
        carried["keep_ignored"] = kd_ignore is None
        if kd_ignore is not None:
            carried["ignore_index"] = kd_ignore
    if base == "nfd":
        norm = base_options.pop("norm", "channel")
        if norm != "channel":
            raise ValueError(f"fakd's NFD bound covers channel normalization only, not "
                             f"norm={norm!r}: use nfd's default norm with fakd")
        if "eps" in base_options:
            carried["nfd_eps"] = base_options.pop("eps")
    if base_options:
        raise ValueError(f"{base} options {sorted(base_options)} cannot be carried into fakd; "
                         "set them on fakd itself")
    spec["fakd"] = {"weight": fakd.pop("weight", weight), "on": FAKD_BASES[base],
                    **carried, **fakd}
    return spec


def split_layers(spec: dict) -> tuple[dict, dict[str, int | None]]:
    """Takes each loss's ``layer`` option out of ``spec``: the layer it distils.

    ``"head"`` (the default) is the head feature, the classifier's input; ``"stageN"`` the
    encoder's output at stride ``2**N`` (:func:`kdnb.features.parse_layer`). Only losses
    that read features take a layer (feature and relation losses, CWD with
    ``on="feats"``, FAKD on a feature loss: :func:`resolve_methods` gives it its base's
    layer). Returns ``(spec, layers)`` with ``layers[name]`` None or N.
    """
    from .features import parse_layer
    from .losses import METHODS

    layers = {}
    for name, options in spec.items():
        layer = options.pop("layer", "head")
        stage = parse_layer(layer)
        reads_feats = (METHODS[name].kind in ("feature", "relation")
                       or (name in ("cwd", "fakd") and options.get("on") in ("feats", "nfd")))
        if stage is not None and not reads_feats:
            raise ValueError(f"{name} reads the logits, so its layer can only be 'head', got "
                             f"{layer!r}; a layer applies to feature losses (mse, at, nfd, "
                             "skd, ifvd, cwd with on=feats)")
        layers[name] = stage
    return spec, layers


def check_teacher(cfg: TrainConfig, run_dir: str | Path) -> dict:
    """Loads the teacher's checkpoint and checks that it can teach this run's student.

    Cheap (no data read, no model built), so a pair that cannot be distilled fails before
    any long work: unknown methods, a teacher inside the run directory (whose files the run
    writes), a damaged checkpoint, another class count or dataset, an unknown preset.

    Returns:
        The loaded checkpoint (:func:`load_checkpoint`).
    """
    from .losses import METHODS

    unknown = [name for name in cfg.methods if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown distillation method {unknown[0]!r}: choose from "
                         f"{', '.join(METHODS)}")
    teacher, run = Path(cfg.teacher), Path(run_dir)
    if (teacher.resolve().parent == run.resolve()
            and (teacher.name == "model.pt" or teacher.name.startswith("ckpt-"))):
        raise ValueError(f"the teacher {teacher} lies in the run directory {run}, where this run "
                         "writes its own model.pt and checkpoints: choose another --run-dir")
    try:
        ckpt = load_checkpoint(teacher)
    except CheckpointError as err:
        raise CheckpointError(f"the teacher cannot be used: {err}") from err
    classes = dataset_info(cfg.data)["num_classes"]
    if ckpt["num_classes"] != classes:
        raise ValueError(f"checkpoint {teacher} predicts {ckpt['num_classes']} classes but the "
                         f"dataset has {classes}: it was trained on another dataset; pass a "
                         f"teacher trained on {cfg.data} (kdnb train --data {cfg.data})")
    trained_on = (ckpt.get("config") or {}).get("data")
    if trained_on and trained_on != cfg.data:
        raise ValueError(f"the teacher {teacher} was trained on {trained_on} but the student "
                         f"trains on {cfg.data}: pass a teacher trained on {cfg.data} "
                         f"(kdnb train --data {cfg.data})")
    get_preset(ckpt["preset"])
    return ckpt


#: The teacher outputs of the last cached pool in this process (see DistillTrainer).
_TEACHER_OUTPUTS: dict = {}


class DistillTrainer(Trainer):
    """A student trained with a frozen teacher and any set of losses from kdnb.losses.

    The teacher runs in eval mode under ``torch.inference_mode``; adapters and FAKD
    statistics live in the loss modules, train with the student and are saved in every
    checkpoint, so resume is exact. ``cfg.methods`` is a plain dict such as
    ``{"kd": 1.0, "nfd": {"weight": 2.0}, "fakd": {"lambda_0": 7.5}}``. A feature or
    relation loss distils the head feature unless its options name another ``layer``
    (``{"nfd": {"layer": "stage3"}}``: the encoder's output at stride 8; see
    :func:`split_layers`).

    Introduced in notebooks/04_distillation_runs.ipynb.
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, **kw):
        from .losses import build_losses

        if not cfg.teacher:
            raise ValueError("distillation needs a teacher checkpoint: pass --teacher PATH")
        # The pair and the methods are checked before any data is read or model built.
        teacher_ckpt = check_teacher(cfg, run_dir)
        spec, self.layers = split_layers(resolve_methods(cfg.methods))
        #: encoder stages some loss reads (their maps are recorded and cached too)
        self.stages = sorted({n for n in self.layers.values() if n is not None})
        super().__init__(cfg, run_dir, **kw)
        teacher = model_from_record(teacher_ckpt, cfg.teacher, num_classes=self.num_classes)
        teacher = teacher.to(self.device).eval().requires_grad_(False)
        if self.cuda and cfg.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        self.teacher = teacher
        if spec.get("fakd", {}).get("on") == "logits":  # the logit bound needs W f + b
            clf = self.model.classifier
            if not isinstance(clf, nn.Conv2d) or clf.kernel_size != (1, 1):
                raise ValueError(f"FAKD needs a student classifier that is linear on each "
                                 f"position (a 1x1 convolution); {cfg.model}'s is "
                                 f"{getattr(clf, 'kernel_size', type(clf).__name__)}: choose a "
                                 "preset with a 1x1 head")
        from .features import stage_channels

        def channels(model: nn.Module, stage: int | None) -> int:
            return model.classifier.in_channels if stage is None else stage_channels(model, stage)

        # One module per loss, each sized for the layer it reads.
        self.losses = nn.ModuleDict()
        for name, options in spec.items():
            stage = self.layers[name]
            self.losses.update(build_losses({name: options},
                                            student_channels=channels(self.model, stage),
                                            teacher_channels=channels(teacher, stage),
                                            num_classes=self.num_classes))
        self.losses.to(self.device)
        self.teacher_cache = self._cache_teacher() if cfg.cache_teacher else None
        # Adapters are trained with the student.
        self.optimizer = build_optimizer(nn.ModuleList([self.model, self.losses]), cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, poly_lambda(cfg.steps, cfg.poly_power, cfg.warmup_steps))

    @torch.inference_mode()
    def _cache_teacher(self) -> dict[str, torch.Tensor]:
        """The teacher's head features and logits for every training image, computed once.

        Valid only for a fixed training pool: the training transform must be the identity
        (no flip, no random scale or crop), else a cached output would belong to another
        image than the one the student sees.
        """
        transform = getattr(self.train_set, "transform", None)
        fixed = (transform is None or (not transform.flip and transform.crop_size is None
                                       and tuple(transform.scale_range) == (1.0, 1.0)))
        if not fixed:
            raise ValueError("cache_teacher needs a fixed training pool: set flip=False and no "
                             "random scale or crop (SynthScenes: --no-flip), or turn the cache off")
        from .features import forward_with_features

        base = getattr(self.train_set, "dataset", self.train_set)
        cfg = self.cfg
        teacher_file = Path(cfg.teacher).resolve()
        stat = teacher_file.stat()
        # The students of one comparison (make demo, a notebook) share the teacher and the
        # pool: the outputs are computed once per process and kept for the next student.
        key = (str(teacher_file), stat.st_size, stat.st_mtime_ns, cfg.data, str(cfg.root),
               json.dumps(cfg.data_kwargs, sort_keys=True), len(base), str(self.device),
               self.cuda and cfg.amp)
        need = {"feats", "logits", *(f"stage{n}" for n in self.stages)}
        if _TEACHER_OUTPUTS.get("key") == key and need <= set(_TEACHER_OUTPUTS["outputs"]):
            return {k: _TEACHER_OUTPUTS["outputs"][k] for k in sorted(need)}
        _TEACHER_OUTPUTS.clear()  # one entry: a pool's outputs can be large
        parts: dict[str, list[torch.Tensor]] = {}
        amp = dict(device_type=self.device.type, dtype=torch.bfloat16,
                   enabled=self.cuda and cfg.amp)
        for start in range(0, len(base), 64):
            images = torch.stack([base[i][0] for i in range(start, min(start + 64, len(base)))])
            with torch.autocast(**amp):
                _, maps = forward_with_features(self.teacher, images.to(self.device), self.stages)
            for k, v in maps.items():
                parts.setdefault(k, []).append(v.float().cpu())
        outputs = {k: torch.cat(v) for k, v in parts.items()}
        _TEACHER_OUTPUTS.update(key=key, outputs=outputs)
        return outputs

    def loader_dataset(self) -> Dataset:
        # With the cache, samples carry their index so the step can look the teacher up.
        return Indexed(self.train_set) if self.teacher_cache is not None else self.train_set

    def _average_loss_gradients(self) -> None:
        """DDP averages the student's gradients; the adapters live in the loss modules,
        outside the DDP wrapper, so theirs are averaged here (one flat all-reduce)."""
        grads = [p.grad for p in self.losses.parameters() if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def extra_state(self) -> dict:
        return {"losses": self.losses.state_dict()}

    def state_modules(self) -> list[nn.Module]:
        return [self.model, self.losses]

    def load_extra_state(self, state: dict) -> None:
        if "losses" in state:
            self.losses.load_state_dict(state["losses"])

    def train_step(self, images: torch.Tensor, masks: torch.Tensor,
                   indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        from .features import forward_with_features

        amp = dict(device_type=self.device.type, dtype=torch.bfloat16,
                   enabled=self.cuda and self.cfg.amp)
        if self.teacher_cache is not None:
            teacher = {k: v[indices].to(self.device, non_blocking=True)
                       for k, v in self.teacher_cache.items()}
        else:
            with torch.inference_mode(), torch.autocast(**amp):
                _, t_maps = forward_with_features(self.teacher, images, self.stages)
            # Inference tensors cannot be saved for backward: one copy makes them normal.
            teacher = {k: v.clone() for k, v in t_maps.items()}
        for module in self.losses.values():
            if hasattr(module, "set_progress"):
                module.set_progress(self.step, self.cfg.steps)
        with torch.autocast(**amp):
            logits, student = forward_with_features(self.ddp, images, self.stages)
            task = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)
        student["classifier_weight"] = self.model.classifier.weight

        def at_layer(maps: dict, stage: int | None) -> dict:
            # A loss reads "feats": give it the map of its layer.
            return maps if stage is None else {**maps, "feats": maps[f"stage{stage}"]}

        terms = {name: module(at_layer(student, self.layers[name]),
                              at_layer(teacher, self.layers[name]), masks)
                 for name, module in self.losses.items()}
        loss = self.cfg.task_weight * task
        for name, module in self.losses.items():
            loss = loss + module.loss_weight * terms[name]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            self._average_loss_gradients()
        self.optimizer_step(loss)
        return {"loss": loss.detach(), "task": task.detach(),
                **{name: value.detach() for name, value in terms.items()}}


def make_trainer(cfg: TrainConfig, run_dir: str | Path, **kw) -> Trainer:
    """A :class:`DistillTrainer` when the config names a teacher, else a :class:`Trainer`."""
    return DistillTrainer(cfg, run_dir, **kw) if cfg.teacher else Trainer(cfg, run_dir, **kw)
