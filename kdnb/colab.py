"""Colab: keep the checkpoint cache on Google Drive, which outlives the runtime.

A Colab runtime's disk (``/content``) is wiped when the runtime ends, and with it the
models that :func:`kdnb.experiments.train_or_load` cached under ``<data root>/checkpoints``.
Every notebook's setup cell calls :func:`use_drive` with its ``USE_DRIVE`` setting: on
Colab it mounts Google Drive and points the data root (``KDNB_DATA``, see
:func:`kdnb.data_root`) at a folder there, so the next session loads what this one
trained; anywhere else it does nothing.

Introduced in notebooks/00_setup_and_data.ipynb.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .data.base import ENV_ROOT, data_root

DRIVE_MOUNT = "/content/drive"  # where Colab's drive.mount puts Google Drive
DRIVE_FOLDER = "MyDrive/kdnb-data"  # the data root on Drive: checkpoints/, and datasets


def on_colab() -> bool:
    """Whether this process is a Colab runtime (Colab imports ``google.colab`` at start)."""
    return "google.colab" in sys.modules


def use_drive(enabled: bool = True, *, folder: str = DRIVE_FOLDER,
              mount_point: str | os.PathLike = DRIVE_MOUNT) -> Path | None:
    """On Colab, mounts Google Drive and sets ``KDNB_DATA`` to ``<mount_point>/<folder>``.

    Prints one line saying where checkpoints go. Outside Colab it does nothing and prints
    nothing. A ``KDNB_DATA`` the user already set wins over Drive. When the mount fails (the
    permission was refused, say), the run carries on with the runtime's own disk.

    Args:
        enabled: the notebook's ``USE_DRIVE``; False keeps checkpoints in ``/content``.
        folder: the data root, relative to the mount point.
        mount_point: where Drive is mounted.

    Returns:
        The data root on Drive when this call set it, else None.
    """
    if not on_colab():
        return None
    wiped = "wiped when the runtime ends"
    if os.environ.get(ENV_ROOT):
        print(f"checkpoints go to {data_root() / 'checkpoints'} ({ENV_ROOT} is set; USE_DRIVE not used)")
        return None
    if not enabled:
        print(f"checkpoints go to {data_root() / 'checkpoints'}, {wiped} "
              "(USE_DRIVE = True keeps them on Google Drive)")
        return None
    from google.colab import drive  # only on Colab

    try:
        drive.mount(str(mount_point))  # Colab asks for permission to access Drive
    except Exception as error:  # refused or timed out: Drive is optional, the notebook is not
        print(f"Google Drive not mounted ({error}): checkpoints go to "
              f"{data_root() / 'checkpoints'}, {wiped}")
        return None
    root = Path(mount_point) / folder
    root.mkdir(parents=True, exist_ok=True)
    os.environ[ENV_ROOT] = str(root)
    print(f"checkpoints go to {root / 'checkpoints'} on Google Drive (kept after the runtime "
          f"ends; datasets are looked for in {root})")
    return root
