"""What a run costs (kdnb.cost): cost.json, FLOPs against a closed form, no effect on results."""
import json

import pytest
import torch
from torch import nn

from kdnb.build import build_trainer
from kdnb.config import TrainConfig
from kdnb.cost import count_flops
from test_train import Stop, stop_at, tiny  # 6 steps of 4 images, a checkpoint every 3

COST_KEYS = {"steps", "seconds_per_step", "train_seconds", "timed_steps", "flops_per_step",
             "student_flops_per_step", "teacher_flops_per_step", "teacher_cache_flops",
             "flops_counted", "peak_memory_bytes", "device", "threads", "processes"}
#: CIRKD with small memories: a loss whose forward changes its state (queues, draws)
SMALL_CIRKD = {"cirkd": {"weight": 1.0, "pixel_memory_size": 256, "region_memory_size": 32,
                         "pixel_contrast_size": 64, "region_contrast_size": 16}}


def cost_of(run_dir) -> dict:
    return json.loads((run_dir / "cost.json").read_text())


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")
    build_trainer(tiny(steps=1, ckpt_every=0, seed=5), run, progress=False).fit()
    return str(run / "model.pt")


def test_every_run_writes_its_cost(tmp_path):
    build_trainer(tiny(), tmp_path, progress=False).fit()
    cost = cost_of(tmp_path)
    assert set(cost) == COST_KEYS
    assert cost["steps"] == cost["timed_steps"] == 6
    assert cost["train_seconds"] > 0
    assert cost["seconds_per_step"] == pytest.approx(cost["train_seconds"] / 6)
    assert cost["flops_per_step"] == cost["student_flops_per_step"] > 0
    assert cost["teacher_flops_per_step"] == cost["teacher_cache_flops"] == 0
    assert "elementwise work is not counted" in cost["flops_counted"]
    assert cost["peak_memory_bytes"] is None  # CPU
    assert (cost["device"], cost["threads"]) == ("cpu", torch.get_num_threads())
    assert len(cost["processes"]) == 1


class TwoConvs(nn.Module):
    """Two 1x1 convolutions, whose FLOPs have a closed form."""

    preset = "synth-student"  # what build_trainer checks against cfg.model

    def __init__(self, hidden: int = 8, num_classes: int = 9):
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(nn.Conv2d(3, hidden, 1), nn.ReLU(),
                                 nn.Conv2d(hidden, num_classes, 1))

    def forward(self, images):
        return self.net(images)


def test_flops_per_step_are_the_closed_form_of_a_1x1_conv_model(tmp_path):
    """A 1x1 convolution from C_in to C_out costs 2 * B*H*W * C_in * C_out FLOPs forward; its
    backward as much again for the weight's gradient, and once more for the input's, which
    the first layer does not need (the images need no gradient). The cross-entropy, ReLU and
    the biases are elementwise work: not counted."""
    batch, size, hidden, classes = 4, 64, 8, 9
    pixels = batch * size * size
    first, second = 2 * pixels * 3 * hidden, 2 * pixels * hidden * classes
    model = TwoConvs(hidden, classes)
    _, forward = count_flops(model, torch.rand(batch, 3, size, size))
    assert forward == first + second
    build_trainer(tiny(steps=2, ckpt_every=0), tmp_path, model=model, progress=False).fit()
    assert cost_of(tmp_path)["flops_per_step"] == (first + first) + (second + 2 * second)


def test_a_cached_teacher_costs_nothing_per_step_and_its_pool_once(tmp_path, teacher_ckpt):
    cfg = tiny(teacher=teacher_ckpt, methods={"kd": 1.0}, flip=False, steps=2, ckpt_every=0)
    build_trainer(cfg, tmp_path / "live", progress=False).fit()
    build_trainer(cfg.replace(cache_teacher=True), tmp_path / "cached", progress=False).fit()
    live, cached = cost_of(tmp_path / "live"), cost_of(tmp_path / "cached")
    assert cached["teacher_flops_per_step"] == 0 and cached["teacher_cache_flops"] > 0
    assert live["teacher_flops_per_step"] > 0 and live["teacher_cache_flops"] == 0
    # the teacher's forward per image, times the batch (4) per step or the pool (24) once
    assert cached["teacher_cache_flops"] == live["teacher_flops_per_step"] / 4 * 24
    assert (live["student_flops_per_step"] == cached["student_flops_per_step"]
            == cached["flops_per_step"])
    assert live["flops_per_step"] == cached["flops_per_step"] + live["teacher_flops_per_step"]


@pytest.mark.parametrize("changes", [
    {},  # the student alone (its decoder's dropout draws from the global stream)
    {"methods": {"kd": 1.0, **SMALL_CIRKD}, "optimizer": "adamw", "lr": 1e-3},  # live teacher
    {"methods": {"kd": 1.0, "fakd": {}}, "cache_teacher": True, "flip": False},
], ids=["alone", "kd+cirkd-live", "kd+fakd-cached"])
def test_counting_changes_no_weight(tmp_path, teacher_ckpt, changes):
    """The count runs a step on copies: the same seed gives bit-identical weights, loss
    states and logged losses with and without it."""
    cfg = tiny(**({"teacher": teacher_ckpt} if "methods" in changes else {}), **changes)
    trainers = {}
    for count in (True, False):
        trainers[count] = build_trainer(cfg.replace(count_flops=count), tmp_path / str(count),
                                        progress=False)
        trainers[count].fit()
    on, off = trainers[True], trainers[False]
    for module in ("model", "losses"):
        a, b = getattr(on, module), getattr(off, module)
        if a is None:
            continue
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), (module, key)
    logs = [[{k: v for k, v in json.loads(line).items() if k != "s_per_step"}  # (the time)
             for line in (tmp_path / str(count) / "metrics.jsonl").read_text().splitlines()]
            for count in (True, False)]
    assert logs[0] == logs[1]
    assert cost_of(tmp_path / "True")["flops_per_step"] > 0
    assert cost_of(tmp_path / "False")["flops_per_step"] is None


def test_a_resumed_run_adds_the_steps_of_every_process(tmp_path):
    cfg = tiny()  # 6 steps, a checkpoint every 3
    with pytest.raises(Stop):
        build_trainer(cfg, tmp_path, progress=False, callbacks=[stop_at(4)]).fit()
    # Resumed from step 3 (the FLOP count may be left off on resume: it was kept).
    build_trainer(cfg.replace(count_flops=False), tmp_path, progress=False).fit(resume=True)
    cost = cost_of(tmp_path)
    first, second = cost["processes"]
    # the first process's steps up to its checkpoint; step 4, replayed, counts once
    assert (first["timed_steps"], second["timed_steps"], cost["timed_steps"]) == (3, 3, 6)
    assert cost["train_seconds"] == pytest.approx(first["train_seconds"] + second["train_seconds"])
    assert first["train_seconds"] > 0 and second["train_seconds"] > 0
    build_trainer(cfg, tmp_path / "straight", progress=False).fit()
    assert cost["flops_per_step"] == cost_of(tmp_path / "straight")["flops_per_step"]


def test_the_flop_count_is_turned_off_on_the_command_line():
    from kdnb.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--no-flop-count"])
    assert config_from_args(args).count_flops is False
    assert TrainConfig().count_flops is True


def test_the_flop_count_is_not_in_the_first_log_lines_step_time(tmp_path, monkeypatch):
    """The count runs before the first step; the first train record's s_per_step (like
    cost.json's seconds) leaves it out. A count made 3 s slower must not show there."""
    import time

    import kdnb.cost as cost_module

    real = cost_module.step_flops

    def slow_count(trainer, batch):
        time.sleep(3.0)
        return real(trainer, batch)

    monkeypatch.setattr(cost_module, "step_flops", slow_count)
    # no checkpoint inside a log window: the log's clock, unlike cost.json's, runs through one
    build_trainer(tiny(log_every=3, ckpt_every=0), tmp_path, progress=False).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, second = [r for r in records if r.get("kind") == "train"][:2]
    assert (first["step"], second["step"]) == (3, 6)
    # with the count in it, the first line's three steps would each be 1 s slower
    assert first["s_per_step"] - second["s_per_step"] < 0.5, (first, second)
    # cost.json's step time is the log's: the sum of the two lines' steps
    total = 3 * (first["s_per_step"] + second["s_per_step"])
    assert cost_of(tmp_path)["train_seconds"] == pytest.approx(total, rel=0.2, abs=0.2)
