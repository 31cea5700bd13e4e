"""Durable file writes: a reader sees the old file or the whole new one, and a power cut after the
call returns loses neither.

os.replace alone is atomic but not durable: without fsync of the file before the rename and of the
folder after it, a crash can leave the new name pointing at an empty or partial file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Any], None], *, binary: bool = True, mode: int = 0o644) -> None:
    """Write through `write(fh)` into a hidden temp file beside `path`, fsync it, rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    atomic_write(path, lambda fh: fh.write(data), mode=mode)


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: Path, obj: Any, *, mode: int = 0o644, **dumps_kwargs) -> None:
    dumps_kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs), mode=mode)


def atomic_write_parquet(path: Path, table, **write_options) -> None:
    """`table` (a pyarrow Table) as a Parquet file; `write_options` go to pyarrow.parquet.write_table."""
    import pyarrow.parquet as pq

    atomic_write(path, lambda fh: pq.write_table(table, fh, **write_options))


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (a staged folder, before it is renamed into place)."""
    root = Path(root)
    for folder, _, files in os.walk(root):
        for name in files:
            with open(Path(folder) / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(folder))


def replace_dir(staged: Path, final: Path) -> None:
    """Move a fully written folder into place. Readers see the old folder or the new one; if the swap
    fails the old one is put back."""
    staged, final = Path(staged), Path(final)
    fsync_tree(staged)
    if not final.exists():
        os.replace(staged, final)
        fsync_dir(final.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
    os.replace(final, old / "prev")
    try:
        os.replace(staged, final)
    except BaseException:
        os.replace(old / "prev", final)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)
