"""A run directory belongs to one process and resumes only with what it was trained with.

The cases of the reliability issue that gave a wrong result with exit 0: a teacher swapped
between kill and resume, a lost ``config.json`` resumed under new settings, two processes
in one run directory, ``--resume`` into a directory that holds no run. Each asserts the
outcome, the message (the problem and the way out), and that the run directory is left as
it was.
"""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from kdnb.build import build_trainer
from kdnb.checkpoint import atomic_save, load_checkpoint
from kdnb.cli import main
from kdnb.config import TrainConfig
from kdnb.pretrain import PretrainConfig, pretrain_encoder
from kdnb.rundir import RunLock, RunLockedError
from test_bad_inputs import digest
from test_train import Stop, stop_at as stop_after


def tiny(**changes) -> TrainConfig:
    base = dict(model="synth-student", data="synth", data_kwargs={"size": 64, "length": 8},
                steps=4, batch_size=2, eval_every=0, ckpt_every=2, log_every=1,
                eval_batch_size=8, seed=0)
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A finished 2-step model to teach from (``model.pt`` with its manifest)."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    build_trainer(tiny(steps=2, ckpt_every=0), run, progress=False).fit()
    return run / "model.pt"


def another_teacher(path, out):
    """A valid teacher file with other weights (the same preset and classes)."""
    ckpt = load_checkpoint(path)
    ckpt["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    atomic_save(ckpt, out)
    return out


def copy_model(src, dst):
    for name in (src.name, src.name + ".sha256.json"):
        shutil.copy(src.with_name(name), dst.with_name(name))


def killed_student(tmp_path, teacher):
    """A distillation run stopped after its step-2 checkpoint, with its teacher copied
    beside it (the copy is what the tests replace)."""
    own = tmp_path / "teacher" / "model.pt"
    own.parent.mkdir()
    copy_model(teacher, own)
    cfg = tiny(teacher=str(own), methods={"kd": {"weight": 1.0}})
    run = tmp_path / "student"
    with pytest.raises(Stop):
        build_trainer(cfg, run, progress=False, callbacks=[stop_after(3)]).fit()
    return cfg, run, own


def test_a_checkpoint_records_the_teacher_it_was_trained_with(tmp_path, teacher):
    cfg, run, own = killed_student(tmp_path, teacher)
    ckpt = load_checkpoint(run / "ckpt-0000002.pt")
    assert ckpt["inputs"] == {"teacher": hashlib.sha256(own.read_bytes()).hexdigest()}


def test_resume_with_the_teacher_swapped_is_refused(tmp_path, teacher):
    cfg, run, own = killed_student(tmp_path, teacher)
    another_teacher(teacher, own)  # same path, another valid teacher
    before = digest(run)
    with pytest.raises(ValueError) as err:
        build_trainer(cfg, run, progress=False).fit(resume=True)
    message = str(err.value)
    assert "the teacher" in message and "not the file this run was trained with" in message
    assert "restore them" in message and "another --run-dir" in message
    assert digest(run) == before  # not a byte changed, no lock left behind
    # the original teacher back: the run resumes and ends as an uninterrupted one
    copy_model(teacher, own)
    resumed = build_trainer(cfg, run, progress=False).fit(resume=True)
    uninterrupted = build_trainer(cfg, tmp_path / "straight", progress=False).fit()
    assert resumed["miou"] == uninterrupted["miou"]
    a = load_checkpoint(run / "model.pt")["model"]
    b = load_checkpoint(tmp_path / "straight" / "model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_cli_refuses_a_swapped_teacher_with_exit_2(tmp_path, teacher, capsys):
    cfg, run, own = killed_student(tmp_path, teacher)
    cfg.save(tmp_path / "cfg.json")
    another_teacher(teacher, own)
    before = digest(run)
    argv = ["distill", "--config", str(tmp_path / "cfg.json"), "--teacher", str(own),
            "--methods", "kd=1", "--run-dir", str(run), "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not the file this run was trained with" in err and "restore" in err
    assert digest(run) == before


def test_lost_config_resumed_under_new_settings_is_refused(tmp_path):
    cfg = tiny()
    run = tmp_path / "run"
    with pytest.raises(Stop):
        build_trainer(cfg, run, progress=False, callbacks=[stop_after(3)]).fit()
    (run / "config.json").unlink()
    before = digest(run)
    with pytest.raises(ValueError) as err:
        build_trainer(cfg.replace(steps=6, batch_size=4), run, progress=False).fit(resume=True)
    assert "differs in ['batch_size', 'steps']" in str(err.value)
    assert "resume with the same settings" in str(err.value)
    assert digest(run) == before and not (run / "config.json").exists()


def test_lost_config_is_restored_from_the_checkpoint(tmp_path):
    cfg = tiny()
    run = tmp_path / "run"
    with pytest.raises(Stop):
        build_trainer(cfg, run, progress=False, callbacks=[stop_after(3)]).fit()
    (run / "config.json").unlink()
    with pytest.warns(UserWarning, match="config.json was missing: restored from ckpt-0000002.pt"):
        resumed = build_trainer(cfg, run, progress=False).fit(resume=True)
    assert json.loads((run / "config.json").read_text()) == cfg.to_json()
    straight = build_trainer(cfg, tmp_path / "straight", progress=False).fit()
    assert resumed["miou"] == straight["miou"]


def test_resume_into_a_directory_without_a_run_is_an_error(tmp_path, capsys):
    missing = tmp_path / "typo"
    with pytest.raises(FileNotFoundError, match="holds no run"):
        build_trainer(tiny(), missing, progress=False).fit(resume=True)
    assert not missing.exists()
    tiny().save(tmp_path / "cfg.json")
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--run-dir", str(missing),
                 "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds no run" in err and "leave out --resume" in err and not missing.exists()


HOLD = """
import fcntl, json, os, socket, sys, time
fh = open(sys.argv[1], "a+")
fcntl.flock(fh, fcntl.LOCK_EX)
fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
fh.flush()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_process_in_the_same_run_directory_is_refused(tmp_path):
    cfg = tiny()
    run = tmp_path / "run"
    with pytest.raises(Stop):
        build_trainer(cfg, run, progress=False, callbacks=[stop_after(3)]).fit()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = digest(run)
        with pytest.raises(RunLockedError, match=f"process {holder.pid} on host "
                                                 f"{socket.gethostname()}"):
            build_trainer(cfg, run, progress=False).fit(resume=True)
        assert digest(run) == before  # the holder's lock and every file untouched
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: the kernel dropped its lock, the file it left is taken over
    with pytest.warns(UserWarning, match=f"left by process {holder.pid}.*has ended"):
        build_trainer(cfg, run, progress=False).fit(resume=True)
    assert not (run / ".lock").exists()


def test_the_lock_is_held_during_the_run_and_released_after_a_failure(tmp_path):
    seen = []

    def look(record):
        seen.append(json.loads((tmp_path / "run" / ".lock").read_text())["pid"])
        with pytest.raises(RunLockedError, match="is in use"):
            RunLock(tmp_path / "run").acquire()  # a second taker, even in this process
        raise Stop

    with pytest.raises(Stop):
        build_trainer(tiny(), tmp_path / "run", progress=False, callbacks=[look]).fit()
    assert seen == [os.getpid()] and not (tmp_path / "run" / ".lock").exists()


def test_a_lock_file_with_garbage_is_taken_over(tmp_path):
    (tmp_path / ".lock").write_text("[1, 2")  # a holder killed while writing it
    with pytest.warns(UserWarning, match="left by another process"):
        with RunLock(tmp_path) as lock:
            assert lock.held and json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_a_changed_pretext_encoder_warns_but_resumes(tmp_path):
    encoder = tmp_path / "encoder.pt"
    small = dict(preset="synth-student", steps=1, batch_size=2, length=4)
    pretrain_encoder(PretrainConfig(**small), encoder, progress=False)
    cfg = tiny(encoder_init=str(encoder))
    run = tmp_path / "run"
    with pytest.raises(Stop):
        build_trainer(cfg, run, progress=False, callbacks=[stop_after(3)]).fit()
    assert set(load_checkpoint(run / "ckpt-0000002.pt")["inputs"]) == {"encoder_init"}
    pretrain_encoder(PretrainConfig(**small, seed=1), encoder, progress=False)  # other weights
    with pytest.warns(UserWarning, match="encoder_init .* is not the file this run was trained with"):
        resumed = build_trainer(cfg, run, progress=False).fit(resume=True)
    assert resumed["step"] == cfg.steps


def test_an_impossible_first_run_leaves_nothing_that_blocks_the_corrected_one(tmp_path, capsys):
    tiny().save(tmp_path / "cfg.json")
    run = tmp_path / "run"
    argv = ["train", "--config", str(tmp_path / "cfg.json"), "--run-dir", str(run)]
    assert main(argv + ["--batch-size", "1000000000"]) == 2
    assert "fewer than one batch of 1000000000" in capsys.readouterr().err
    assert not run.exists() or not any(run.iterdir())  # no config.json, no lock
    assert main(argv) == 0 and (run / "model.pt").is_file()
