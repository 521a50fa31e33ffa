"""Writing an output folder (an HF export, a serving folder): one policy for every writer.

An existing non-empty target is refused before any work unless `overwrite`; the folder is written
under a temporary name beside the target and swapped into place with renames, so a reader (or a
crash) never sees half of it, and a failed write leaves the old folder as it was."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def check_target(out, overwrite: bool = False) -> Path:
    """Refuse `out` before any work: a file, or a non-empty folder unless `overwrite`."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose a new output folder, or pass --overwrite "
                              "(overwrite=True) to replace it")
    return out


@contextlib.contextmanager
def atomic_folder(out, overwrite: bool = False):
    """Yields a temporary folder to fill; on success it replaces `out` (checked by `check_target`)."""
    out = check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "x")  # out moved aside, then the new one in: two renames
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
