"""Atomic, durable file writes: a reader sees the old file or the complete new one, never a
part; a failed write leaves nothing behind; new folders are created on the way."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from plugin.durable import make_dirs, remove_temporaries, write_atomically


def test_write_creates_folders_and_replaces_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "obj.dcm"
    assert write_atomically(target, lambda fp: fp.write(b"first")) == 5
    assert write_atomically(target, lambda fp: fp.write(b"second!")) == 7
    assert target.read_bytes() == b"second!"
    assert os.listdir(target.parent) == ["obj.dcm"]  # no temporary left over


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "obj.dcm"
    target.write_bytes(b"old")

    def fail_halfway(fp) -> None:
        fp.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, fail_halfway)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["obj.dcm"]


def test_files_follow_the_umask_not_0600(tmp_path: Path) -> None:
    # A folder destination is read by other users' import jobs.
    previous = os.umask(0o022)
    try:
        target = tmp_path / "obj.dcm"
        write_atomically(target, lambda fp: fp.write(b"x"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_make_dirs_accepts_existing_folders(tmp_path: Path) -> None:
    make_dirs(tmp_path / "x" / "y")
    make_dirs(tmp_path / "x" / "y")
    assert (tmp_path / "x" / "y").is_dir()


def test_temporaries_of_a_killed_writer_are_removed_and_nothing_else(tmp_path: Path) -> None:
    """A SIGKILL between create and rename leaves `.NAME.XXXXXXXX.tmp`; the next claimant of
    the folder removes exactly those."""
    (tmp_path / ".seg-1.2.3.dcm.0a1b2c3d.tmp").write_bytes(b"partial")
    keep = [".hidden", "seg-1.2.3.dcm", "notes.tmp", ".x.tmp", ".seg.dcm.XYZ12345.tmp"]
    for name in keep:
        (tmp_path / name).write_bytes(b"kept")
    assert remove_temporaries(tmp_path) == 1
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
    assert remove_temporaries(tmp_path / "absent") == 0
