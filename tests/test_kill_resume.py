"""Kill safety: SIGKILL at any moment, resume from the newest good checkpoint, same weights.

Training runs in subprocesses started from a small driver script that patches, from the
outside, the point where it kills itself: inside a step, halfway through a checkpoint's
bytes, between a checkpoint's write and its rename, halfway through a log line, between
two log lines (a log_every that does not divide ckpt_every, in the distillation run). Each
kill is resumed by a fresh process; the chain ends with the weights (and every logged
loss) of an uninterrupted run, bit for bit (CPU, one thread).
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from kdnb.cli import main
from kdnb.config import TrainConfig
from kdnb.build import build_trainer
from kdnb.checkpoint import (CheckpointError, CheckpointWarning, atomic_save, checkpoint_paths,
                             file_sha256, load_checkpoint, manifest_path, model_from_checkpoint)

DRIVER = r'''
"""Trains a run; with a kill point, SIGKILLs itself there (argv: config, run_dir, kill, mode)."""
import io
import json
import os
import signal
import sys

import torch

from kdnb import build
from kdnb.config import TrainConfig

cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
run_dir, kill, resume = sys.argv[2], sys.argv[3], sys.argv[4] == "resume"
what, _, n = kill.partition(":")
n = int(n or 0)
calls = {"save": 0, "rename": 0, "emit": 0}


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if what == "save":  # the n-th checkpoint write stops halfway through its bytes
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        calls["save"] += 1
        if calls["save"] == n:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
if what == "rename":  # the n-th checkpoint is written and fsynced, never renamed into place
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".pt"):
            calls["rename"] += 1
            if calls["rename"] == n:
                die()
        return real_replace(src, dst)

    os.replace = replace
trainer = build.build_trainer(cfg, run_dir, progress=False)
if what == "step":  # inside step n: after the backward pass, before the optimizer's update
    def hook(optimizer, args, kwargs):
        if trainer.step + 1 == n:
            die()

    trainer.optimizer.register_step_pre_hook(hook)
if what == "metrics":  # halfway through writing the n-th log line
    real_emit = trainer.emit

    def emit(record):
        calls["emit"] += 1
        if calls["emit"] == n:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(record)[:15])
            die()
        real_emit(record)

    trainer.emit = emit
trainer.fit(resume=resume)
'''


def tiny(**changes) -> TrainConfig:
    base = dict(model="synth-student", data="synth", data_kwargs={"size": 64, "length": 16},
                steps=12, batch_size=4, optimizer="sgd", lr=0.05, eval_every=0, ckpt_every=2,
                log_every=1, keep_checkpoints=2, eval_batch_size=16, seed=0, threads=1)
    base.update(changes)
    return TrainConfig(**base)


def run_driver(driver, cfg, run_dir, kill="none", mode="resume"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(driver), json.dumps(cfg.to_dict()), str(run_dir),
                           kill, mode], env=env, capture_output=True, text=True, timeout=180)


def names(run_dir):
    return [p.name for p in checkpoint_paths(run_dir)]


def train_losses(run_dir):
    """(step, loss) of every train line; every line must be complete, valid JSON."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def test_sigkill_anywhere_then_resume_ends_with_the_same_weights(tmp_path):
    cfg = tiny()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    straight = build_trainer(cfg, tmp_path / "straight", progress=False)
    straight.fit()
    run = tmp_path / "killed"
    killed = -signal.SIGKILL

    # 1. Inside step 5 (checkpoints at 2 and 4 are on disk).
    out = run_driver(driver, cfg, run, "step:5", mode="fresh")
    assert out.returncode == killed, out.stderr[-2000:]
    assert names(run) == ["ckpt-0000004.pt", "ckpt-0000002.pt"]
    assert [s for s, _ in train_losses(run)] == [1, 2, 3, 4]

    # 2. Halfway through the bytes of its second checkpoint (step 8): the half file stays
    # a temporary file, never a ckpt-*.pt.
    out = run_driver(driver, cfg, run, "save:2")
    assert out.returncode == killed, out.stderr[-2000:]
    assert names(run) == ["ckpt-0000006.pt", "ckpt-0000004.pt"]
    partial = list(run.glob(".ckpt-0000008.pt.tmp-*"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size

    # 3. After the step-8 checkpoint and its manifest are written, before the rename.
    out = run_driver(driver, cfg, run, "rename:1")
    assert out.returncode == killed, out.stderr[-2000:]
    assert names(run) == ["ckpt-0000006.pt", "ckpt-0000004.pt"]
    assert manifest_path(run / "ckpt-0000008.pt").is_file()  # an orphan, cleaned on resume
    assert not partial[0].exists()  # the previous attempt's temporary file was removed

    # 4. Halfway through the log line of step 9 (after the step-8 checkpoint).
    out = run_driver(driver, cfg, run, "metrics:3")
    assert out.returncode == killed, out.stderr[-2000:]
    assert names(run) == ["ckpt-0000008.pt", "ckpt-0000006.pt"]
    assert not (run / "metrics.jsonl").read_text().endswith("\n")
    assert not list(run.glob(".*tmp*"))

    # 5. The newest checkpoint is then damaged on disk (same size, one byte changed):
    # resume names it, falls back to step 6 and finishes.
    newest = run / "ckpt-0000008.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    out = run_driver(driver, cfg, run, "none")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "skipping ckpt-0000008.pt" in out.stderr and "fails its checksum" in out.stderr

    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["model"]
    b = torch.load(run / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sa = torch.load(tmp_path / "straight" / "ckpt-0000012.pt", weights_only=True)["optimizer"]
    sb = torch.load(run / "ckpt-0000012.pt", weights_only=True)["optimizer"]
    for index, state in sa["state"].items():
        assert torch.equal(state["momentum_buffer"], sb["state"][index]["momentum_buffer"])
    # The log holds every step once, with the uninterrupted run's losses.
    assert train_losses(run) == train_losses(tmp_path / "straight")
    assert not list(run.glob(".*tmp*")) and not list(run.glob("*.sha256.json.*"))


def test_killed_distillation_resumes_with_adapters_and_fakd_statistics(tmp_path):
    """A distillation run killed mid-step ends as the uninterrupted one: the student, the
    loss modules' adapters and FAKD's class statistics, and every logged loss term. Its
    log_every (2) does not divide ckpt_every (3): the resumed run's step-4 line averages
    step 3, whose sums ckpt-3 carries, and step 4, as the uninterrupted run's does."""
    build_trainer(tiny(model="synth-teacher", steps=2, ckpt_every=0), tmp_path / "teacher",
            progress=False).fit()
    cfg = tiny(teacher=str(tmp_path / "teacher" / "model.pt"), steps=8, ckpt_every=3,
               log_every=2,
               methods={"kd": 1.0, "nfd": {"weight": 1.0}, "fakd": {"lambda_0": 1.0, "on": "nfd"}})
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = run_driver(driver, cfg, tmp_path / "straight", "none", mode="fresh")
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "killed"
    out = run_driver(driver, cfg, run, "step:5", mode="fresh")
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert names(run) == ["ckpt-0000003.pt"]
    out = run_driver(driver, cfg, run, "none")
    assert out.returncode == 0, out.stderr[-2000:]

    a = torch.load(tmp_path / "straight" / "ckpt-0000008.pt", weights_only=True)
    b = torch.load(run / "ckpt-0000008.pt", weights_only=True)
    losses = a["extra"]["losses"]
    assert any("adapter" in k for k in losses) and any(k.startswith("fakd") for k in losses)
    for sa, sb in ((a["model"], b["model"]), (losses, b["extra"]["losses"])):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(line)
                for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    terms = {"loss", "task", "kd", "nfd"}
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8]
    assert [q["step"] for q in straight if q["kind"] == "train"] == [2, 4, 6, 8]
    assert all(
        {k: r[k] for k in terms & r.keys()} == {k: q[k] for k in terms & q.keys()}
        for r, q in zip((r for r in records if r["kind"] == "train"),
                        (q for q in straight if q["kind"] == "train")))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step run: ckpt-2, ckpt-4 and model.pt, each with its manifest."""
    run = tmp_path_factory.mktemp("run") / "run"
    build_trainer(tiny(steps=4), run, progress=False).fit()
    return run


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def test_every_file_written_has_a_matching_manifest(run):
    for name in ("ckpt-0000002.pt", "ckpt-0000004.pt", "model.pt"):
        manifest = json.loads(manifest_path(run / name).read_text())
        assert manifest["file"] == name
        assert manifest["bytes"] == (run / name).stat().st_size
        assert manifest["sha256"] == file_sha256(run / name)


def test_truncated_checkpoint_is_named_and_resume_uses_the_previous_one(run, capsys):
    newest = run / "ckpt-0000004.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="ckpt-0000004.pt is truncated") as err:
        load_checkpoint(newest)
    assert "earlier checkpoint" in str(err.value)
    assert main(["eval", "--ckpt", str(newest)]) == 2
    message = capsys.readouterr().err
    assert "ckpt-0000004.pt is truncated" in message and "earlier checkpoint" in message
    trainer = build_trainer(tiny(steps=4), run, progress=False)
    with pytest.warns(CheckpointWarning, match="skipping ckpt-0000004.pt.*truncated"):
        assert trainer.resume()
    assert trainer.step == 2


def test_tampered_export_fails_its_checksum(run):
    model = run / "model.pt"
    data = bytearray(model.read_bytes())
    data[-4000] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.pt fails its checksum") as err:
        model_from_checkpoint(model)
    assert "train again" in str(err.value)


def test_no_good_checkpoint_is_an_error_not_a_silent_restart(run):
    for path in checkpoint_paths(run):
        path.write_bytes(path.read_bytes()[:100])
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="none of the"):
        build_trainer(tiny(steps=4), run, progress=False).fit(resume=True)
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_checkpoint_without_manifest_still_loads(run):
    """Checkpoints of older kdnb versions, and copies made without the manifest."""
    manifest_path(run / "model.pt").unlink()
    assert model_from_checkpoint(run / "model.pt").num_classes == 9


def test_checkpoint_from_a_newer_kdnb_or_not_from_kdnb_is_refused(run, tmp_path):
    ckpt = load_checkpoint(run / "model.pt")
    atomic_save({**ckpt, "kdnb_version": "9.0.0"}, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="kdnb 9.0.0, newer than this kdnb.*upgrade"):
        load_checkpoint(tmp_path / "newer.pt")
    atomic_save({"weights": ckpt["model"]}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a kdnb checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError, match="is a folder.*model.pt"):
        load_checkpoint(run)
