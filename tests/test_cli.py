"""The kdnb command: listing, clear errors, and the demo end to end in quick mode."""
import json
import re
import time

import pytest

from kdnb.cli import main


def test_presets_and_datasets_list(capsys, tmp_path):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "synth-teacher" in out and "deeplabv3-r101" in out
    assert main(["datasets", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "synth" in out
    for name in ("voc", "cityscapes", "ade20k", "camvid"):
        assert name in out
    assert "missing" in out  # nothing is in an empty root


def test_unknown_preset_exits_2_and_lists_choices(capsys, tmp_path):
    code = main(["train", "--model", "unet-r50", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown model preset 'unet-r50'" in err and "synth-student" in err


def test_unknown_dataset_exits_2_and_lists_choices(capsys, tmp_path):
    code = main(["train", "--data", "coco", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown dataset 'coco'" in err and "cityscapes" in err


def test_missing_dataset_says_where_it_looked(capsys, tmp_path):
    code = main(["train", "--data", "cityscapes", "--model", "deeplabv3-r18",
                 "--root", str(tmp_path), "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path) in err and "cityscapes-dataset.com" in err


def test_missing_checkpoint_is_named(capsys, tmp_path):
    code = main(["eval", "--ckpt", str(tmp_path / "nope.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "nope.pt does not exist" in err


def test_train_then_eval(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--model", "synth-student", "--size", "64", "--steps", "2",
                 "--batch-size", "2", "--eval-every", "0", "--data-arg", "length=16",
                 "--run-dir", str(run)]) == 0
    assert "mIoU" in capsys.readouterr().out
    assert main(["eval", "--ckpt", str(run / "model.pt"), "--split", "test",
                 "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "synth-student on synth test" in out
    assert json.loads((tmp_path / "e.json").read_text())["split"] == "test"


def test_data_and_model_args_reach_the_config():
    """--data-arg and --model-arg set dataset and smp options on top of a recipe; a
    recipe's SynthScenes options are dropped when another dataset is chosen."""
    from kdnb.cli import build_parser, config_from_args
    from kdnb.config import get_recipe

    def config(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv]))

    recipe = get_recipe("synth-teacher")
    cfg = config("--recipe", "synth-teacher", "--data-arg", "unlabelled=0",
                 "--data-arg", "train_length=1000", "--model-arg", "decoder_dropout=0.1")
    assert cfg.data_kwargs == {**recipe.data_kwargs, "unlabelled": 0, "train_length": 1000}
    assert isinstance(cfg.data_kwargs["train_length"], int)
    assert cfg.model_kwargs == {"decoder_dropout": 0.1}
    assert config("--recipe", "synth-teacher").data_kwargs == recipe.data_kwargs
    assert config("--recipe", "synth-teacher", "--data", "voc").data_kwargs == {}
    with pytest.raises(ValueError, match="--data-arg 'unlabelled': expected KEY=VALUE"):
        config("--data-arg", "unlabelled")
    with pytest.raises(ValueError, match="--data-arg .=3.: expected KEY=VALUE"):
        config("--data-arg", "=3")


def test_demo_quick_end_to_end(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KDNB_DATA", str(tmp_path / "data"))
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "student" in out and "mIoU" in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["models"]) == {"teacher", "baseline", "kd", "nfd-stage2", "nfd-stage2+fakd"}
    assert "% of gap" in out
    # After the first log line of the teacher, then of the first student: the expected time
    # from the measured rate and the recipes' step counts.
    rate = r"at \d+\.\d steps/s{}, the demo takes about \d+ (s|minutes) \(teacher 12 steps, "
    assert re.search("^" + rate.format("") + r"students 4 x 12 steps counted at the teacher's "
                     r"rate\)$", out, re.MULTILINE), out
    assert re.search("^" + rate.format(" for the students") + r"students 4 x 12 steps\)$", out,
                     re.MULTILINE), out
    assert out.index("the demo takes about") < out.index("teacher: synth-teacher")
    assert (tmp_path / "demo" / "predictions.png").stat().st_size > 1000
    cached = list((tmp_path / "data" / "checkpoints").glob("*.pt"))
    assert len(cached) == 5
    # The students are paired: the same initial weights, so the distilled ones differ
    # from the baseline only through their losses.
    from kdnb.experiments import COMPARISON
    assert summary["models"]["kd"]["methods"] == COMPARISON["kd"]
    # A second run reuses the cached models instead of training again.
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo2"),
                 "--methods", "baseline,kd"]) == 0
    out = capsys.readouterr().out
    assert out.count("loaded from cache") == 3 and "the demo takes about" not in out


def test_demo_budgets_the_default_one_short_and_the_full_one_shared_with_the_notebooks():
    """make demo trains a teacher of its own (600 steps, cosine to the end, one
    evaluation), kdnb demo --full the teacher the notebooks and benchmarks share."""
    from kdnb.demo import DEMO_STUDENT_STEPS, DEMO_TEACHER_STEPS, FULL_STUDENT_STEPS, demo_configs
    from kdnb.experiments import cache_path, teacher_config

    short, full = demo_configs(), demo_configs(full=True)
    shared = teacher_config()
    assert short["teacher"] == shared.replace(steps=DEMO_TEACHER_STEPS, eval_every=0)
    assert DEMO_TEACHER_STEPS < shared.steps and cache_path(short["teacher"]) != cache_path(shared)
    assert full["teacher"] == shared
    for configs, steps in ((short, DEMO_STUDENT_STEPS), (full, FULL_STUDENT_STEPS)):
        students = [c for role, c in configs.items() if role != "teacher"]
        assert len(students) == 4 and {c.steps for c in students} == {steps}
        assert {c.teacher for c in students if c.methods} == {str(cache_path(configs["teacher"]))}
    assert demo_configs(("baseline",), student_steps=7)["baseline"].steps == 7
    with pytest.raises(ValueError, match="choose among"):
        demo_configs(("baseline", "crd"))


def test_demo_command_passes_the_budget_on(monkeypatch):
    import kdnb.demo

    calls = []
    monkeypatch.setattr(kdnb.demo, "run_demo", lambda **kwargs: calls.append(kwargs))
    assert main(["demo", "--full", "--out", "x"]) == 0 and main(["demo"]) == 0
    assert [c["full"] for c in calls] == [True, False] and calls[0]["student_steps"] is None


def test_demo_clock_counts_the_steps_left_at_the_rate_measured():
    from kdnb.demo import DemoClock

    clock = DemoClock({"baseline": 500, "kd": 500}, ["teacher", "nfd"], time.perf_counter() - 30)
    # 475 + 500 steps at 5 steps/s after 30 s: 225 s
    assert clock.line("baseline", 25, 5.0) == ("at 5.0 steps/s, the demo takes about 4 minutes "
                                               "(teacher from the cache, students 2 x 500 steps, "
                                               "1 more from the cache)")
    clock = DemoClock({"teacher": 1800, "baseline": 500}, [], time.perf_counter())
    assert clock.line("teacher", 25, 10.0).startswith("at 10.0 steps/s, the demo takes about 4 "
                                                     "minutes (teacher 1800 steps, students 1 x "
                                                     "500 steps counted at the teacher's rate)")
    assert DemoClock({"teacher": 12}, ["kd"], time.perf_counter()).line("teacher", 3, 9.0) == (
        "at 9.0 steps/s, the demo takes about 1 s (teacher 12 steps, students from the cache)")


def test_demo_run_left_by_other_settings_is_set_aside_and_comes_back(capsys, tmp_path,
                                                                    monkeypatch):
    """After a recipe or COMPARISON change the demo trains the new settings instead of
    refusing the old run directory, and keeps that run: returning to it resumes it."""
    from kdnb.experiments import student_config, train_or_load
    from kdnb.config import config_hash

    monkeypatch.setenv("KDNB_DATA", str(tmp_path / "data"))
    run_dir = tmp_path / "demo" / "baseline"
    old = student_config({}, quick=True, steps=6, ckpt_every=3)
    new = student_config({}, quick=True, steps=4)
    train_or_load(old, run_dir, progress=False)
    (tmp_path / "data" / "checkpoints").joinpath(f"{old.model}-{config_hash(old)}.pt").unlink()
    trained_old = (run_dir / "metrics.jsonl").read_text()
    train_or_load(new, run_dir, progress=False)
    out = capsys.readouterr().out
    asides = [p for p in (tmp_path / "demo").iterdir() if p.name.startswith("baseline-")]
    assert len(asides) == 1 and f"moved to {asides[0]}" in out
    aside = asides[0]
    assert json.loads((run_dir / "config.json").read_text())["steps"] == 4
    assert json.loads((aside / "config.json").read_text())["steps"] == 6
    assert (aside / "model.pt").is_file()
    train_or_load(old, run_dir, progress=False)  # the old settings again: their run returns
    out = capsys.readouterr().out
    assert f"resuming the run set aside in {aside}" in out
    assert json.loads((run_dir / "config.json").read_text())["steps"] == 6
    assert (run_dir / "metrics.jsonl").read_text() == trained_old  # resumed, nothing retrained
    assert len([p for p in (tmp_path / "demo").iterdir() if p.name.startswith("baseline-")]) == 1
    # Settings outside the weights' hash (how often it logs; the teacher's folder) are
    # other settings to a resume too: the demo sets the run aside instead of refusing it.
    moved = student_config({}, quick=True, steps=6, ckpt_every=3, log_every=1)
    assert config_hash(moved) == config_hash(old)
    (tmp_path / "data" / "checkpoints").joinpath(f"{old.model}-{config_hash(old)}.pt").unlink()
    train_or_load(moved, run_dir, progress=False)
    assert "moved to" in capsys.readouterr().out


def test_demo_refuses_an_unknown_method(capsys, tmp_path):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"),
                 "--methods", "baseline,nope"]) == 2
    assert "choose among" in capsys.readouterr().err


def test_every_full_scale_config_loads_and_flags_override(tmp_path):
    from pathlib import Path

    from kdnb.cli import build_parser, config_from_args

    files = sorted(str(p) for p in (Path(__file__).parents[1] / "configs").glob("*.json"))
    assert len(files) == 12
    for path in files:
        args = build_parser().parse_args(["train", "--config", path, "--steps", "7"])
        cfg = config_from_args(args)
        assert cfg.steps == 7 and cfg.batch_size == 16 and cfg.optimizer == "sgd"
        assert cfg.data in ("cityscapes", "voc", "ade20k") and cfg.crop_size is not None


def test_missing_config_file_is_named(capsys, tmp_path):
    assert main(["train", "--config", str(tmp_path / "nope.json")]) == 2
    assert "nope.json does not exist" in capsys.readouterr().err
