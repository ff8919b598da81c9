"""make colab-links: one repository address for every Colab badge and install cell."""
import json
import shutil
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
from colab_links import set_links  # noqa: E402  (notebooks/colab_links.py)


def _sources(folder: Path) -> dict[str, str]:
    return {p.name: "".join("".join(c["source"]) for c in json.loads(p.read_text())["cells"])
            for p in sorted(folder.glob("*.ipynb"))}


def test_every_notebook_follows_one_repository_address(tmp_path):
    for path in NOTEBOOKS.glob("*.ipynb"):
        shutil.copy(path, tmp_path / path.name)
    assert set_links("OWNER/kdnb", folder=tmp_path) == []  # the committed state round-trips
    changed = set_links("someone/kdnb-fork", branch="dev", folder=tmp_path)
    assert len(changed) == len(list(NOTEBOOKS.glob("*.ipynb"))) > 0
    for name, text in _sources(tmp_path).items():
        assert "github/OWNER" not in text and 'KDNB_REPO = "OWNER' not in text, name
        assert (f"https://colab.research.google.com/github/someone/kdnb-fork/blob/dev/notebooks/"
                f"{name}") in text
        assert 'KDNB_REPO = "someone/kdnb-fork"' in text
        assert "git+https://github.com/{KDNB_REPO}" in text  # the install line follows it
        assert 'glob.glob("/content/kdnb-*.whl")' in text  # and a wheel uploaded to Colab wins


def test_a_malformed_repository_is_refused_and_nothing_is_written(tmp_path):
    for path in NOTEBOOKS.glob("*.ipynb"):
        shutil.copy(path, tmp_path / path.name)
    before = _sources(tmp_path)
    for bad in ("kdnb", "https://github.com/someone/kdnb", "a/b/c", ""):
        with pytest.raises(ValueError, match="OWNER/NAME"):
            set_links(bad, folder=tmp_path)
    assert _sources(tmp_path) == before
