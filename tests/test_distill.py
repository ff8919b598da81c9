"""Distillation training: method specs, frozen teacher, adapters and FAKD state, resume."""
import dataclasses
import math

import pytest
import torch

from kdnb.build import build_trainer
from kdnb.config import TrainConfig
from kdnb.losses import parse_methods, resolve_methods
from kdnb.models import PRESETS


def tiny(**changes) -> TrainConfig:
    base = dict(model="synth-student", data="synth", data_kwargs={"size": 64, "length": 16},
                steps=4, batch_size=4, optimizer="sgd", lr=0.02, eval_every=0, ckpt_every=2,
                log_every=1, eval_batch_size=8, seed=0)
    base.update(changes)
    return TrainConfig(**base)


@pytest.fixture(scope="module", autouse=True)
def wide_teacher_preset():
    """A small teacher whose head has 64 channels (the student's has 32): adapters are needed."""
    base = PRESETS["synth-student"]
    spec = dataclasses.replace(base, kwargs={**base.kwargs, "decoder_segmentation_channels": 64})
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "tiny-teacher", spec)
        yield


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")
    build_trainer(tiny(model="tiny-teacher", steps=2, seed=5), run, progress=False).fit()
    return str(run / "model.pt")


def test_resolve_methods_folds_fakd_into_its_base():
    assert resolve_methods({"kd": 2.0, "fakd": {"lambda_0": 5}}) == {
        "fakd": {"weight": 2.0, "on": "logits", "keep_ignored": True, "lambda_0": 5}}
    # KD that leaves out unlabelled pixels passes that on; fakd's own options win.
    assert resolve_methods({"kd": {"ignore_index": 255}, "fakd": {}})["fakd"]["keep_ignored"] is False
    assert resolve_methods({"kd": 1, "fakd": {"keep_ignored": False}})["fakd"]["keep_ignored"] is False
    assert resolve_methods({"kd": {"temperature": 2.0}, "fakd": None})["fakd"]["temperature"] == 2.0
    spec = resolve_methods({"cwd": 3.0, "nfd": {"weight": 1.5}, "fakd": {}})
    assert spec["cwd"] == {"weight": 3.0} and spec["fakd"]["on"] == "nfd"
    assert spec["fakd"]["weight"] == 1.5 and "nfd" not in spec
    assert resolve_methods({"kd": 1.0, "mse": 1.0, "fakd": {"on": "feats"}})["fakd"]["on"] == "feats"


@pytest.mark.parametrize("kd_options", [{}, {"ignore_index": 255}])
def test_kd_plus_fakd_at_lambda_0_is_the_kd_it_replaces_on_unlabelled_pixels(kd_options):
    """FAKD is an add-on: folded into KD, its bound at lambda = 0 is the KD loss of the same
    options on the same pixels, also where masks are partly unlabelled (255), as in the
    SynthScenes recipes. (It once dropped KD's unlabelled pixels: KD+FAKD then lost what
    KD gains there.)"""
    from kdnb.losses import build_losses

    torch.manual_seed(0)
    kd = {"weight": 1.0, "temperature": 2.0, **kd_options}
    plain = build_losses({"kd": dict(kd)}, student_channels=8, teacher_channels=8, num_classes=5)
    folded = build_losses(resolve_methods({"kd": dict(kd), "fakd": {"lambda_0": 0.0}}),
                          student_channels=8, teacher_channels=8, num_classes=5)
    feats = torch.randn(2, 8, 6, 6)
    classifier = torch.nn.Conv2d(8, 5, 1)
    student = {"feats": feats, "logits": classifier(feats), "classifier_weight": classifier.weight}
    teacher = {"logits": torch.randn(2, 5, 6, 6), "feats": torch.randn(2, 8, 6, 6)}
    masks = torch.randint(0, 5, (2, 12, 12))
    masks[:, :6] = 255  # half of every image unlabelled
    value = folded["fakd"](student, teacher, masks)
    assert torch.allclose(value, plain["kd"](student, teacher, masks), atol=1e-6)
    assert not torch.allclose(value, build_losses(
        {"kd": {**kd, "ignore_index": None if kd_options else 255}}, student_channels=8,
        teacher_channels=8, num_classes=5)["kd"](student, teacher, masks), atol=1e-4)


@pytest.mark.parametrize("methods, words", [
    ({"fakd": {}}, "add one of kd, nfd or mse"),
    ({"kd": 1, "nfd": 1, "fakd": {}}, "choose with fakd's option"),
    ({"nfd": {"norm": "spatial"}, "fakd": {}}, "channel normalization only"),
    ({"kd": 1, "fakd": {"on": "nfd"}}, "needs its base loss"),
])
def test_resolve_methods_errors(methods, words):
    with pytest.raises(ValueError, match=words):
        resolve_methods(methods)


def test_parse_methods():
    assert parse_methods("kd=1,nfd=2,fakd", ["nfd.norm=channel", "fakd.lambda_0=5"]) == {
        "kd": {"weight": 1.0}, "nfd": {"weight": 2.0, "norm": "channel"},
        "fakd": {"lambda_0": 5.0}}
    with pytest.raises(ValueError, match="not in --methods"):
        parse_methods("kd", ["nfd.norm=spatial"])
    with pytest.raises(ValueError, match="METHOD.OPTION=VALUE"):
        parse_methods("kd", ["nfd=spatial"])


@pytest.mark.parametrize("methods", [
    {"kd": 1.0}, {"nfd": 1.0}, {"mse": 1.0}, {"cwd": 3.0}, {"at": 1.0}, {"dist": 1.0},
    {"skd": 10.0}, {"ifvd": 20.0}, {"kd": 1.0, "fakd": {}}, {"nfd": 1.0, "fakd": {"lambda_0": 1.0}},
    {"kd": 1.0, "cirkd": {"pixel_memory_size": 64, "region_memory_size": 8}},
])
def test_every_method_trains_and_the_teacher_stays_frozen(tmp_path, teacher_ckpt, methods):
    trainer = build_trainer(tiny(teacher=teacher_ckpt, methods=methods, steps=2, ckpt_every=0),
                             tmp_path, progress=False)
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    records = []
    trainer.callbacks.append(records.append)
    trainer.fit()
    train = [r for r in records if r["kind"] == "train"]
    names = set(resolve_methods(methods))
    assert names <= set(train[-1]) and "task" in train[-1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    after = trainer.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats too: eval mode
    assert not trainer.teacher.training


def test_a_run_seeds_cirkd_with_its_own_seed(tmp_path, teacher_ckpt):
    cirkd = {"cirkd": {"pixel_memory_size": 64, "region_memory_size": 8}}
    trainer = build_trainer(tiny(teacher=teacher_ckpt, methods=cirkd, seed=5), tmp_path,
                            progress=False)
    assert trainer.losses["cirkd"].seed == 5


@pytest.mark.parametrize("methods, kept", [
    ({"nfd": 1.0, "fakd": {"lambda_0": 2.0}}, ("adapter", "feat_sum")),  # FAKD's statistics
    ({"cirkd": {"pixel_memory_size": 64, "region_memory_size": 8}},      # CIRKD's memories
     ("projector", "pixel_queue")),
])
def test_resume_is_exact_with_adapters_and_loss_state(tmp_path, teacher_ckpt, methods, kept):
    cfg = tiny(teacher=teacher_ckpt, methods=methods, steps=4)
    straight = build_trainer(cfg, tmp_path / "a", progress=False)
    straight.fit()

    class Stop(Exception):
        pass

    def stop(record):
        if record["kind"] == "train" and record["step"] == 3:
            raise Stop

    broken = build_trainer(cfg, tmp_path / "b", progress=False, callbacks=[stop])
    with pytest.raises(Stop):
        broken.fit()
    resumed = build_trainer(cfg, tmp_path / "b", progress=False)
    resumed.fit(resume=True)
    for a, b in ((straight.model, resumed.model), (straight.losses, resumed.losses)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    for name in kept:
        assert any(name in k for k in straight.losses.state_dict()), name


def test_teacher_with_other_class_count_is_refused(tmp_path):
    run = tmp_path / "t"
    build_trainer(tiny(steps=1, ckpt_every=0), run, progress=False).fit()
    ckpt = torch.load(run / "model.pt", weights_only=True)
    ckpt["num_classes"] = 21
    torch.save(ckpt, run / "other.pt")
    with pytest.raises(ValueError, match="predicts 21 classes but the dataset has 9"):
        build_trainer(tiny(teacher=str(run / "other.pt"), methods={"kd": 1.0}), tmp_path / "s",
                       progress=False)


def test_unknown_method_is_refused(tmp_path, teacher_ckpt):
    with pytest.raises(ValueError, match="unknown distillation method 'crd'"):
        build_trainer(tiny(teacher=teacher_ckpt, methods={"crd": 1.0}), tmp_path, progress=False)


def test_methods_without_teacher_are_refused():
    with pytest.raises(ValueError, match="need a teacher"):
        tiny(methods={"kd": 1.0})


def test_fakd_with_a_3x3_head_is_refused(tmp_path, teacher_ckpt, monkeypatch):
    spec = dataclasses.replace(PRESETS["synth-student"], head_kernel=3)
    monkeypatch.setitem(PRESETS, "student-3x3", spec)
    cfg = tiny(model="student-3x3", teacher=teacher_ckpt, methods={"kd": 1.0, "fakd": {}})
    with pytest.raises(ValueError, match="linear on each position"):
        build_trainer(cfg, tmp_path, progress=False)


def _fake_run(root, name, methods, seed, miou, split="val", teacher=None):
    run = root / name
    run.mkdir()
    (run / "config.json").write_text(__import__("json").dumps(
        {"model": "synth-student", "methods": methods, "seed": seed, "teacher": teacher}))
    (run / "final.json").write_text(__import__("json").dumps({"split": split, "miou": miou}))
    return run


def test_compare_pairs_seeds_and_reports_the_gap_share(tmp_path, capsys):
    from kdnb.cli import main
    from kdnb.compare import compare, read_run

    runs = [_fake_run(tmp_path, f"b{s}", {}, s, m) for s, m in ((0, 0.30), (1, 0.34), (2, 0.32))]
    runs += [_fake_run(tmp_path, f"k{s}", {"kd": 1.0}, s, m)
             for s, m in ((0, 0.32), (1, 0.36), (2, 0.34))]
    summaries = compare([read_run(r) for r in runs], teacher_miou=52.0)
    base, kd = summaries
    assert base["methods"] == "baseline" and kd["methods"] == "kd"
    assert kd["gain"] == pytest.approx(2.0) and kd["gain_std"] == pytest.approx(0.0, abs=1e-9)
    assert base["std"] == pytest.approx(2.0)  # seed spread, much larger than the paired one
    assert kd["gap_share"] == pytest.approx(100 * 2.0 / (52.0 - 32.0))
    assert main(["compare", *map(str, runs), "--teacher-miou", "52"]) == 0
    assert "+2.00" in capsys.readouterr().out


def test_compare_without_the_split_says_how_to_get_it(tmp_path):
    from kdnb.compare import read_run

    run = _fake_run(tmp_path, "r", {}, 0, 0.3, split="val")
    with pytest.raises(FileNotFoundError, match="kdnb eval"):
        read_run(run, "test")


def test_compare_reads_the_latest_evaluation_of_the_split(tmp_path):
    """<split>.json written by `kdnb eval` after training wins over final.json; a run
    retrained after that (a newer final.json) is read from its new final.json."""
    import json
    import os

    from kdnb.compare import read_run

    run = _fake_run(tmp_path, "r", {}, 0, 0.30, split="val")
    (run / "val.json").write_text(json.dumps({"split": "val", "miou": 0.35, "iou": [0.35]}))
    os.utime(run / "final.json", (1_000_000, 1_000_000))
    assert read_run(run, "val")["miou"] == pytest.approx(35.0)
    os.utime(run / "val.json", (500_000, 500_000))  # the run was trained again since
    assert read_run(run, "val")["miou"] == pytest.approx(30.0)
    (run / "test.json").write_text(json.dumps({"split": "test", "miou": 0.2, "iou": [0.2]}))
    assert read_run(run, "test")["miou"] == pytest.approx(20.0)  # final.json holds val only


def test_cached_teacher_outputs_equal_the_live_ones(tmp_path, teacher_ckpt):
    """With a fixed pool the teacher's outputs are computed once: they equal a live forward
    (to float tolerance: batch size changes the summation order), and so does the loss."""
    from kdnb.features import forward_with_head

    cfg = tiny(teacher=teacher_ckpt, methods={"kd": 1.0, "nfd": 1.0}, steps=1, flip=False,
               ckpt_every=0)
    cached = build_trainer(cfg.replace(cache_teacher=True), tmp_path / "cached", progress=False)
    cache = cached.teacher_cache
    assert cache["feats"].shape == (16, 64, 16, 16) and cache["logits"].shape == (16, 9, 16, 16)
    images = torch.stack([cached.train_set.dataset[i][0] for i in (3, 7, 11)])
    with torch.inference_mode():
        _, feats, logits = forward_with_head(cached.teacher, images)
    assert torch.allclose(cache["feats"][[3, 7, 11]], feats, atol=1e-5)
    assert torch.allclose(cache["logits"][[3, 7, 11]], logits, atol=1e-5)
    first = {}
    for name, trainer in (("cached", cached),
                          ("live", build_trainer(cfg, tmp_path / "live", progress=False))):
        trainer.callbacks.append(lambda r, name=name: first.setdefault(name, r))
        trainer.fit()
    for key in ("task", "kd", "nfd"):
        assert first["cached"][key] == pytest.approx(first["live"][key], rel=1e-5), key


def test_students_of_one_comparison_share_the_teacher_outputs(tmp_path, teacher_ckpt):
    """A second student with the same teacher file and pool reuses the outputs (make demo
    trains three in a row); another pool or a rewritten teacher computes them again."""
    from kdnb.distill import TeacherOutputs

    shared = TeacherOutputs()
    cfg = tiny(teacher=teacher_ckpt, methods={"kd": 1.0}, steps=1, flip=False, ckpt_every=0,
               cache_teacher=True)
    first = build_trainer(cfg, tmp_path / "a", progress=False,
                  teacher_outputs=shared).teacher_cache
    second = build_trainer(cfg.replace(methods={"nfd": 1.0}, seed=3), tmp_path / "b",
                            progress=False,
                  teacher_outputs=shared).teacher_cache
    assert second["logits"] is first["logits"] and second["feats"] is first["feats"]
    # A student that needs an encoder stage computes them again, with that stage; a student
    # of the head alone then reuses those (a superset), one of another stage does not.
    staged = build_trainer(cfg.replace(methods={"nfd": {"layer": "stage2"}}), tmp_path / "s2",
                            progress=False,
                  teacher_outputs=shared).teacher_cache
    assert set(staged) == {"feats", "logits", "stage2"} and staged["logits"] is not first["logits"]
    head = build_trainer(cfg, tmp_path / "kd", progress=False,
                  teacher_outputs=shared).teacher_cache
    assert set(head) == {"feats", "logits"} and head["logits"] is staged["logits"]
    stage3 = build_trainer(cfg.replace(methods={"mse": {"layer": "stage3"}}), tmp_path / "s3",
                            progress=False,
                  teacher_outputs=shared).teacher_cache
    assert set(stage3) == {"feats", "logits", "stage3"} and stage3["logits"] is not head["logits"]
    other_pool = cfg.replace(data_kwargs={**cfg.data_kwargs, "length": 8})
    third = build_trainer(other_pool, tmp_path / "c", progress=False,
                  teacher_outputs=shared).teacher_cache
    assert third["logits"] is not stage3["logits"] and len(third["logits"]) == 8
    import os
    os.utime(teacher_ckpt, ns=(0, 0))  # the teacher file changed: computed again
    again = build_trainer(other_pool, tmp_path / "d", progress=False,
                  teacher_outputs=shared).teacher_cache
    assert again["logits"] is not third["logits"]


def test_teacher_cache_refuses_random_augmentation(tmp_path, teacher_ckpt):
    cfg = tiny(teacher=teacher_ckpt, methods={"kd": 1.0}, cache_teacher=True)  # flip is on
    with pytest.raises(ValueError, match="fixed training pool"):
        build_trainer(cfg, tmp_path, progress=False)


def test_feature_losses_distil_an_encoder_stage(tmp_path, teacher_ckpt):
    """``layer="stageN"`` distils the encoder's output at stride 2**N: the adapter is sized
    for that stage's channels, the loss reads that map (cached or live, the same value),
    and the student's encoder gets the gradient."""
    from kdnb.features import stage_channels

    methods = {"nfd": {"weight": 1.0, "layer": "stage3"}, "mse": {"weight": 1.0}, "kd": 1.0}
    cfg = tiny(teacher=teacher_ckpt, methods=methods, steps=1, flip=False, ckpt_every=0)
    first = {}
    for name, cache in (("cached", True), ("live", False)):
        trainer = build_trainer(cfg.replace(cache_teacher=cache), tmp_path / name,
                                 progress=False)
        assert trainer.layers == {"nfd": 3, "mse": None, "kd": None} and trainer.stages == [3]
        adapter = trainer.losses["nfd"].adapter
        # MobileNetV2's stage 3 (stride 8) has 32 channels, and so has the tiny teacher's
        # (same encoder): no adapter is needed there, unlike the head (32 -> 64).
        assert stage_channels(trainer.model, 3) == stage_channels(trainer.teacher, 3) == 32
        assert adapter is None
        assert trainer.losses["mse"].adapter is not None
        if cache:
            assert trainer.teacher_cache["stage3"].shape == (16, 32, 8, 8)
        trainer.callbacks.append(lambda r, name=name: first.setdefault(name, r))
        trainer.fit()
    for key in ("task", "kd", "nfd", "mse"):
        assert first["cached"][key] == pytest.approx(first["live"][key], rel=1e-5), key
    # The stage-3 loss differs from the head one: the layer is really another map.
    head = build_trainer(tiny(teacher=teacher_ckpt, methods={"nfd": 1.0}, steps=1,
                               ckpt_every=0), tmp_path / "head", progress=False)
    head.callbacks.append(lambda r: first.setdefault("head", r))
    head.fit()
    assert first["head"]["nfd"] != pytest.approx(first["live"]["nfd"], rel=1e-3)
    assert parse_methods("nfd=2", ["nfd.layer=stage3"]) == {"nfd": {"weight": 2.0,
                                                                    "layer": "stage3"}}
    images = torch.rand(2, 3, 64, 64)
    _, maps = head.model(images, features=True, stages=[2, 4])
    assert maps["stage2"].shape[-1] == 16 and maps["stage4"].shape[-1] == 4


@pytest.mark.parametrize("methods, words", [
    ({"kd": {"layer": "stage3"}}, "reads the logits"),
    ({"nfd": {"layer": "stage9"}}, "unknown layer"),
    ({"nfd": {"layer": "block3"}}, "unknown layer"),
    ({"kd": {"layer": "stage3"}, "fakd": {}}, "reads the logits"),
    ({"nfd": 1.0, "fakd": {"layer": "stage3"}}, "takes the layer of the loss it augments"),
])
def test_layer_errors(tmp_path, teacher_ckpt, methods, words):
    with pytest.raises(ValueError, match=words):
        build_trainer(tiny(teacher=teacher_ckpt, methods=methods), tmp_path / "run",
                       progress=False)


def test_fakd_augments_a_feature_loss_at_its_encoder_stage(tmp_path, teacher_ckpt):
    """The feature bounds need no classifier, so FAKD follows NFD or MSE to an encoder
    stage: class statistics of that stage's student features, its adapter's channels."""
    methods = {"mse": {"weight": 1.0, "layer": "stage2"}, "fakd": {"lambda_0": 1.0}}
    assert resolve_methods(methods) == {"fakd": {"weight": 1.0, "on": "feats", "layer": "stage2",
                                                 "lambda_0": 1.0}}
    trainer = build_trainer(tiny(teacher=teacher_ckpt, methods=methods, steps=2, ckpt_every=0),
                             tmp_path / "run", progress=False)
    assert trainer.layers == {"fakd": 2} and trainer.stages == [2]
    fakd = trainer.losses["fakd"]
    assert fakd.covariance.dim == 24  # MobileNetV2's stage 2 (stride 4)
    trainer.fit()
    assert fakd.covariance.n_seen.sum() == 2 * 4 * 16 * 16  # steps x batch x (64 / 4)^2


def test_runs_at_another_layer_form_their_own_group():
    """`kdnb compare` groups runs by their losses; the same loss on an encoder stage is
    another method, not another seed of the head-feature one."""
    from kdnb.compare import method_label

    assert method_label({}) == "baseline"
    assert method_label({"nfd": 2.0, "kd": {"weight": 1.0}}) == "kd+nfd"
    assert method_label({"nfd": {"weight": 8.0, "layer": "stage2"}, "fakd": {}}) == "fakd+nfd@stage2"
    assert method_label({"mse": {"layer": "head"}}) == "mse"


def test_compiled_step_gives_the_eager_loss_dict_and_gradients(monkeypatch):
    """The step has no hooks, so it compiles as one graph: ``fullgraph=True`` fails on any
    graph break, and the loss dict and the gradients equal the eager ones (a small
    FPN-ResNet18 pair; eval mode, so BatchNorm's batch statistics do not amplify rounding;
    the teacher's maps given as a cache gives them). The backend is ``aot_eager``: the
    capture (TorchDynamo) and the traced backward (AOTAutograd) are what kdnb's code
    decides; inductor's code generation, the default backend's last stage, is torch's own
    and costs about a minute of C++ compilation on 2 cores, so it is left to the GPU
    check."""
    from kdnb.distill import build_distill_losses, distill_step, teacher_maps
    from kdnb.models import Preset, build_model

    monkeypatch.setitem(PRESETS, "tiny-fpn", Preset(
        "FPN", "resnet18", {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}))
    torch.manual_seed(0)
    student = build_model("tiny-fpn", 5).eval()
    teacher = build_model("tiny-fpn", 5, decoder_segmentation_channels=64).eval()
    teacher.requires_grad_(False)
    losses = build_distill_losses({"kd": 1.0, "nfd": {"weight": 2.0, "layer": "stage2"},
                                   "mse": 0.5}, student=student, teacher=teacher, num_classes=5)
    images, masks = torch.rand(4, 3, 64, 64), torch.randint(0, 5, (4, 64, 64))
    # The teacher's maps as a cache gives them (the SynthScenes runs' path): one network
    # to compile instead of two.
    teacher = teacher_maps(teacher, images, losses.stages)
    params = [*student.parameters(), *losses.parameters()]
    eager = distill_step(student, teacher, losses, images, masks)
    eager_grads = torch.autograd.grad(eager["loss"], params)
    compiled = torch.compile(distill_step, backend="aot_eager", fullgraph=True)(student, teacher, losses, images, masks)
    compiled_grads = torch.autograd.grad(compiled["loss"], params)
    assert compiled.keys() == eager.keys() == {"loss", "task", "kd", "nfd", "mse"}
    for key in eager:
        assert torch.allclose(compiled[key], eager[key], rtol=1e-5, atol=1e-6), key
    a = torch.cat([g.flatten() for g in eager_grads])
    b = torch.cat([g.flatten() for g in compiled_grads])
    assert (a - b).norm() <= 1e-4 * a.norm()


def test_parts_given_in_memory_are_checked_against_the_config(tmp_path, teacher_ckpt):
    """build_trainer takes a model, a teacher or datasets of your own; a part that does
    not fit the config is refused with what to change, never used silently."""
    from kdnb.checkpoint import model_from_checkpoint
    from kdnb.data import build_dataset
    from kdnb.models import build_model

    teacher = model_from_checkpoint(teacher_ckpt)
    pool = build_dataset("synth", split="train", train=True, flip=False, size=64, length=16)
    with pytest.raises(ValueError, match="needs cfg.teacher set"):
        build_trainer(tiny(), tmp_path / "a", teacher=teacher)
    cfg = tiny(teacher="(in memory)", methods={"kd": 1.0}, flip=False)
    with pytest.raises(ValueError, match="cache_teacher keys the cached outputs"):
        build_trainer(cfg.replace(cache_teacher=True), tmp_path / "b", teacher=teacher)
    with pytest.raises(ValueError, match="preset 'tiny-teacher' but cfg.model is 'synth-student'"):
        build_trainer(cfg, tmp_path / "c", model=build_model("tiny-teacher", 9), teacher=teacher)
    trainer = build_trainer(cfg, tmp_path / "d", teacher=teacher, train_set=pool, eval_set=pool)
    assert trainer.teacher is teacher and not teacher.training and trainer.teacher_cache is None
    assert trainer.train_set is pool and set(trainer.losses) == {"kd"}


def test_nfd_on_several_layers_in_one_run(tmp_path, teacher_ckpt):
    """``layers`` gives one loss several maps, each with its weight: one NFD term per
    layer (``nfd@stage2``...), each with its own adapter, summed with its weight."""
    methods = {"nfd": {"layers": {"stage2": 8.0, "stage3": 4.0, "head": 1.0}}}
    trainer = build_trainer(tiny(teacher=teacher_ckpt, methods=methods, steps=2, ckpt_every=0),
                            tmp_path / "run", progress=False)
    assert trainer.layers == {"nfd@stage2": 2, "nfd@stage3": 3, "nfd@head": None}
    assert trainer.stages == [2, 3]
    assert trainer.losses["nfd@head"].adapter is not None  # 32 -> 64 head channels
    batch = next(iter(trainer.loader()))
    torch.manual_seed(0)
    out = trainer.compute_losses(*batch)
    weights = {"nfd@stage2": 8.0, "nfd@stage3": 4.0, "nfd@head": 1.0}
    assert set(out) == {"loss", "task", *weights}
    total = out["task"] + sum(w * out[name] for name, w in weights.items())
    assert torch.allclose(out["loss"], total)
    records = []
    trainer.callbacks.append(records.append)
    trainer.fit()
    assert all(name in records[0] for name in weights)
    from kdnb.losses import method_label

    assert method_label(methods) == "nfd@stage2,stage3,head"


def test_fakd_with_the_mkd_choices_trains_and_resumes_exactly(tmp_path, teacher_ckpt):
    """Diagonal variances, a detached classifier, the cosine schedule and the teacher's
    logits augmented too: the teacher's class statistics train and resume with the run."""
    fakd = {"lambda_0": 2.0, "diagonal": True, "detach_classifier": True, "schedule": "cosine",
            "augment_teacher": True}
    cfg = tiny(teacher=teacher_ckpt, methods={"kd": 1.0, "fakd": fakd}, steps=4)
    straight = build_trainer(cfg, tmp_path / "a", progress=False)
    straight.fit()
    loss = straight.losses["fakd"]
    assert loss.teacher_covariance.dim == 64 and loss.teacher_covariance.n_seen.sum() > 0
    assert loss.lam == pytest.approx(2.0 * (1 - math.cos(math.pi * 3 / 4)) / 2)

    def stop(record):
        if record["kind"] == "train" and record["step"] == 3:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        build_trainer(cfg, tmp_path / "b", progress=False, callbacks=[stop]).fit()
    resumed = build_trainer(cfg, tmp_path / "b", progress=False)
    resumed.fit(resume=True)
    for a, b in ((straight.model, resumed.model), (straight.losses, resumed.losses)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("methods, changes, words", [
    ({"nfd": {"layer": "stage5"}}, {"model_kwargs": {"encoder_depth": 4}},
     "encoder has stages 1..4"),
    ({"kd": 1.0, "fakd": {"schedule": "step"}}, {}, "unknown schedule 'step'; choose one of"),
    ({"nfd": {"layers": {"stage2": -1.0}}}, {}, r"layers\['stage2'\]=-1.0 must be"),
    ({"kd": {"layers": {"head": 1.0}}}, {}, "reads the logits"),
    ({"nfd": {"layers": {"stage2": 1.0}}, "fakd": {}}, {}, "fakd augments one map"),
])
def test_a_loss_that_does_not_apply_says_so_before_training(tmp_path, teacher_ckpt, methods,
                                                            changes, words):
    with pytest.raises(ValueError, match=words):
        build_trainer(tiny(teacher=teacher_ckpt, methods=methods, **changes), tmp_path / "run",
                      progress=False)
    assert not (tmp_path / "run").exists()  # nothing was written


def test_the_command_line_writes_layers_and_fakd_options():
    assert parse_methods("nfd,kd=1,fakd", ['nfd.layers={"stage2": 8, "head": 1}',
                                           "fakd.schedule=cosine", "fakd.augment_teacher=true"]) == {
        "nfd": {"layers": {"stage2": 8, "head": 1}}, "kd": {"weight": 1.0},
        "fakd": {"schedule": "cosine", "augment_teacher": True}}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_methods("nfd", ["nfd.layers={stage2: 8}"])
