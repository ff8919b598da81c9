"""Plots: LiveCurves draws every run in its own colour; no plot touches global state."""
import matplotlib
import torch

from kdnb.viz import LiveCurves, method_colors


def _records(loss: float, terms: dict) -> list[dict]:
    return [{"kind": "train", "step": s, "loss": loss + 1, "task": loss / s, **terms}
            for s in (1, 2, 3)] + [{"kind": "eval", "step": 3, "miou": 0.3}]


def test_live_curves_draw_every_run_in_a_colour_of_its_method():
    names = ["baseline", "kd", "mse", "cwd", "nfd", "nfd+fakd", "kd+fakd", "mse-stage2",
             "nfd-stage2", "nfd-stage2+fakd", "mse-stage2+fakd"]
    colors = method_colors(names)
    assert len(set(colors.values())) == len(names)  # eleven methods, eleven colours
    live = LiveCurves(total_runs=2 * len(names), show=False)
    for seed in (0, 1):
        for name in names:
            live.start(name, seed)
            terms = {} if name == "baseline" else {name.split("-")[0].split("+")[0]: 0.5}
            for record in _records(1.0 + seed, terms):
                live(record)
    live.draw()
    task, terms, miou = live.axes
    assert len(task.lines) == len(miou.lines) == 2 * len(names)  # every run has its line
    assert len(terms.lines) == 2 * (len(names) - 1)  # the baseline has no term
    drawn = {line.get_label(): line.get_color() for line in miou.lines
             if not line.get_label().startswith("_")}
    assert set(drawn) == set(names)  # one legend entry per method
    assert len({matplotlib.colors.to_hex(c) for c in drawn.values()}) == len(names)
    assert "run 22/22: mse-stage2+fakd, seed 1" in live.fig.get_suptitle()


def test_live_curves_replay_a_finished_run(tmp_path):
    import json

    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in _records(2.0, {"kd": 0.1})) + "\n")
    live = LiveCurves(show=False)
    live.start("kd")
    assert live.replay(tmp_path) and len(live.records["kd", 0]) == 4
    live.start("baseline")
    assert not live.replay(tmp_path / "elsewhere")


def test_write_predictions_leaves_backend_and_generators_alone(tmp_path):
    from kdnb.data import SynthScenes
    from kdnb.demo import write_predictions
    from kdnb.models import build_model

    torch.manual_seed(123)
    backend = matplotlib.get_backend()
    model = build_model("synth-student", SynthScenes.num_classes)
    state = torch.get_rng_state()
    write_predictions({"student": model}, SynthScenes("test", size=64, length=2),
                      tmp_path / "p.png", rows=2)
    assert (tmp_path / "p.png").stat().st_size > 0
    assert matplotlib.get_backend() == backend
    assert torch.equal(torch.get_rng_state(), state)


def test_a_model_from_the_cache_replays_its_curves_from_another_run_directory(tmp_path,
                                                                               monkeypatch):
    """A notebook that loads a model another notebook trained (another run directory)
    replays its log from the cache: every run in the live plot has its lines."""
    from kdnb.experiments import cache_log, student_config, train_or_load
    from kdnb.viz import LiveCurves

    monkeypatch.setenv("KDNB_DATA", str(tmp_path / "data"))
    cfg = student_config({}, quick=True, steps=4, log_every=1)
    train_or_load(cfg, tmp_path / "02" / "baseline", progress=False)
    assert cache_log(cfg).read_text() == (tmp_path / "02" / "baseline" / "metrics.jsonl").read_text()
    live = LiveCurves(total_runs=1, show=False)
    live.start("baseline", 0)
    _, reused = train_or_load(cfg, tmp_path / "03" / "baseline", progress=False, callbacks=[live])
    assert reused and not (tmp_path / "03" / "baseline").exists()
    assert not live.replay(tmp_path / "03" / "baseline")  # what notebook 03 did: no log there
    assert live.replay(cache_log(cfg))
    assert all(line.get_xdata().size for line in live.axes[0].get_lines())
    assert [line.get_label() for line in live.axes[0].get_lines()] == ["baseline"]
