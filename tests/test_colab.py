"""kdnb.colab: on Colab the data root moves to Google Drive; anywhere else nothing happens.

Colab is faked: a ``google.colab`` module in ``sys.modules`` (what Colab's runtime imports
at start) whose ``drive.mount`` creates the mount folder instead of asking for permission.
"""
import json
import os
import sys
import types
from pathlib import Path

import pytest

import kdnb
from kdnb.colab import DRIVE_FOLDER, use_drive

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture
def no_data_root(monkeypatch):
    # set, then deleted: monkeypatch restores a variable only if it existed when it acted
    monkeypatch.setenv("KDNB_DATA", "unset by the test")
    monkeypatch.delenv("KDNB_DATA")


def fake_colab(monkeypatch, mount):
    """Installs a fake ``google.colab`` whose ``drive.mount`` is ``mount``."""
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=mount)
    monkeypatch.setitem(sys.modules, "google.colab", colab)


def test_on_colab_the_data_root_is_set_to_a_folder_on_drive(tmp_path, monkeypatch, capsys, no_data_root):
    mounted = []

    def mount(point):
        mounted.append(point)
        (Path(point) / "MyDrive").mkdir(parents=True)

    fake_colab(monkeypatch, mount)
    root = use_drive(True, mount_point=tmp_path / "drive")
    assert mounted == [str(tmp_path / "drive")]
    assert root == tmp_path / "drive" / DRIVE_FOLDER and root.is_dir()
    assert kdnb.data_root() == root  # KDNB_DATA now points there: the checkpoint cache follows
    printed = capsys.readouterr().out
    assert f"checkpoints go to {root / 'checkpoints'} on Google Drive" in printed


def test_outside_colab_nothing_happens(monkeypatch, capsys, no_data_root):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    before = kdnb.data_root()
    assert use_drive(True) is None
    assert kdnb.data_root() == before and "KDNB_DATA" not in os.environ
    assert capsys.readouterr().out == ""


def _never_mount(point):
    raise AssertionError("Drive must not be mounted")


def test_use_drive_false_keeps_the_runtime_disk_and_says_so(monkeypatch, capsys, no_data_root):
    fake_colab(monkeypatch, _never_mount)
    assert use_drive(False) is None
    printed = capsys.readouterr().out
    assert f"checkpoints go to {kdnb.data_root() / 'checkpoints'}, wiped when the runtime ends" in printed


def test_a_refused_mount_carries_on_without_drive(monkeypatch, capsys, no_data_root):
    def refuse(point):
        raise ValueError("mount failed")

    fake_colab(monkeypatch, refuse)
    assert use_drive(True) is None
    assert "Google Drive not mounted (mount failed)" in capsys.readouterr().out
    assert "KDNB_DATA" not in os.environ


def test_a_data_root_set_by_the_user_wins(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDNB_DATA", str(tmp_path / "mine"))
    fake_colab(monkeypatch, _never_mount)
    assert use_drive(True) is None
    assert kdnb.data_root() == tmp_path / "mine"
    assert str(tmp_path / "mine" / "checkpoints") in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_every_setup_cell_offers_drive_from_one_setting(path):
    cells = json.loads(path.read_text())["cells"]
    setup = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
    assert setup.count("USE_DRIVE = True") == 1 and "use_drive(USE_DRIVE)" in setup, path.name
    assert setup.index("USE_DRIVE = True") < setup.index("try:")  # at the top of the cell
