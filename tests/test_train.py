"""The supervised loop: exact resume, atomic checkpoints, run directory, clear errors."""
import json
import math

import pytest
import torch

from kdnb.config import TrainConfig
from kdnb.build import build_trainer
from kdnb.checkpoint import (CheckpointWarning, atomic_save, checkpoint_paths, load_checkpoint,
                             model_from_checkpoint)
from kdnb.data import StepSampler
from kdnb.train import NonFiniteLossError, Trainer


def tiny(**changes) -> TrainConfig:
    base = dict(model="synth-student", data="synth", data_kwargs={"size": 64, "length": 24},
                steps=6, batch_size=4, optimizer="sgd", lr=0.05, eval_every=0, ckpt_every=3,
                log_every=1, eval_batch_size=8, seed=0)
    base.update(changes)
    cfg = TrainConfig(**base)
    return cfg


class Stop(Exception):
    pass


def stop_at(step):
    def callback(record):
        if record["kind"] == "train" and record["step"] == step:
            raise Stop
    return callback


def test_resume_ends_with_the_same_weights(tmp_path):
    cfg = tiny()
    straight = build_trainer(cfg, tmp_path / "a", progress=False)
    straight.fit()
    # A run interrupted after the step-3 checkpoint was written (the callback fires at the
    # step-4 log), then resumed by a fresh process-like Trainer.
    broken = build_trainer(cfg, tmp_path / "b", progress=False, callbacks=[stop_at(4)])
    with pytest.raises(Stop):
        broken.fit()
    assert [p.name for p in checkpoint_paths(tmp_path / "b")] == ["ckpt-0000003.pt"]
    resumed = build_trainer(cfg, tmp_path / "b", progress=False)
    resumed.fit(resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps[-3:] == [4, 5, 6]


def test_run_directory_contents(tmp_path):
    cfg = tiny(steps=4, ckpt_every=2, keep_checkpoints=1, eval_every=2)
    final = build_trainer(cfg, tmp_path, progress=False).fit()
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(cfg.to_dict()))
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["ckpt-0000004.pt"]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "eval"}
    assert json.loads((tmp_path / "final.json").read_text())["miou"] == final["miou"]
    model = model_from_checkpoint(tmp_path / "model.pt", preset="synth-student", num_classes=9)
    assert model.num_classes == 9
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_sampler_is_deterministic_and_shards_the_global_batch():
    full = list(StepSampler(20, 4, 12, seed=1))
    assert full == list(StepSampler(20, 4, 12, seed=1))
    assert list(StepSampler(20, 4, 12, seed=1, start=7)) == full[7:]
    for step in range(12):
        shards = [list(StepSampler(20, 4, 12, seed=1, rank=r, world=2))[step] for r in range(2)]
        assert sorted(shards[0] + shards[1]) == sorted(full[step])
    # within an epoch (5 steps of 4 out of 20 samples) no sample repeats
    first_epoch = [i for batch in full[:5] for i, _ in batch]
    assert sorted(first_epoch) == list(range(20))


def test_existing_run_without_resume_is_refused(tmp_path):
    build_trainer(tiny(steps=3), tmp_path, progress=False).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        build_trainer(tiny(steps=3), tmp_path, progress=False).fit()


def test_resume_with_another_config_is_refused(tmp_path):
    build_trainer(tiny(steps=3), tmp_path, progress=False).fit()
    with pytest.raises(ValueError, match=r"differs in \['lr'\]"):
        build_trainer(tiny(steps=3, lr=0.1), tmp_path, progress=False).fit(resume=True)


def test_checkpoint_from_another_model_is_named(tmp_path):
    build_trainer(tiny(steps=3), tmp_path, progress=False).fit()
    with pytest.raises(ValueError, match="holds preset 'synth-student', not 'synth-teacher'"):
        model_from_checkpoint(tmp_path / "model.pt", preset="synth-teacher")
    with pytest.raises(ValueError, match="predicts 9 classes but the dataset has 21"):
        model_from_checkpoint(tmp_path / "model.pt", num_classes=21)
    ckpt = load_checkpoint(tmp_path / "model.pt")
    ckpt["preset"] = "synth-teacher"  # weights of one preset labelled as another
    atomic_save(ckpt, tmp_path / "mislabelled.pt")
    with pytest.raises(ValueError, match="does not fit preset 'synth-teacher'"):
        model_from_checkpoint(tmp_path / "mislabelled.pt")


def test_truncated_checkpoint_is_skipped_on_resume(tmp_path):
    cfg = tiny(steps=6, ckpt_every=3)
    build_trainer(cfg, tmp_path, progress=False, callbacks=[stop_at(4)])
    with pytest.raises(Stop):
        build_trainer(cfg, tmp_path, progress=False, callbacks=[stop_at(4)]).fit()
    good = tmp_path / "ckpt-0000003.pt"
    bad = tmp_path / "ckpt-0000005.pt"
    bad.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="unreadable"):
        load_checkpoint(bad)
    trainer = build_trainer(cfg, tmp_path, progress=False)
    with pytest.warns(CheckpointWarning, match="skipping ckpt-0000005.pt.*unreadable"):
        assert trainer.resume() and trainer.step == 3


@pytest.mark.parametrize("changes, words", [
    ({"steps": 0}, "steps=0"),
    ({"lr": -1.0}, "lr=-1.0"),
    ({"optimizer": "adam"}, "optimizer='adam'"),
    ({"warmup_steps": 10}, "warmup_steps=10"),
])
def test_bad_config_values_are_named(changes, words):
    with pytest.raises(ValueError, match=words):
        tiny(**changes)


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match=r"unknown config keys \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 0.1})


class Poisoned(Trainer):
    """Feeds NaN images at the given (1-based) steps: the loss of those steps is NaN."""

    poison_steps = (5,)

    def train_step(self, images, masks, *extra):
        if self.step + 1 in self.poison_steps:
            images = images * float("nan")
        return super().train_step(images, masks, *extra)


def strict_records(run_dir):
    """metrics.jsonl as strict JSON: NaN or Infinity in a line fails."""
    def refuse(name):
        raise ValueError(f"non-finite value {name} in metrics.jsonl")
    return [json.loads(line, parse_constant=refuse)
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_nonfinite_loss_stops_before_anything_corrupt_is_written(tmp_path):
    # The loss turns NaN at step 5; the next sync point is the step-6 checkpoint.
    cfg = tiny(steps=8, ckpt_every=3, log_every=4)
    with pytest.raises(NonFiniteLossError) as err:
        build_trainer(cfg, tmp_path, progress=False, trainer_class=Poisoned).fit()
    message = str(err.value)
    assert "not finite at step 5 (loss=nan)" in message
    assert "ckpt-0000003.pt, is clean" in message
    for fix in ("lower the learning rate", "check the data", "--skip-nonfinite"):
        assert fix in message
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["ckpt-0000003.pt"]
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "final.json").exists()
    state = load_checkpoint(tmp_path / "ckpt-0000003.pt")["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert [r["step"] for r in strict_records(tmp_path)] == [4]
    # The fix the message suggests: resume with --skip-nonfinite (allowed to change).
    resumed = build_trainer(cfg.replace(skip_nonfinite=True), tmp_path, progress=False,
                            trainer_class=Poisoned)
    resumed.fit(resume=True)
    records = strict_records(tmp_path)
    assert [(r["step"], r["skipped"]) for r in records if r["kind"] == "train"] == [
        (4, 0), (8, 1)]
    assert json.loads((tmp_path / "config.json").read_text())["skip_nonfinite"] is True


def test_skipped_steps_change_neither_weights_nor_optimizer_state(tmp_path):
    cfg = tiny(steps=5, ckpt_every=0, skip_nonfinite=True)
    trainer = build_trainer(cfg, tmp_path, progress=False, trainer_class=Poisoned)
    trainer.poison_steps = (3, 4)
    states = {}

    def snapshot(record):
        if record["kind"] == "train":
            states[record["step"]] = (
                {k: v.clone() for k, v in trainer.model.state_dict().items()},
                {k: v["momentum_buffer"].clone() for k, v in trainer.optimizer.state.items()})
    trainer.callbacks.append(snapshot)
    trainer.fit()
    for step in (3, 4):  # BatchNorm statistics included: the NaN forward pass is undone
        for key, value in states[2][0].items():
            assert torch.equal(value, states[step][0][key]), (step, key)
        for key, value in states[2][1].items():
            assert torch.equal(value, states[step][1][key]), (step, key)
    assert not torch.equal(states[5][0]["net.segmentation_head.0.weight"],
                           states[2][0]["net.segmentation_head.0.weight"])
    records = [r for r in strict_records(tmp_path) if r["kind"] == "train"]
    assert [r["skipped"] for r in records] == [0, 0, 1, 1, 0]
    assert "loss" not in records[2] and math.isfinite(records[4]["loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nonfinite_watch_costs_no_host_sync_per_step(tmp_path):
    trainer = build_trainer(tiny(device="cuda"), tmp_path, progress=False)
    nan = {"loss": torch.tensor(float("nan"), device="cuda"),
           "task": torch.tensor(1.0, device="cuda")}
    fine = {k: torch.ones((), device="cuda") for k in nan}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # what fit does every step: any host sync here raises
        for step, losses in ((1, fine), (2, nan), (3, nan), (4, fine)):
            trainer.step = step
            trainer._watch_losses(losses)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with pytest.raises(NonFiniteLossError, match=r"step 2 \(loss=nan, task=1\)"):
        trainer.check_finite()


def train_records(run_dir):
    """The train lines of a run's log, without their timing."""
    return [{k: v for k, v in r.items() if k != "s_per_step"} for r in strict_records(run_dir)
            if r["kind"] == "train"]


@pytest.mark.parametrize("log_every, ckpt_every, stop, steps", [(3, 5, 6, 7), (4, 3, 8, 9)])
def test_resume_between_log_lines_logs_what_the_uninterrupted_run_logs(
        tmp_path, log_every, ckpt_every, stop, steps):
    """The partial loss sums travel in the checkpoint: stopped after ckpt-5 with log_every 3,
    the resumed run's step-6 line is the mean of steps 4-6, as the uninterrupted run's."""
    cfg = tiny(steps=steps, log_every=log_every, ckpt_every=ckpt_every, batch_size=2,
               data_kwargs={"size": 64, "length": 8})
    build_trainer(cfg, tmp_path / "straight", progress=False).fit()
    with pytest.raises(Stop):
        build_trainer(cfg, tmp_path / "run", progress=False, callbacks=[stop_at(stop)]).fit()
    newest = checkpoint_paths(tmp_path / "run")[0]
    assert load_checkpoint(newest)["step"] % log_every  # a checkpoint between two log lines
    build_trainer(cfg, tmp_path / "run", progress=False).fit(resume=True)
    assert train_records(tmp_path / "run") == train_records(tmp_path / "straight")


def test_a_checkpoint_without_partial_sums_still_resumes(tmp_path):
    """A checkpoint of an older kdnb (no partial sums, no copy of the log) loads: the first
    line after the resume averages the steps since it, and says so."""
    cfg = tiny(steps=7, log_every=3, ckpt_every=5, batch_size=2,
               data_kwargs={"size": 64, "length": 8})
    with pytest.raises(Stop):
        build_trainer(cfg, tmp_path, progress=False, callbacks=[stop_at(6)]).fit()
    path = tmp_path / "ckpt-0000005.pt"
    old = {k: v for k, v in load_checkpoint(path).items() if k not in ("log_means", "metrics")}
    atomic_save(old, path)
    with pytest.warns(UserWarning, match="without the partial loss sums"):
        build_trainer(cfg, tmp_path, progress=False).fit(resume=True)
    assert [r["step"] for r in train_records(tmp_path)] == [3, 6, 7]


def test_a_label_outside_the_classes_is_named_before_the_first_step(tmp_path):
    """A dataset of one's own whose masks hold a label the model has no class for: the
    batch is refused where it is made, with the value and the fix (on a GPU the loss would
    otherwise fail as a device-side assertion naming nothing), before any step runs."""
    from kdnb.data import build_dataset

    base = build_dataset("synth", split="train", size=64, length=24)

    class OneBadLabel(torch.utils.data.Dataset):
        def __len__(self):
            return len(base)

        def __getitem__(self, key):  # (index, epoch) from the step sampler
            image, mask = base[key[0] if isinstance(key, tuple) else key]
            mask = mask.clone()
            mask[0, 0] = 40
            return image, mask

    trainer = build_trainer(tiny(), tmp_path / "run", train_set=OneBadLabel(), progress=False)
    k = trainer.num_classes
    with pytest.raises(ValueError, match=rf"masks hold labels \[40\] outside \[0, {k}\) that are "
                                         rf"not 255 \(ignore\).*Map the dataset's labels to "
                                         rf"0\.\.{k - 1}"):
        trainer.fit()
    assert trainer.step == 0


def test_checked_collate_passes_classes_and_ignore_and_refuses_the_rest():
    """Every class and 255 pass unchanged (the batch equals collate's, with the index of the
    teacher-cache path too); -1 and K are refused by value; it pickles, so loader workers
    can run it."""
    import pickle

    from kdnb.data import CheckedCollate, collate

    check = pickle.loads(pickle.dumps(CheckedCollate(5)))
    mask = torch.tensor([[0, 1, 2], [3, 4, 255]], dtype=torch.uint8)
    batch = [(torch.rand(3, 2, 3), mask, 7), (torch.rand(3, 2, 3), mask.flip(1), 8)]
    got, want = check(batch), collate(batch)
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))
    for bad in (-1, 5):
        m = torch.zeros(2, 3, dtype=torch.long)
        m[1, 2] = bad
        with pytest.raises(ValueError, match=rf"masks hold labels \[{bad}\] outside \[0, 5\)"):
            check([(torch.rand(3, 2, 3), m)])
