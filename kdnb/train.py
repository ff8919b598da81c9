"""The training loop: one step after another, logs, checkpoints, exact resume.

:class:`Trainer` is handed its parts (model, datasets, optimizer, schedule, and for
distillation the teacher and the losses) by :func:`kdnb.build.build_trainer`, which
builds them from a :class:`kdnb.config.TrainConfig`. One code path serves CPU and CUDA
(bf16 autocast and channels-last on CUDA), one process and ``torchrun`` (DDP).

Each step computes its loss dict (:func:`supervised_step`, or
:func:`kdnb.distill.distill_step` with a teacher), then the loop runs backward and the
optimizer. The data order is a pure function of ``(seed, step)``
(:class:`kdnb.data.sampler.StepSampler`) and every augmentation is seeded per sample, so
a run resumed from a checkpoint at step k continues exactly as if it had never stopped.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON record per line),
checkpoints ``ckpt-<step>.pt``, ``final.json``, ``cost.json`` (seconds and FLOPs per step,
peak memory: :mod:`kdnb.cost`) and ``model.pt`` (:mod:`kdnb.checkpoint` writes them
atomically, with manifests; a log line is appended whole or not at all). A
NaN or Inf loss stops the run before anything from that step is written
(``skip_nonfinite`` skips such steps instead). One process at a time trains in a run
directory (:class:`kdnb.rundir.RunLock`), and a checkpoint resumes only under the config
stored in it and with the teacher and pretext encoder files it was trained with (their
SHA-256 travel in every checkpoint).

The log resumes as exactly as the weights. Every checkpoint carries the partial loss
sums of the next log line (:class:`LossMeans`), so a run stopped between two log lines
(a ``log_every`` that does not divide ``ckpt_every``) logs the losses an uninterrupted run
logs; and it carries a copy of ``metrics.jsonl`` up to its step, so a resume cuts the log
back at a line boundary and rebuilds a log that was deleted, emptied or damaged since,
with a warning naming the file. Ctrl-C ends :meth:`Trainer.fit` with
:class:`RunInterrupted`, which names the step and says to ``--resume``.

Introduced in notebooks/00_setup_and_data.ipynb.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import __version__
from .checkpoint import (append_line, atomic_save, atomic_save_json, atomic_write_bytes,
                         checkpoint_paths, config_differences, holds_run, load_newest_good,
                         remove_stale_files, save_checkpoint, saved_config, writing)
from .config import TrainConfig
from .cost import RunCost
from .data.sampler import CheckedCollate, Indexed, StepSampler
from .distill import DistillLosses, distill_step, task_loss
from .metrics import evaluate
from .rundir import RunLock, RunLockedError, check_run_dir, input_digests, input_differences
from .runtime import autocast, average_gradients, rng_state, seed_everything, set_rng_state

Callback = Callable[[dict], None]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or Inf; the message names the step, the loss terms and the fix."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped :meth:`Trainer.fit`; the message names the step reached and
    how to continue (``--resume``). A KeyboardInterrupt, so notebooks stop as they did."""


class LossMeans:
    """The running sums behind the next train log line: each loss term summed on the
    device (no host sync per step), the steps counted and skipped, the seconds they took.

    They travel in every checkpoint (:meth:`state_dict`), so a run resumed between two
    log lines logs the means an uninterrupted run logs, for any ``log_every`` and
    ``ckpt_every``.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count, self.skipped, self._before = 0, 0, 0.0
        self.restart_clock()

    def restart_clock(self) -> None:
        self._since = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self._before + time.perf_counter() - self._since

    def add(self, losses: dict[str, torch.Tensor] | None) -> None:
        """One step's detached losses, or None for a skipped step."""
        self.count += 1
        if losses is None:
            self.skipped += 1
            return
        for k, v in losses.items():  # summed on the device: no sync per step
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "count": self.count, "skipped": self.skipped,
                "seconds": self.seconds}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.reset()
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.count, self.skipped = int(state["count"]), int(state["skipped"])
        self._before = float(state["seconds"])


def supervised_step(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, *,
                    amp: bool = False) -> dict[str, torch.Tensor]:
    """One step's loss without a teacher: ``{"loss": cross-entropy}``; no backward."""
    with autocast(images.device, amp):
        loss = task_loss(model(images), masks)
    return {"loss": loss}


class Trainer:
    """Trains one model: a teacher, a student alone, or a student with a teacher.

    Build one with :func:`kdnb.build.build_trainer` (from a config); the arguments are the
    parts it builds.

    Args:
        cfg: the run's :class:`TrainConfig` (saved as ``config.json``).
        run_dir: where config, metrics, checkpoints and results go.
        model: the model that trains, on ``device``.
        train_set: the training dataset (with its seeded augmentation).
        eval_set: the dataset of the evaluations during and after training.
        optimizer: over the model's parameters (and the losses', which train with it).
        scheduler: the learning-rate schedule, stepped once per step.
        device: where the model lives.
        teacher: the frozen teacher (eval mode), or None.
        losses: the distillation losses, or None for training on the labels alone.
        teacher_cache: the teacher's maps for every training sample (what
            :meth:`kdnb.distill.TeacherOutputs.get` returns), read by sample index instead
            of running the teacher, or None.
        rank, world: this process's rank and the number of processes; with ``world > 1``
            the model is wrapped in DistributedDataParallel here.
        callbacks: functions called with every log record (``{"kind": "train" | "eval",
            "step", ...}``): notebooks draw live curves with them.
        progress: show a tqdm bar.

    Call :meth:`fit` (``resume=True`` continues from the newest good checkpoint).
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, model: nn.Module,
                 train_set: Dataset, eval_set: Dataset, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
                 teacher: nn.Module | None = None, losses: DistillLosses | None = None,
                 teacher_cache: dict[str, torch.Tensor] | None = None, rank: int = 0,
                 world: int = 1, callbacks: list[Callback] | None = None, progress: bool = True):
        if losses is not None and teacher is None and teacher_cache is None:
            raise ValueError("distillation losses need a teacher or its cached outputs")
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.model, self.train_set, self.eval_set = model, train_set, eval_set
        self.optimizer, self.scheduler, self.device = optimizer, scheduler, device
        self.teacher, self.losses, self.teacher_cache = teacher, losses, teacher_cache
        self.rank, self.world = rank, world
        self.callbacks = list(callbacks or [])
        self.progress = progress
        self.cuda = device.type == "cuda"
        self.num_classes = model.num_classes
        #: what the forward pass goes through: the DDP wrapper, or the model itself
        self.ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if self.cuda else None)
                    if world > 1 else model)
        self.step = 0
        self.step_skipped = False  # set by optimizer_step
        self.last_checkpoint: Path | None = None
        self._first_bad = None  # (loss names, first bad step, its terms), on the device
        self.inputs: dict[str, str] = {}  # set by fit: digests of the files the run depends on
        #: what the run costs (cost.json): the loop timed, the FLOPs counted before its first step
        self.cost = RunCost(device, world=world, count_flops=cfg.count_flops)
        self.loss_means = LossMeans()  # the sums behind the next train log line
        self.log_lines: list[str] = []  # metrics.jsonl as this run wrote it (rank 0)

    @property
    def layers(self) -> dict[str, int | None]:
        """Each distillation loss's layer (an encoder stage, or None for the head feature)."""
        return self.losses.layers if self.losses is not None else {}

    @property
    def stages(self) -> list[int]:
        """The encoder stages some loss reads."""
        return self.losses.stages if self.losses is not None else []

    # -- one step
    def compute_losses(self, images: torch.Tensor, masks: torch.Tensor,
                       indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The step's loss dict (no backward): the labels alone, or distillation."""
        amp = self.cuda and self.cfg.amp
        if self.losses is None:
            return supervised_step(self.ddp, images, masks, amp=amp)
        self.losses.set_progress(self.step, self.cfg.steps)
        teacher = self.teacher
        if self.teacher_cache is not None:
            if indices is None:
                raise ValueError("this trainer reads the teacher's cached outputs by sample "
                                 "index: pass the batch's indices (its loader yields them)")
            teacher = {k: v[indices].to(self.device, non_blocking=True)
                       for k, v in self.teacher_cache.items()}
        return distill_step(self.ddp, teacher, self.losses, images, masks,
                            task_weight=self.cfg.task_weight, amp=amp)

    def train_step(self, images: torch.Tensor, masks: torch.Tensor, *extra) -> dict[str, torch.Tensor]:
        """One optimizer step; returns detached loss tensors (no host sync)."""
        losses = self.compute_losses(images, masks, *extra)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if self.losses is not None:  # their adapters train outside the DDP wrapper
            average_gradients(self.losses, self.world)
        self.optimizer_step(losses["loss"])
        return {k: v.detach() for k, v in losses.items()}

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

    def state_modules(self) -> list[nn.Module]:
        """The modules that train: checked for NaN before a checkpoint, and whose buffers a
        skipped step restores."""
        return [self.model] + ([self.losses] if self.losses is not None else [])

    # -- the loop
    def fit(self, *, resume: bool = False) -> dict:
        """Trains to ``cfg.steps`` and returns the final evaluation record.

        With ``resume``, continues from the newest good checkpoint (:meth:`resume`); the
        run directory may hold what a killed process left behind (temporary files, a
        half-written log line), which is cleaned up first.

        Raises:
            NonFiniteLossError: a loss became NaN or Inf (unless ``skip_nonfinite``).
            RunInterrupted: Ctrl-C; the message names the step and says to ``--resume``.
            RunWriteError: the disk is full or the run directory read-only (nothing is
                left half-written).
            FileExistsError: the run directory is a file, or a symlink loop.
        """
        check_run_dir(self.run_dir)
        if resume and not holds_run(self.run_dir):
            raise FileNotFoundError(f"--resume: {self.run_dir} holds no run (no config.json, no "
                                    "checkpoint): check the path, or leave out --resume to "
                                    "start a new run there")
        with writing(self.run_dir):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            try:
                self._start(resume)
                return self._train()
            except RunInterrupted:
                raise
            except KeyboardInterrupt:
                raise RunInterrupted(self._interrupted()) from None

    def _interrupted(self) -> str:
        """What Ctrl-C says: the step reached and how to go on."""
        newest = self.last_checkpoint or next(iter(checkpoint_paths(self.run_dir)), None)
        if newest is not None:
            since = f"from {newest.name}, the newest checkpoint; the steps after it run again"
        else:
            since = "no checkpoint was written yet: it starts again from step 0"
        return f"interrupted at step {self.step}; continue with --resume ({since})"

    @contextlib.contextmanager
    def _lock(self):
        """Rank 0 holds the run directory's lock (:class:`kdnb.rundir.RunLock`); under DDP
        every rank learns whether it got it, so none waits in a collective for a refused
        rank 0."""
        lock, refused = RunLock(self.run_dir), None
        if self.rank == 0:
            try:
                lock.acquire()
            except RunLockedError as err:
                refused = err
        if self.world > 1:
            flag = torch.tensor([float(refused is not None)], device=self.device)
            dist.broadcast(flag, src=0)
            if flag.item() and refused is None:
                raise RunLockedError(f"rank 0 could not lock {self.run_dir} (its error says why)")
        if refused is not None:
            raise refused
        try:
            yield lock
        finally:
            lock.release()

    def _train(self) -> dict:
        """:meth:`fit`'s loop, from ``self.step`` to the end, and the final evaluation."""
        cfg = self.cfg
        loader = self.loader()
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.model}",
                       dynamic_ncols=True)
        self.train_mode()
        means = self.loss_means  # on resume, the sums since the last log line before the stop
        means.restart_clock()
        try:
            for batch in loader:
                counting = not self.cost.started  # its first step counts the FLOPs first
                with self.cost.step(self, batch):
                    if counting:  # the count is not step time: the log's s_per_step starts here
                        means.restart_clock()
                    losses = self.run_step(*batch)
                means.add(losses)
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.check_finite()
                    record = self._train_record(means)
                    self.emit(record)
                    if bar is not None and "loss" in record:
                        bar.set_postfix(loss=f"{record['loss']:.3f}")
                    means.reset()
                last = self.step == cfg.steps
                if cfg.eval_every and self.step % cfg.eval_every == 0 and not last:
                    with self.cost.paused():  # evaluations and checkpoints are not step time
                        self.check_finite()
                        self.emit({"kind": "eval", "step": self.step, "split": cfg.eval_split,
                                   **self.evaluate()})
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last:
                    with self.cost.paused():
                        self.check_finite(weights=True)
                        self.save()
            self.cost.stop()
        finally:
            if bar is not None:
                bar.close()
        self.check_finite(weights=True)
        final = {"kind": "eval", "step": self.step, "split": cfg.eval_split, **self.evaluate()}
        self.emit(final)
        if self.rank == 0:
            atomic_save_json(final, self.run_dir / "final.json")
            atomic_save_json(self.cost.record(cfg.steps), self.run_dir / "cost.json")
            self.export(self.run_dir / "model.pt")
        return final

    def loader(self) -> DataLoader:
        """The batches of the steps from ``self.step`` on (:class:`StepSampler` order)."""
        cfg = self.cfg
        sampler = StepSampler(len(self.train_set), cfg.batch_size, cfg.steps, seed=cfg.seed,
                              start=self.step, rank=self.rank, world=self.world)
        # With the cache, samples carry their index so the step can look the teacher up. The
        # loader gets its own generator: drawing its base seed from the global RNG would
        # shift dropout's random stream on resume.
        dataset = Indexed(self.train_set) if self.teacher_cache is not None else self.train_set
        return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers,
                          collate_fn=CheckedCollate(self.num_classes),
                          pin_memory=self.cuda,
                          generator=torch.Generator().manual_seed(cfg.seed))

    def run_step(self, images: torch.Tensor, masks: torch.Tensor, *extra
                 ) -> dict[str, torch.Tensor] | None:
        """One iteration of :meth:`fit`'s loop on a batch: to the device, :meth:`train_step`,
        the schedule, the step count and the watch for non-finite losses (no host sync).

        Returns:
            The detached loss dict, or None when ``skip_nonfinite`` skipped the step (the
            buffers its forward pass changed are then restored).
        """
        images, masks = self.batch_to_device(images, masks)
        buffers = ([b.clone() for m in self.state_modules() for b in m.buffers()]
                   if self.cfg.skip_nonfinite else None)
        self.step_skipped = False
        losses = self.train_step(images, masks, *extra)
        self.scheduler.step()
        self.step += 1
        if self.step_skipped:  # undo what the forward pass did to BatchNorm statistics
            live = [b for m in self.state_modules() for b in m.buffers()]
            for buffer, saved in zip(live, buffers):
                buffer.copy_(saved)
            return None
        self._watch_losses(losses)
        return losses

    def batch_to_device(self, images: torch.Tensor, masks: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the device (images channels-last on CUDA), without a host sync."""
        images = images.to(self.device, non_blocking=True)
        masks = masks.to(self.device, non_blocking=True)
        if self.cuda and self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, masks

    def _start(self, resume: bool) -> None:
        """Prepares the run directory: a fresh run, or the newest good checkpoint of one.
        Everything is checked before anything in the directory changes."""
        self.last_checkpoint, self._first_bad = None, None
        self.cost.reset()  # a resumed run gets the earlier processes' cost from its checkpoint
        if not resume and checkpoint_paths(self.run_dir):
            raise FileExistsError(f"{self.run_dir} already holds checkpoints: pass --resume "
                                  "to continue that run, or choose a new --run-dir")
        cfg = self.cfg
        # a batch the data cannot fill fails here, before config.json is written
        StepSampler(len(self.train_set), cfg.batch_size, cfg.steps, seed=cfg.seed,
                    rank=self.rank, world=self.world)
        self.inputs = input_digests(cfg)
        found = load_newest_good(self.run_dir, map_location=self.device) if resume else None
        if found is not None:
            self._check_checkpoint(*found)
        self._check_config(restore_from=found[0] if found is not None else None)
        if self.rank == 0:  # what a killed process left: temporary files, lone manifests
            remove_stale_files(self.run_dir)
        if found is None:  # a run killed before its first checkpoint starts over
            self.loss_means, self.log_lines = LossMeans(), []
            metrics = self.run_dir / "metrics.jsonl"
            if self.rank == 0 and metrics.is_file():
                with writing(metrics):
                    os.truncate(metrics, 0)
        else:
            self.load(found[1], source=found[0])
            self.last_checkpoint = found[0]
        if self.step == 0:
            # The training stream (dropout) is a function of the seed alone, whatever ran
            # since the model was built; every rank gets its own.
            seed_everything(self.cfg.seed + 1_000_003 * self.rank)

    def _mean_over_ranks(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each summed term averaged over the DDP ranks (one collective); as it is outside DDP."""
        if self.world == 1 or not sums:
            return sums
        keys = sorted(sums)
        packed = torch.stack([sums[k].float() for k in keys])
        dist.all_reduce(packed)
        return dict(zip(keys, packed / self.world))

    def _train_record(self, means: LossMeans) -> dict:
        """The log line of the steps since the last one: the mean of each loss term."""
        sums = self._mean_over_ranks(means.sums)
        record = {"kind": "train", "step": self.step,
                  **{k: (v / (means.count - means.skipped)).item() for k, v in sums.items()},
                  "lr": self.scheduler.get_last_lr()[0],
                  "s_per_step": means.seconds / means.count}
        if self.cfg.skip_nonfinite:
            record["skipped"] = means.skipped
        return record

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

    # -- records, checkpoints, resume
    def emit(self, record: dict) -> None:
        """Appends a record to ``metrics.jsonl`` (whole lines only) and hands it to the
        callbacks; every checkpoint keeps a copy of the log (:meth:`state_dict`)."""
        if self.rank == 0:
            line = json.dumps(record) + "\n"
            append_line(self.run_dir / "metrics.jsonl", line)
            self.log_lines.append(line)
        for callback in self.callbacks:
            callback(record)

    def model_record(self) -> dict:
        """What rebuilds the model: weights, preset, class count, options, config."""
        return {"model": self.model.state_dict(), "preset": self.model.preset,
                "num_classes": self.num_classes, "model_kwargs": dict(self.cfg.model_kwargs),
                "kdnb_version": __version__, "config": self.cfg.to_dict(), "step": self.step}

    def state_dict(self) -> dict:
        log = "".join(self.log_lines)
        return {
            **self.model_record(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "inputs": self.inputs,  # SHA-256 of the teacher and pretext encoder files
            "extra": {"losses": self.losses.state_dict()} if self.losses is not None else {},
            "cost": self.cost.state_dict(),  # the time and FLOPs of the steps so far
            # the log this state has written: resume cuts what came after (replayed), and
            # rebuilds a log that was lost or damaged since
            "metrics": log, "metrics_bytes": len(log.encode()),
            "log_means": self.loss_means.state_dict(),  # the next log line's partial sums
        }

    def save(self) -> Path | None:
        """Writes ``ckpt-<step>.pt`` (atomically, with its manifest) and prunes old ones.

        Every rank calls it: under DDP the partial loss sums are first averaged over the
        ranks (one collective), which leaves the next log line's mean as it was.
        """
        self.loss_means.sums = self._mean_over_ranks(self.loss_means.sums)
        if self.rank != 0:
            return None
        self.last_checkpoint = save_checkpoint(self.state_dict(), self.run_dir, self.step,
                                               self.cfg.keep_checkpoints)
        return self.last_checkpoint

    def load(self, ckpt: dict, source: Path | None = None) -> None:
        """Restores the state of a loaded checkpoint (``source`` names it in messages), and
        ``metrics.jsonl`` as that state had written it (:meth:`_restore_metrics`)."""
        if ckpt["preset"] != self.model.preset or ckpt["num_classes"] != self.num_classes:
            raise ValueError(f"checkpoint holds {ckpt['preset']!r} with {ckpt['num_classes']} "
                             f"classes; this run trains {self.model.preset!r} with "
                             f"{self.num_classes}: use another run directory")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = int(ckpt["step"])
        set_rng_state(ckpt["rng"])
        if self.losses is not None and "losses" in ckpt.get("extra", {}):
            self.losses.load_state_dict(ckpt["extra"]["losses"])
        if "cost" in ckpt:  # (checkpoints from before kdnb.cost have none)
            self.cost.load_state_dict(ckpt["cost"])
        source = Path(source or f"ckpt-{self.step:07d}.pt")
        if "log_means" in ckpt:
            self.loss_means.load_state_dict(ckpt["log_means"], self.device)
        else:
            self.loss_means = LossMeans()
            if self.step % self.cfg.log_every:
                warnings.warn(f"{source.name} was written by an older kdnb without the partial "
                              "loss sums: the first log line after the resume averages only "
                              f"the steps after step {self.step}")
        self._restore_metrics(ckpt, source)

    def resume(self) -> bool:
        """Loads the newest good checkpoint (:func:`kdnb.checkpoint.load_newest_good`);
        returns False if the run has none.

        Raises:
            CheckpointError: the run has checkpoints but none of them is good.
        """
        found = load_newest_good(self.run_dir, map_location=self.device)
        if found is None:
            return False
        path, ckpt = found
        self.inputs = input_digests(self.cfg)
        self._check_checkpoint(path, ckpt)
        self.load(ckpt, source=path)
        self.last_checkpoint = path
        return True

    def _restore_metrics(self, ckpt: dict, source: Path) -> None:
        """Makes ``metrics.jsonl`` what the resumed state had logged; the steps after it are
        replayed and log again.

        The checkpoint holds the log as it was written up to its step. A file that begins
        with it is cut back to it (a line half-written by a killed process goes with the
        rest); a file that is missing, shorter (emptied, cut) or different (edited, damaged:
        kept beside it as ``metrics.jsonl.damaged``) is rebuilt from the checkpoint, with a
        warning naming the file. A checkpoint of an older kdnb holds only the log's length:
        the file is then cut at the line boundary at or before it, and what was lost is
        reported, not rebuilt.
        """
        path = self.run_dir / "metrics.jsonl"
        if self.rank != 0:
            return
        found = path.read_bytes() if path.is_file() else None
        if "metrics" not in ckpt:
            self.log_lines = self._cut_old_metrics(path, found, ckpt.get("metrics_bytes"), source)
            return
        data = ckpt["metrics"].encode()
        self.log_lines = ckpt["metrics"].splitlines(keepends=True)
        if found is not None and found.startswith(data):
            if len(found) > len(data):
                with writing(path):
                    os.truncate(path, len(data))
            return
        if found is None:
            what = "was missing"
        elif data.startswith(found):
            lines = found.count(b"\n")
            what = (f"holds {lines} of the {len(self.log_lines)} lines {source.name} had logged "
                    "(emptied or cut short?)")
        else:
            same = next((i for i, (a, b) in enumerate(zip(found.splitlines(keepends=True),
                                                          self.log_lines)) if a != b.encode()),
                        len(self.log_lines))
            kept = path.with_name(path.name + ".damaged")
            with writing(kept):
                os.replace(path, kept)
            what = (f"differs from what {source.name} had logged from line {same + 1} on (the "
                    f"file as found is kept as {kept.name})")
        atomic_write_bytes(data, path)
        warnings.warn(f"{path} {what}: rebuilt from {source.name} ({len(self.log_lines)} records, "
                      f"to step {self.step}); the steps after it are logged again as they replay")

    def _cut_old_metrics(self, path: Path, found: bytes | None, nbytes: int | None,
                         source: Path) -> list[str]:
        """:meth:`_restore_metrics` for a checkpoint that holds the log's length alone (or,
        older still, nothing): a cut at a line boundary, and a warning for what is lost."""
        if found is None:
            warnings.warn(f"{path} was missing, and {source.name} (an older kdnb's) holds no "
                          f"copy of it: the records up to step {self.step} are lost")
            return []
        end = len(found) if nbytes is None else min(int(nbytes), len(found))
        cut = found.rfind(b"\n", 0, end) + 1  # the line boundary at or before the end
        if nbytes is not None and len(found) < nbytes:
            warnings.warn(f"{path} is shorter ({len(found)} bytes) than the {nbytes} bytes "
                          f"{source.name} had logged (emptied or cut?), and that older "
                          "checkpoint holds no copy: the records lost stay lost")
        elif nbytes is not None and cut != nbytes:
            warnings.warn(f"{path} has no line end at byte {nbytes}, where {source.name} had "
                          f"stopped logging (edited?): cut at the line boundary before it, byte "
                          f"{cut}")
        if len(found) > cut:
            with writing(path):
                os.truncate(path, cut)
        return [line.decode(errors="replace") for line in found[:cut].splitlines(keepends=True)]

    def _check_checkpoint(self, path: Path, ckpt: dict) -> None:
        """A checkpoint resumes only under its own config and with the files it was trained
        with: the config stored in it is the source of truth (config.json can be lost or
        edited), and the teacher and pretext encoder must hash as they did."""
        problems = []
        if "config" in ckpt:
            stored = json.loads(json.dumps(ckpt["config"]))  # as config.json holds it
            diff = config_differences({**TrainConfig().to_json(), **stored}, self.cfg)
            if diff:
                problems.append(f"its config differs in {diff}")
        problems += input_differences(ckpt.get("inputs", {}), self.inputs, self.cfg)
        if problems:
            raise ValueError(f"{path} cannot resume this run: {'; '.join(problems)}. Either "
                             "resume with the same settings and the files it was trained with "
                             "(restore them), or start a new run in another --run-dir")

    def _check_config(self, restore_from: Path | None = None) -> None:
        path = self.run_dir / "config.json"
        current = self.cfg.to_json()
        saved = saved_config(path)
        if saved is not None:
            diff = config_differences(saved, self.cfg)
            if diff:
                raise ValueError(f"{self.run_dir} holds a run with another config (differs in "
                                 f"{diff}): resume with the same settings or use a new --run-dir")
        elif restore_from is not None and self.rank == 0:
            # the checkpoint's config matched (_check_checkpoint): it is the one written here
            warnings.warn(f"{path} was missing: restored from {restore_from.name}")
        if self.rank == 0 and saved != current:
            atomic_save_json(current, path)

    def export(self, path: Path) -> None:
        """Writes the weights alone (what ``kdnb eval`` and distillation load)."""
        atomic_save(self.model_record(), path)

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
