"""`kdnb compare` at matched compute: the compute ratio, the 1.05 rule, missing baselines."""
import json
import shlex

import pytest

from kdnb.cli import build_parser, config_from_args, main
from kdnb.compare import compare, format_table, matched_steps, read_run

GFLOP = 1e9


def fake_run(root, name, methods, seed, miou, *, steps=100, flops=None, cache=0):
    """A finished run directory: config.json, final.json and, with ``flops``, cost.json."""
    run = root / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps(
        {"model": "synth-student", "methods": methods, "seed": seed, "steps": steps,
         "teacher": "teacher.pt" if methods else None}))
    (run / "final.json").write_text(json.dumps({"split": "val", "miou": miou}))
    if flops is not None:
        (run / "cost.json").write_text(json.dumps(
            {"steps": steps, "flops_per_step": flops, "teacher_cache_flops": cache}))
    return run


@pytest.fixture
def runs(tmp_path):
    """Two seeds of: the baseline (10 GFLOP a step) at 100 and at 150 steps; kd (r = 1.02);
    mse (r = 1.5, its baseline at 150 steps exists); nfd (r = 1.1 through its teacher
    cache: 100 GFLOP over 100 steps; no baseline at 110 steps); cwd (no cost.json)."""
    made = []
    for seed, (base, longer, kd, mse, nfd, cwd) in enumerate(
            [(0.30, 0.31, 0.32, 0.33, 0.31, 0.30), (0.34, 0.36, 0.35, 0.37, 0.36, 0.35)]):
        made += [fake_run(tmp_path, f"baseline-s{seed}", {}, seed, base, flops=10 * GFLOP),
                 fake_run(tmp_path, f"baseline-x1.50-s{seed}", {}, seed, longer, steps=150,
                          flops=10 * GFLOP),
                 fake_run(tmp_path, f"kd-s{seed}", {"kd": 1.0}, seed, kd, flops=10.2 * GFLOP),
                 fake_run(tmp_path, f"mse-s{seed}", {"mse": 1.0}, seed, mse, flops=15 * GFLOP),
                 fake_run(tmp_path, f"nfd-s{seed}", {"nfd": 1.0}, seed, nfd, flops=10 * GFLOP,
                          cache=100 * GFLOP),
                 fake_run(tmp_path, f"cwd-s{seed}", {"cwd": 1.0}, seed, cwd)]
    return made


def test_compute_ratio_and_gain_at_matched_compute(runs):
    summaries = {(s["methods"], s["steps"]): s for s in compare([read_run(r) for r in runs])}
    assert set(summaries) == {("baseline", 100), ("baseline", 150), ("kd", 100), ("mse", 100),
                              ("nfd", 100), ("cwd", 100)}
    mse = summaries["mse", 100]
    assert mse["ratio"] == pytest.approx(1.5) and mse["matched_steps"] == 150
    assert mse["gain"] == pytest.approx(3.0)  # over the baseline of the same steps
    assert mse["matched_gain"] == pytest.approx(1.5)  # over the one trained 150 steps
    assert mse["matched_gain_std"] == pytest.approx(0.7071, abs=1e-4)
    kd = summaries["kd", 100]  # r <= 1.05: the iteration-matched baseline serves
    assert kd["ratio"] == pytest.approx(1.02) and kd["matched_by_iterations"]
    assert kd["matched_steps"] == 100 and kd["matched_gain"] == pytest.approx(kd["gain"])
    nfd = summaries["nfd", 100]  # the teacher cache spread over the steps: 10 + 100 / 100
    assert nfd["ratio"] == pytest.approx(1.1) and nfd["matched_steps"] == 110
    assert nfd["matched_gain"] is None and len(nfd["matched_missing"]) == 2
    cwd = summaries["cwd", 100]
    assert cwd["ratio"] is None and cwd["gain"] == pytest.approx(0.5)
    assert summaries["baseline", 150]["gain"] is None  # a baseline, not a method
    # r rounded up to a multiple of 0.05: never less compute than the method, and methods
    # of about the same cost share one baseline
    assert matched_steps(1200, 1.1049) == matched_steps(1200, 1.12) == 1380
    assert matched_steps(1200, 1.10) == 1320 and matched_steps(100, 1.5) == 150


def test_the_table_marks_the_1_05_rule_and_prints_the_missing_baselines_command(runs, capsys,
                                                                               tmp_path):
    assert main(["compare", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    assert head == ("| student | methods | steps | seeds | mIoU | std | gain (paired) | gain std | "
                    "r | gain at matched compute | matched gain std | % of gap |")
    rows = {tuple(c.strip() for c in line.split("|")[2:4]): line for line in out.splitlines()
            if line.startswith("| synth-student")}
    assert "| 1.02* | +1.50 | 0.71 |" in rows["kd", "100"]
    assert "| 1.50 | +1.50 | 0.71 |" in rows["mse", "100"] and "| +3.00 |" in rows["mse", "100"]
    assert "| 1.10 | - | - |" in rows["nfd", "100"]
    assert "| - | - | - |" in rows["cwd", "100"]
    assert "*: r <= 1.05" in out and "r is missing for cwd" in out
    assert "No compute-matched baseline for nfd (r up to 1.10): train the baseline 110 steps" in out
    commands = [line.strip() for line in out.splitlines() if line.strip().startswith("kdnb train")]
    assert len(commands) == 2  # one per seed
    # each command trains the baseline's own recipe and seed, 110 steps, in a new folder
    for seed, command in enumerate(commands):
        args = build_parser().parse_args(shlex.split(command)[1:])
        cfg = config_from_args(args)
        assert (cfg.steps, cfg.seed, cfg.methods, args.run_dir) == (
            110, seed, {}, str(tmp_path / f"baseline-x1.10-s{seed}"))


def test_a_gain_over_fewer_seeds_than_its_row_says_how_many(runs, capsys):
    """A compute-matched baseline trained for one seed of two: the matched gain is over
    that seed alone, and the table says so; the full rows stay as they were."""
    import shutil

    shutil.rmtree(next(r for r in runs if r.name == "baseline-x1.50-s1"))
    kept = [r for r in runs if r.is_dir()]
    mse = next(s for s in compare([read_run(r) for r in kept]) if s["methods"] == "mse")
    assert mse["matched_seeds"] == 1 and mse["matched_gain"] == pytest.approx(2.0)
    assert main(["compare", *map(str, kept)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): line for line in out.splitlines()
            if line.startswith("| synth-student")}
    assert "| 1.50 | +2.00 (1 of 2 seeds) |" in rows["mse"]
    assert "| 1.02* | +1.50 | 0.71 |" in rows["kd"]  # both seeds: no count
    # the footnote trains the missing seed's baseline only
    commands = [line.split() for line in out.splitlines() if "kdnb train" in line and "x1.50" in line]
    assert [c[-1] for c in commands] == [str(kept[0].parent / "baseline-x1.50-s1")], out


def test_without_cost_files_the_table_is_the_iteration_matched_one(tmp_path):
    """Runs from before kdnb recorded cost (and the notebooks' rows) get the table as it was."""
    runs = [fake_run(tmp_path, f"b{s}", {}, s, m) for s, m in ((0, 0.30), (1, 0.34))]
    runs += [fake_run(tmp_path, f"k{s}", {"kd": 1.0}, s, m) for s, m in ((0, 0.32), (1, 0.35))]
    table = format_table(compare([read_run(r) for r in runs]))
    assert table.splitlines()[0] == ("| student | methods | seeds | mIoU | std | gain (paired) | "
                                     "gain std | % of gap |")
    assert "r:" not in table
    forced = format_table(compare([read_run(r) for r in runs]), matched_compute=True)
    assert "r is missing for kd" in forced


def test_a_damaged_cost_file_is_named(tmp_path):
    run = fake_run(tmp_path, "b0", {}, 0, 0.3, flops=GFLOP)
    (run / "cost.json").write_text('{"flops_per_step": ')  # edited by hand (kdnb writes it whole)
    with pytest.raises(ValueError, match=r"b0/cost.json is not valid JSON .*delete it"):
        read_run(run)
