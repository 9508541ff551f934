"""Atomic checkpoint folders.

A checkpoint is written into ``<name>.tmp-<pid>`` next to its final place, flushed to
disk, and only then renamed to ``<name>``; an existing checkpoint of the same name is
swapped out only after the new one is complete.  A crash at any point leaves either the
old checkpoint or the new one, never a half-written folder under the final name.
A checkpoint is recognised by the file ``COMPLETE``, written last.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

MARKER = "COMPLETE"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def temp_path(final: str | Path) -> Path:
    final = Path(final)
    return final.with_name(final.name + ".tmp")


def begin(final: str | Path) -> Path:
    """Create (empty) the temporary folder for ``final`` and return it."""
    tmp = temp_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(final: str | Path) -> Path:
    """Mark the temporary folder complete and move it to ``final`` atomically."""
    final = Path(final)
    tmp = temp_path(final)
    (tmp / MARKER).write_text("ok\n")
    _fsync_tree(tmp)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def latest(output_dir: str | Path) -> Path | None:
    """The complete ``checkpoint-<step>`` folder with the highest step, or None."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = []
    for p in out.iterdir():
        if p.is_dir() and p.name.startswith("checkpoint-") and is_complete(p):
            try:
                found.append((int(p.name.split("-", 1)[1]), p))
            except ValueError:
                pass
    return max(found)[1] if found else None


def rotate(output_dir: str | Path, keep: int | None) -> None:
    """Delete the oldest complete step checkpoints beyond ``keep``."""
    if keep is None:
        return
    out = Path(output_dir)
    ckpts = sorted(
        (int(p.name.split("-", 1)[1]), p)
        for p in out.iterdir()
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name.split("-", 1)[1].isdigit() and is_complete(p)
    )
    for _, p in ckpts[: max(len(ckpts) - keep, 0)]:
        shutil.rmtree(p)
