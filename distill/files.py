"""Atomic writes: a reader, or a rerun after a kill, sees the old content or the new one, never half of it.

Everything the pipeline writes for later reading (summaries, checkpoints, caches, the final model, exports)
goes through these helpers: it is built under a temporary name beside its target and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; it replaces `path` once the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def move_into_place(tmp: Path, target: Path, *, replace: bool = True) -> None:
    """Rename the complete folder `tmp` to `target`. An existing `target` is swapped out first (`replace`), or
    kept when another process made it meanwhile (`replace=False`: theirs is as good as ours)."""
    if target.exists() and not replace:
        shutil.rmtree(tmp)
        return
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        target.rename(old / target.name)
        tmp.rename(target)
        shutil.rmtree(old)
        return
    try:
        tmp.rename(target)
    except OSError:  # made concurrently by another process
        if replace:
            raise
        shutil.rmtree(tmp)


@contextmanager
def atomic_dir(target: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target` to fill; it becomes `target` once the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        move_into_place(tmp, target, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
