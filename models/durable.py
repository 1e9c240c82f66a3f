"""Files written whole or not at all, and that survive a power cut: written under a temporary
name, fsync'd, renamed, and the folder entry fsync'd.

The one atomic writer of the project: model files (`models.modelfile`), training checkpoints
(`trainer.checkpoint`), the trainer's input cache (`trainer.prepare`) and every file the
service promises to keep (`plugin.durable`) go through it, so a reader sees a complete file or
none.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make a rename into (or a new file in) `path` durable: the entry lives in the folder."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """`mkdir -p` whose new folders survive a power cut: each new entry's parent is fsync'd
    (a file fsync'd into a folder whose own entry was lost is lost with it)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue  # made by another thread meanwhile
        fsync_dir(folder.parent)


_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def remove_temporaries(folder: Path) -> int:
    """Remove the temporary files `write_atomically` left in `folder` when its process was
    killed mid-write; returns how many. Only for a folder whose writer is the caller alone
    (a job's result folder under its lease): another writer's file in progress would go too."""
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if _TEMPORARY.fullmatch(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> int:
    """Create `path` from what `write(file)` writes, atomically and durably; returns its size.

    The temporary file is unique and hidden in the same folder (so the rename is atomic) and
    is removed when `write` fails; an existing `path` is replaced only by a complete file. It
    is created with the umask's permissions (not mkstemp's 0600), so whoever reads the folder
    (a PACS import job, a sync tool) can read the file."""
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fp:
            write(fp)
            fp.flush()
            os.fsync(fp.fileno())
            size = fp.tell()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return size
