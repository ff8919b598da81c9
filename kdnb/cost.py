"""What a run costs, measured where it runs: seconds and FLOPs per training step, peak memory.

:class:`RunCost` watches a :class:`kdnb.train.Trainer`'s loop and gives the record that
the trainer writes as ``cost.json`` beside ``final.json``:

* **seconds per step**: the wall time of the training steps (``time.perf_counter``),
  evaluations and checkpoint writing left out. The clock runs over spans of steps, never
  around one step, so the loop gains no host-device sync: on CUDA the device is waited
  for only where a span ends, before an evaluation or a checkpoint (which wait for it
  anyway) and after the last step. The totals travel in every checkpoint, so a resumed
  run adds its steps to those of the processes before it (``processes``).
* **FLOPs per step** (:func:`step_flops`): counted once per process, before its first
  step, with ``torch.utils.flop_counter.FlopCounterMode``, on one step of the first batch
  run by copies of the student and the loss modules: forward and backward of both, and
  the teacher's forward when it runs each step. The run's own weights, optimizer state,
  BatchNorm statistics, loss memories and random streams are untouched (the count cannot
  run inside the real step: to count, the counter splits some operations into smaller
  ones, which changes their rounding). It counts matrix products and convolutions only:
  elementwise work (activations, normalization, the losses' arithmetic, the optimizer)
  is not counted. With the teacher's outputs cached (:class:`kdnb.distill.TeacherOutputs`)
  the teacher costs nothing per step, and what computing the cache costs once is
  ``teacher_cache_flops`` (the teacher's forward FLOPs per image times the pool), charged
  to every run that reads the cache, as a run alone would compute it. Under DDP the
  figures are those of the global batch (one rank's count times the ranks).
* **peak memory**: ``torch.cuda.max_memory_allocated`` over the training steps (the count
  and the evaluations left out); None on the CPU.

``docs/METHODS.md`` ("Matched compute") says how :mod:`kdnb.compare` uses the FLOPs. The
count costs about one more step at the start (and the memory of a copy of the student and
of the loss modules, their state included: CIRKD's memories are 428 MB at K = 19);
``TrainConfig.count_flops=False`` (``--no-flop-count``) turns it off for a model whose
count is slow or does not fit twice.
"""
from __future__ import annotations

import contextlib
import copy
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from .distill import teacher_maps
from .runtime import unwrap

#: what the FLOP figures count (written into cost.json beside them)
FLOPS_COUNTED = ("matrix products and convolutions, forward and backward "
                 "(torch.utils.flop_counter.FlopCounterMode); elementwise work is not counted")


def count_flops(fn, *args, **kwargs) -> tuple[object, int]:
    """``fn(*args, **kwargs)`` and the FLOPs its matrix products and convolutions took."""
    with FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    return result, counter.get_total_flops()


def cache_size(teacher_cache: dict | None) -> int | None:
    """The number of images whose teacher outputs are cached (each map has a row per
    image), or None without a cache."""
    return len(next(iter(teacher_cache.values()))) if teacher_cache else None


def device_name(device: torch.device) -> str:
    """``"cpu"`` or ``"cuda:0 (NVIDIA H200)"``."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def step_flops(trainer, batch) -> dict:
    """The FLOPs of one training step of ``trainer`` on ``batch`` (one rank's share).

    The step runs on copies of the student and the loss modules (the frozen teacher is
    shared: eval mode, ``torch.inference_mode``), with the global random streams restored
    afterwards, so the run itself is not touched; the teacher's forward is counted once
    more alone, to tell its share.

    Returns:
        ``{"step": all of it, "teacher": the teacher's forward on this batch or None,
        "images": the batch's size}``.
    """
    images, masks, *extra = batch
    images, masks = trainer.batch_to_device(images, masks)
    teacher = trainer.teacher
    teacher_flops = None
    if teacher is not None:
        _, teacher_flops = count_flops(teacher_maps, teacher, images, trainer.stages,
                                       amp=trainer.cuda and trainer.cfg.amp)
    # A twin of the trainer whose step runs the same code on copies; one deepcopy keeps
    # what the losses share with the student (FAKD reads its classifier).
    twin = copy.copy(trainer)
    shared = {} if teacher is None else {id(t): t for t in (*teacher.modules(),
                                                             *teacher.parameters())}
    twin.ddp, twin.losses = copy.deepcopy((unwrap(trainer.ddp), trainer.losses), shared)
    def one_step():
        twin.compute_losses(images, masks, *extra)["loss"].backward()

    with torch.random.fork_rng(devices=[images.device] if trainer.cuda else []):
        _, flops = count_flops(one_step)
    return {"step": flops, "teacher": teacher_flops, "images": images.shape[0]}


def count_run_flops(trainer) -> dict:
    """The FLOP entries of ``cost.json`` for ``trainer``'s run, counted on the first batch
    of its loader as :class:`RunCost` counts them before a first step: for a run trained
    before kdnb wrote ``cost.json`` (the FLOPs depend on the config alone; its times are
    lost)."""
    batch = next(iter(trainer.loader()))
    return RunCost(trainer.device, world=trainer.world)._flop_figures(
        step_flops(trainer, batch), cache_size(trainer.teacher_cache))


class RunCost:
    """The cost of one run, accumulated over the processes that trained it.

    Args:
        device: where the run trains.
        world: the number of DDP processes (FLOPs are those of the global batch).
        count_flops: count the FLOPs before this process's first step (off: the FLOP
            figures are those of an earlier process, or None).

    Use it around the loop: :meth:`step` around each step, :meth:`paused` around
    evaluations and checkpoints, :meth:`stop` after the last step; then :meth:`record`.
    """

    def __init__(self, device: torch.device, *, world: int = 1, count_flops: bool = True):
        self.device, self.world, self.count_flops = device, world, count_flops
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        """Forgets every measurement (a run starts, or resumes and loads them)."""
        self.earlier: list[dict] = []     # the processes before this one (from a checkpoint)
        self.flops: dict | None = None    # the FLOP figures (kept from a checkpoint too)
        self.seconds, self.timed_steps = 0.0, 0
        self.peak_memory: int | None = None
        self._started = False             # this process's clock has started
        self._clock: float | None = None  # perf_counter at the start of the running span

    # -- around the loop
    @property
    def started(self) -> bool:
        """Whether this process's first step (and the FLOP count before it) has begun."""
        return self._started

    @contextlib.contextmanager
    def step(self, trainer, batch):
        """Around each training step of ``trainer`` (``batch``: its batch). Before a
        process's first step the FLOPs are counted (:func:`step_flops`), then the clock
        starts."""
        if not self._started:
            self._started = True
            if self.count_flops:
                self.flops = self._flop_figures(step_flops(trainer, batch),
                                                cache_size(trainer.teacher_cache))
            self._reset_peak_memory()
            self._start_clock()
        self.timed_steps += 1
        yield

    @contextlib.contextmanager
    def paused(self):
        """Around what is not a training step (an evaluation, a checkpoint)."""
        self._stop_clock()
        try:
            yield
        finally:
            if self._started:
                self._reset_peak_memory()
                self._start_clock()

    def stop(self) -> None:
        """After the last step: closes the running span."""
        self._stop_clock()

    # -- the clock and the memory peak
    def _start_clock(self) -> None:
        if self.cuda:  # what was queued before (the count) is not the span's
            torch.cuda.synchronize(self.device)
        self._clock = time.perf_counter()

    def _stop_clock(self) -> None:
        if self._clock is None:
            return
        if self.cuda:  # the span's steps have finished, not only been queued
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - self._clock
        self._clock = None
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_memory = max(self.peak_memory or 0, peak)

    def _reset_peak_memory(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def _flop_figures(self, counted: dict, pool: int | None) -> dict:
        """The FLOP entries of the record, from :func:`step_flops` on one rank (``pool``:
        the images whose teacher outputs are cached, or None)."""
        total = counted["step"] * self.world
        teacher_step, cache = 0, 0
        if pool is not None:  # the teacher's outputs were computed once
            cache = (round(counted["teacher"] / counted["images"] * pool)
                     if counted["teacher"] is not None else None)
        elif counted["teacher"] is not None:  # the teacher runs each step, inside the count
            teacher_step = counted["teacher"] * self.world
        return {"flops_per_step": total, "student_flops_per_step": total - teacher_step,
                "teacher_flops_per_step": teacher_step, "teacher_cache_flops": cache}

    # -- the record and the checkpoint
    def this_process(self) -> dict:
        return {"device": device_name(self.device), "threads": torch.get_num_threads(),
                "world": self.world, "timed_steps": self.timed_steps,
                "train_seconds": self.seconds, "peak_memory_bytes": self.peak_memory}

    def state_dict(self) -> dict:
        """What a checkpoint keeps: every process so far and the FLOP figures."""
        return {"processes": [*self.earlier, self.this_process()], "flops": self.flops}

    def load_state_dict(self, state: dict) -> None:
        self.earlier = list(state.get("processes", []))
        self.flops = state.get("flops")

    def record(self, steps: int) -> dict:
        """What ``cost.json`` holds, for a run of ``steps`` steps."""
        processes = [*self.earlier, self.this_process()]
        timed = sum(p["timed_steps"] for p in processes)
        seconds = sum(p["train_seconds"] for p in processes)
        peaks = [p["peak_memory_bytes"] for p in processes if p["peak_memory_bytes"] is not None]
        flops = self.flops or dict.fromkeys(("flops_per_step", "student_flops_per_step",
                                             "teacher_flops_per_step", "teacher_cache_flops"))
        return {"steps": steps, "seconds_per_step": seconds / timed if timed else None,
                "train_seconds": seconds, "timed_steps": timed, **flops,
                "flops_counted": FLOPS_COUNTED,
                "peak_memory_bytes": max(peaks) if peaks else None,
                "device": processes[-1]["device"], "threads": processes[-1]["threads"],
                "processes": processes}
