"""Folder sender: atomic writes named by SOP Instance UID; a full disk is retryable.

The full and read-only filesystems are real: small tmpfs mounts inside a private user and
mount namespace (`unshare -Urm`), so the test needs no root and leaves nothing mounted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from plugin.delivery import FolderDestination, make_sender
from tests.support.delivery_samples import write_sample_batch


def folder_sender(path: Path):
    return make_sender(FolderDestination(type="folder", name="out", path=path))


def secondary_capture(path: Path, uid: str, side: int) -> Path:
    """A minimal valid SC image of side×side 16-bit pixels (size controls the file size)."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.arange(side * side, dtype=np.uint16).tobytes()
    ds.set_original_encoding(False, True)
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_batch_lands_named_by_uid_with_identical_bytes(tmp_path: Path) -> None:
    batch = write_sample_batch(tmp_path / "batch")
    out = tmp_path / "missing" / "results"
    outcomes = folder_sender(out).send([b.path for b in batch])
    assert [o.sop_instance_uid for o in outcomes] == [b.sop_instance_uid for b in batch]
    assert all(o.ok for o in outcomes), outcomes
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{b.sop_instance_uid}.dcm" for b in batch
    )
    for b in batch:
        assert (out / f"{b.sop_instance_uid}.dcm").read_bytes() == b.path.read_bytes()
    again = folder_sender(out).send([batch[0].path])
    assert again[0].ok and len(list(out.iterdir())) == len(batch)


def test_unreadable_input_is_reported_and_not_retried(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    good = secondary_capture(tmp_path / "good.dcm", generate_uid(), 8)
    outcomes = folder_sender(tmp_path / "out").send([junk, tmp_path / "gone.dcm", good])
    assert [(o.ok, o.retryable) for o in outcomes] == [
        (False, False),
        (False, False),
        (True, False),
    ]
    assert "junk.dcm: not a readable DICOM file" in outcomes[0].detail
    assert "gone.dcm: file not found" in outcomes[1].detail


_SCRIPT = """
import hashlib, json, sys
from pathlib import Path
from plugin.delivery import FolderDestination, make_sender
folder, *paths = sys.argv[1:]
sender = make_sender(FolderDestination(type="folder", name="t", path=Path(folder)))
outcomes = [o.__dict__ for o in sender.send([Path(p) for p in paths])]
listing = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).iterdir()}
print(json.dumps({"outcomes": outcomes, "listing": listing}))
"""


def send_on_tmpfs(mount: Path, options: str, paths: list[Path], prepare: str = "") -> dict:
    """Run the folder sender in a private namespace where `mount` is a fresh tmpfs mounted
    with `options` and prepared by the shell command `prepare`; returns the outcomes and the
    folder's listing (name → sha256) as a reader would see it right after the send."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) not found; it provides the private tmpfs")
    mount.mkdir(parents=True, exist_ok=True)
    python = f'exec "{sys.executable}" -c "$0" "$@"'
    shell = f"mount -t tmpfs -o {options} tmpfs {mount} && {prepare} {python}"
    result = subprocess.run(
        [unshare, "-Urm", "sh", "-c", shell, _SCRIPT, str(mount), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0 and not result.stdout and "mount" in result.stderr.lower():
        pytest.skip(f"cannot mount a private tmpfs here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_full_disk_is_retryable_and_keeps_the_folder_consistent(tmp_path: Path) -> None:
    small_uid, big_uid = generate_uid(), generate_uid()
    small = secondary_capture(tmp_path / "small.dcm", small_uid, 16)  # ~1 KiB
    big = secondary_capture(tmp_path / "big.dcm", big_uid, 512)  # ~512 KiB
    old = secondary_capture(tmp_path / "old.dcm", big_uid, 32)  # an earlier copy of `big`
    mount = tmp_path / "tiny"
    # A 256 KiB filesystem already holding the earlier copy of `big`.
    result = send_on_tmpfs(mount, "size=256k", [small, big], f"cp {old} {mount}/{big_uid}.dcm &&")
    first, second = result["outcomes"]
    assert first["ok"], first
    assert second["ok"] is False and second["retryable"] is True
    assert f"destination folder {mount} is full (ENOSPC" in second["detail"]
    # No temporary file left behind, and the earlier copy is intact (atomic replace).
    assert result["listing"] == {f"{small_uid}.dcm": sha256(small), f"{big_uid}.dcm": sha256(old)}


def test_read_only_folder_is_not_retryable(tmp_path: Path) -> None:
    sc = secondary_capture(tmp_path / "sc.dcm", generate_uid(), 8)
    (outcome,) = send_on_tmpfs(tmp_path / "ro", "ro,size=64k", [sc])["outcomes"]
    assert outcome["ok"] is False and outcome["retryable"] is False
    assert "EROFS" in outcome["detail"] and "plugin retry" in outcome["detail"]


def test_present_names_what_the_folder_holds(tmp_path: Path) -> None:
    batch = write_sample_batch(tmp_path / "batch")
    out = tmp_path / "results"
    sender = folder_sender(out)
    assert sender.present([b.path for b in batch]) == set()
    assert sender.send([batch[0].path])[0].ok
    (out / f"{batch[1].sop_instance_uid}.dcm.tmp").write_bytes(b"half")  # not complete
    assert sender.present([b.path for b in batch]) == {batch[0].sop_instance_uid}
