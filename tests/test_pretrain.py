"""The pretrained regime: PretextShapes, an encoder trained on it, a run started from it."""
import pytest
import torch

from kdnb.build import build_trainer
from kdnb.config import TrainConfig, config_hash
from kdnb.data.pretext import PRETEXT_CLASSES, PretextShapes
from kdnb.pretrain import PretrainConfig, load_encoder, pretext_path, pretrain_encoder


def test_pretext_samples_are_deterministic_and_cover_every_class():
    data = PretextShapes("train", size=48, length=400)
    image, label = data[7]
    assert image.shape == (3, 48, 48) and 0 <= image.min() and image.max() <= 1
    assert torch.equal(image, PretextShapes("train", size=48, length=400)[7][0])
    assert not torch.equal(image, data[(7, 1)][0])  # another epoch, another image
    assert not torch.equal(image, PretextShapes("val", size=48, length=400)[7][0])
    labels = torch.stack([data[i][1] for i in range(len(data))])
    assert labels.unique().tolist() == list(range(len(PRETEXT_CLASSES))) == list(range(16))
    with pytest.raises(ValueError, match="unknown split 'test'"):
        PretextShapes("test")


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretext") / "student.pt"
    cfg = PretrainConfig("synth-student", steps=6, batch_size=8, length=64, size=32)
    record = pretrain_encoder(cfg, path, progress=False)
    assert 0 <= record["val_accuracy"] <= 1 and record["encoder"] == "mobilenet_v2"
    return path


def test_a_run_starts_from_the_pretext_encoder(tmp_path, encoder_file):
    base = dict(model="synth-student", data="synth", data_kwargs={"size": 64, "length": 8},
                steps=1, batch_size=4, eval_every=0, ckpt_every=0, eval_batch_size=8)
    trainer = build_trainer(TrainConfig(**base, encoder_init=str(encoder_file)), tmp_path / "a",
                            progress=False)
    saved = torch.load(encoder_file, weights_only=True)["model"]
    state = trainer.model.net.encoder.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    scratch = build_trainer(TrainConfig(**base), tmp_path / "b", progress=False)
    # The rest of the model is built from the same seed either way.
    assert torch.equal(scratch.model.classifier.weight, trainer.model.classifier.weight)
    assert not torch.equal(scratch.model.net.encoder.state_dict()[next(iter(saved))],
                           saved[next(iter(saved))])
    moved = tmp_path / "elsewhere" / encoder_file.name
    assert config_hash(TrainConfig(**base, encoder_init=str(encoder_file))) == \
        config_hash(TrainConfig(**base, encoder_init=str(moved)))  # by file name
    assert config_hash(TrainConfig(**base, encoder_init=str(encoder_file))) != \
        config_hash(TrainConfig(**base))


def test_a_wrong_or_missing_encoder_is_named(tmp_path, encoder_file):
    from kdnb.models import build_model

    with pytest.raises(ValueError, match="holds a mobilenet_v2 encoder but synth-teacher"):
        load_encoder(build_model("synth-teacher", 9), encoder_file)
    base = dict(data="synth", data_kwargs={"size": 64, "length": 8}, steps=1, batch_size=4)
    with pytest.raises(FileNotFoundError, match="kdnb pretrain --preset synth-student"):
        build_trainer(TrainConfig(**base, encoder_init=str(tmp_path / "nope.pt")), tmp_path / "r",
                      progress=False)
    with pytest.raises(ValueError, match="choose one"):
        TrainConfig(encoder_init=str(encoder_file), encoder_weights="imagenet")
    assert pretext_path(PretrainConfig("synth-teacher")).name.startswith("pretext-resnet18-")
