"""Points every notebook's Colab badge and install cell at one GitHub repository.

    python notebooks/colab_links.py OWNER/NAME [--branch main]    # what `make colab-links` runs

The repository is written in two places per notebook: the "Open In Colab" badge of its
first cell (``colab.research.google.com/github/OWNER/NAME/blob/BRANCH/notebooks/FILE``) and
``KDNB_REPO = "OWNER/NAME"`` in its setup cell, from which the install cell builds the
``pip install "kdnb[notebooks] @ git+https://github.com/OWNER/NAME"`` line. Run it once
after forking or moving the repository, then commit the notebooks.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent
REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,38}/[A-Za-z0-9._-]{1,100}$")
BADGE = re.compile(r"https://colab\.research\.google\.com/github/[^/\s)]+/[^/\s)]+/blob/[^/\s)]+/"
                   r"notebooks/(?P<file>[^)\s]+\.ipynb)")
SETTING = re.compile(r'^KDNB_REPO = "[^"]*"', re.MULTILINE)


def set_links(repo: str, branch: str = "main", folder: Path = NOTEBOOKS) -> list[Path]:
    """Rewrites every ``*.ipynb`` of ``folder``; returns the notebooks it changed."""
    if not REPO.match(repo):
        raise ValueError(f"REPO={repo!r} is not a GitHub repository: give OWNER/NAME, e.g. "
                         "make colab-links REPO=someone/kdnb")
    if not re.fullmatch(r"[A-Za-z0-9._/-]+", branch):
        raise ValueError(f"branch {branch!r} is not a git branch name")
    changed = []
    for path in sorted(folder.glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        badges = settings = 0
        for cell in notebook["cells"]:
            text = "".join(cell["source"])
            new, n = BADGE.subn(lambda m: "https://colab.research.google.com/github/"
                                          f"{repo}/blob/{branch}/notebooks/{path.name}", text)
            badges += n
            if cell["cell_type"] == "code":
                new, n = SETTING.subn(f'KDNB_REPO = "{repo}"', new)
                settings += n
            if new != text:
                cell["source"] = new.splitlines(keepends=True)
        if badges != 1 or settings != 1:
            raise ValueError(f"{path.name}: expected one Colab badge and one KDNB_REPO setting, "
                             f"found {badges} and {settings}; fix the notebook by hand first")
        text = json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"
        if text != path.read_text():
            path.write_text(text)
            changed.append(path)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", help="OWNER/NAME of the kdnb repository on GitHub")
    parser.add_argument("--branch", default="main")
    args = parser.parse_args()
    try:
        changed = set_links(args.repo, args.branch)
    except ValueError as error:
        raise SystemExit(str(error))
    print(f"{len(changed)} notebooks now point at github.com/{args.repo} ({args.branch})")


if __name__ == "__main__":
    main()
