"""Two processes under torchrun (gloo, CPU) against one process at the same global batch."""
import json
import os
import subprocess
import sys

import torch

ARGS = ["train", "--model", "synth-student", "--size", "64", "--steps", "6", "--batch-size", "8",
        "--eval-every", "0", "--ckpt-every", "0", "--log-every", "1", "--threads", "1",
        "--optimizer", "sgd", "--lr", "0.01", "--model-arg", "decoder_dropout=0"]


def run(run_dir, nproc, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "kdnb.cli"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "kdnb.cli"]
    out = subprocess.run(cmd + ARGS + list(extra) + ["--run-dir", str(run_dir)], env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    return losses, torch.load(run_dir / "model.pt", weights_only=True)["model"]


def test_two_processes_follow_one_with_frozen_batchnorm(tmp_path):
    """With BatchNorm frozen and no dropout, each rank's shard gives half the global batch's
    gradient and DDP averages them: the runs agree up to float summation order (1e-4).

    With BatchNorm training on each shard (the default), the curves differ by what the
    batch statistics of 4 instead of 8 images change: 3-17 % per step over the first 12
    steps in one measurement (see the distillation issue's notes)."""
    one, w1 = run(tmp_path / "one", 1, ["--freeze-bn"])
    two, w2 = run(tmp_path / "two", 2, ["--freeze-bn"])
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a), (one, two)
    for key in w1:
        diff = float((w1[key].float() - w2[key].float()).abs().max())
        scale = float(w1[key].float().abs().max()) + 1e-12
        assert diff <= 1e-4 * scale, (key, diff, scale)
    # cost.json counts the global batch: each rank's half of it, times the ranks
    cost = {n: json.loads((tmp_path / n / "cost.json").read_text()) for n in ("one", "two")}
    assert cost["one"]["flops_per_step"] == cost["two"]["flops_per_step"] > 0
    assert cost["two"]["processes"][0]["world"] == 2


def test_sync_bn_on_cpu_is_refused(tmp_path, capsys):
    from kdnb.cli import main

    code = main(ARGS + ["--sync-bn", "--run-dir", str(tmp_path / "r")])
    assert code == 2 and "--sync-bn needs CUDA" in capsys.readouterr().err


def test_two_process_distillation_averages_adapter_gradients(tmp_path):
    """The adapters live in the loss modules, outside DDP's wrapper: their gradients must be
    averaged too, or each rank's adapter drifts and the student with it."""
    teacher_dir = tmp_path / "teacher"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "kdnb.cli", "train", "--model", "synth-teacher",
                          "--size", "64", "--steps", "1", "--batch-size", "2", "--eval-every", "0",
                          "--threads", "1", "--run-dir", str(teacher_dir)],
                         env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    extra = ["--freeze-bn", "--teacher", str(teacher_dir / "model.pt"), "--methods", "nfd=1",
             "--ckpt-every", "6"]
    results = {}
    for nproc in (1, 2):
        run_dir = tmp_path / f"p{nproc}"
        argv = ["distill" if a == "train" else a for a in ARGS] + extra
        cmd = ([sys.executable, "-m", "kdnb.cli"] if nproc == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", "-m", "kdnb.cli"])
        out = subprocess.run(cmd + argv + ["--run-dir", str(run_dir)], env=env,
                             capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
        ckpt = torch.load(run_dir / "ckpt-0000006.pt", weights_only=True)
        results[nproc] = {**ckpt["model"], **{f"losses.{k}": v for k, v in
                                               ckpt["extra"]["losses"].items()}}
    assert any("adapter" in k for k in results[1])
    for key, value in results[1].items():
        diff = float((value.float() - results[2][key].float()).abs().max())
        assert diff <= 1e-4 * (float(value.float().abs().max()) + 1e-12), (key, diff)
