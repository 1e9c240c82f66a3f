"""What broken PACS and attackers send, through the real listener over a real socket (the
raw Upper Layer client of `raw_dicom`, since pynetdicom's SCU refuses to send most of it):
each permanent fault gets its exact 0xC1xx status with a value-free ErrorComment, nothing is
left in the spool's `.incoming` folder, and no header value reaches the audit trail."""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    generate_uid,
)
from pynetdicom.sop_class import DigitalMammographyXRayImageStorageForPresentation as MG

from plugin.listener import Listener
from plugin.observability import JsonFormatter
from tests.support.raw_dicom import Closed, RawAssociation, dataset_bytes
from tests.support.service_harness import wait_until
from trainer.synth import encode, synth_exam


@pytest.fixture(scope="module")
def image() -> Dataset:
    return synth_exam(21, rows=96, cols=80).datasets[0]


@pytest.fixture
def make_listener(make_listener):
    """conftest's, with short network and DIMSE timeouts: abusive peers stall on purpose."""

    def make(**config) -> Listener:
        timeouts = {"network_timeout_seconds": 10, "dimse_timeout_seconds": 10}
        return make_listener(**(timeouts | config))

    return make


def variant(ds: Dataset, **changes) -> Dataset:
    out = copy.deepcopy(ds)
    out.SOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(out, keyword, value)
    return out


def raw(ds: Dataset, tag: int, vr: str, value: bytes) -> Dataset:
    """`ds` with an element exactly as given (pydicom would refuse to build most of these)."""
    value += b" " if len(value) % 2 else b""
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    return ds


def store(listener: Listener, ds: Dataset, syntax=ExplicitVRLittleEndian, context=None, uid=None):
    with RawAssociation.open(listener.port, [(MG, [context or syntax])], timeout=20) as assoc:
        return assoc.store(MG, ds.SOPInstanceUID if uid is None else uid, dataset_bytes(ds, syntax))


def audit(listener: Listener) -> list[str]:
    return listener.audit.path.read_text().splitlines()


def nothing_left(listener: Listener, timeout: float = 6.0) -> None:
    deadline = time.monotonic() + timeout
    while list(listener.incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(listener.incoming.iterdir()) == []


HEADER_FAULTS = [
    ("NumberOfFrames abc", 0x00280008, "IS", b"abc", "NumberOfFrames is not an integer"),
    ("NumberOfFrames 1.5", 0x00280008, "IS", b"1.5", "NumberOfFrames is not an integer"),
    ("NumberOfFrames 0", 0x00280008, "IS", b"0", "NumberOfFrames is out of range"),
    ("Rows as DS", 0x00280010, "DS", b"96.5", "Rows has VR DS; expected US"),
    ("Rows as LO", 0x00280010, "LO", b"ninety", "Rows has VR LO; expected US"),
    ("Columns 0", 0x00280011, "US", b"\0\0", "Columns is out of range"),
    ("Columns two values", 0x00280011, "US", b"\x50\0\x50\0", "Columns holds several values"),
    ("Rows empty", 0x00280010, "US", b"", "Rows is missing or empty"),
    ("BitsStored > BitsAllocated", 0x00280101, "US", b"\x20\0", "BitsStored is larger"),
]


def test_header_faults_are_permanent_refusals(make_listener, image) -> None:
    listener = make_listener()
    for name, tag, vr, value, comment in HEADER_FAULTS:
        rsp = store(listener, raw(variant(image), tag, vr, value))
        assert (rsp.status, rsp.error_comment[: len(comment)]) == (0xC104, comment), name
    assert store(listener, variant(image)).status == 0x0000  # the service is fine
    nothing_left(listener)
    assert listener.store.counts()["instances"] == {"accepted": 1}
    assert len(list(listener.instances_dir.rglob("*.dcm"))) == 1
    refused = [json.loads(line) for line in audit(listener) if '"refused"' in line]
    assert [e["status"] for e in refused] == ["0xC104"] * len(HEADER_FAULTS)


def test_bytes_not_in_the_negotiated_syntax_are_refused(make_listener, image) -> None:
    listener = make_listener()
    j2k = encode(variant(image), "jpeg2000")
    cases = [
        ("implicit bytes, explicit context", variant(image), ImplicitVRLittleEndian, None),
        ("explicit bytes, implicit context", variant(image), ExplicitVRLittleEndian, "implicit"),
        ("native pixels, JPEG 2000 context", variant(image), ExplicitVRLittleEndian, "j2k"),
        ("JPEG 2000 pixels, explicit context", j2k, ExplicitVRLittleEndian, "explicit"),
        ("JPEG 2000 pixels, JPEG-LS context", j2k, ExplicitVRLittleEndian, "jpegls"),
    ]
    contexts = {
        None: ExplicitVRLittleEndian,
        "implicit": ImplicitVRLittleEndian,
        "explicit": ExplicitVRLittleEndian,
        "j2k": JPEG2000Lossless,
        "jpegls": JPEGLSLossless,
    }
    for name, ds, syntax, context in cases:
        with RawAssociation.open(listener.port, [(MG, [contexts[context]])]) as assoc:
            rsp = assoc.store(MG, ds.SOPInstanceUID, dataset_bytes(ds, syntax))
        assert rsp.status == 0xC105, name
    # The same data sets in the syntax they are in are stored.
    with RawAssociation.open(listener.port, [(MG, [JPEG2000Lossless])]) as assoc:
        assert (
            assoc.store(MG, j2k.SOPInstanceUID, dataset_bytes(j2k, ExplicitVRLittleEndian)).status
            == 0
        )
    nothing_left(listener)
    assert listener.store.counts()["instances"] == {"accepted": 1}


def test_malformed_requests_and_resets_leave_no_files(make_listener, image) -> None:
    listener = make_listener()
    body = dataset_bytes(image, ExplicitVRLittleEndian)
    for uid in ("1.2." + "3" * 70, ""):
        started = time.monotonic()
        with pytest.raises(Closed):  # pynetdicom answers an invalid request by ending it
            store(listener, image, uid=uid)
        assert time.monotonic() - started < 5, "the sender must not wait for a timeout"
    # A TCP reset in the middle of the data set.
    assoc = RawAssociation.open(listener.port, [(MG, [ExplicitVRLittleEndian])])
    cid = assoc.store_request(MG, image.SOPInstanceUID)
    assoc.send_data(cid, body[: len(body) // 2], last=False)
    time.sleep(0.3)
    assert len(list(listener.incoming.iterdir())) >= 1
    assoc.reset()
    nothing_left(listener)
    # An association that stays open while another one is reset keeps its transfer.
    slow = RawAssociation.open(listener.port, [(MG, [ExplicitVRLittleEndian])])
    cid = slow.store_request(MG, image.SOPInstanceUID)
    slow.send_data(cid, body[:2000], last=False)
    cut = RawAssociation.open(listener.port, [(MG, [ExplicitVRLittleEndian])])
    cut.send_data(cut.store_request(MG, generate_uid()), body[:3000], last=False)
    time.sleep(0.3)
    cut.reset()
    time.sleep(0.5)
    slow.send_data(cid, body[2000:])
    assert slow.read_response().status == 0x0000
    slow.release()
    nothing_left(listener)
    assert listener.store.counts()["instances"] == {"accepted": 1}


def test_values_are_capped_and_never_copied(make_listener, image, monkeypatch, request) -> None:
    listener = make_listener()
    # The service's log formatter and levels (`configure_logging`), on a buffer.
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    for name, level in (("pydicom", logging.ERROR), ("pynetdicom", logging.WARNING)):
        monkeypatch.setattr(logging.getLogger(name), "level", level)
    request.addfinalizer(lambda: logging.getLogger().removeHandler(handler))
    leak = variant(image, PresentationIntentType="PIDLEAK-19610412")
    assert store(listener, leak).status == 0x0000  # ignored: unusable header, recorded
    huge = raw(variant(image), 0x00200062, "CS", b"PIDLEAK" * 61000)  # 427 kB laterality
    assert store(listener, huge).status == 0x0000
    lines = audit(listener)
    assert max(len(line) for line in lines) < 2048
    assert not any("PIDLEAK" in line for line in lines)
    assert "PIDLEAK" not in buffer.getvalue() and "19610412" not in buffer.getvalue()
    reasons = [
        i.reason for i in listener.store.instances(image.StudyInstanceUID, current_only=False)
    ]
    assert len(reasons) == 2 and all(r and len(r) <= 512 and "PIDLEAK" not in r for r in reasons)
    assert "PresentationIntentType" in reasons[0] + reasons[1]
    nothing_left(listener)


def test_connections_per_address_are_limited(make_listener, image) -> None:
    listener = make_listener(max_associations_per_address=2)
    held = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(2)]
    # The listener must have taken both before the third arrives: a fixed pause was too short
    # on a loaded CI machine.
    wait_until(lambda: listener.active_associations == 2, 10, "the two held connections")
    third = socket.create_connection(("127.0.0.1", listener.port))
    third.settimeout(5)
    assert third.recv(16) == b""  # closed at once: this address holds its share
    third.close()
    for sock in held:
        sock.close()
    time.sleep(0.5)
    assert store(listener, variant(image)).status == 0x0000
    rejected = [json.loads(x) for x in audit(listener) if "association_rejected" in x]
    assert len(rejected) == 1 and "max_associations_per_address" in rejected[0]["reason"]


def _mount_tmpfs(mount: Path, options: str) -> None:
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")


@pytest.fixture
def few_inodes(tmp_path: Path):
    """A real tmpfs with 64 inodes for the spool: it fills up when files are created."""
    mount = tmp_path / "inodes"
    _mount_tmpfs(mount, "size=8m,nr_inodes=64")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_while_storing_answers_out_of_resources(make_listener, image, few_inodes):
    listener = make_listener(spool=few_inodes / "spool")
    filler = few_inodes / "filler"
    filler.mkdir()
    n = 0
    try:
        while True:
            (filler / str(n)).touch()
            n += 1
    except OSError:
        pass
    (filler / "0").unlink()  # one inode left: the temporary file takes it
    rsp = store(listener, variant(image, StudyInstanceUID=generate_uid()))
    # Its study folder cannot be created (ENOSPC): out of resources, the sender retries.
    assert (rsp.status, rsp.error_comment) == (0xA700, "spool disk full")
    nothing_left(listener)
    assert list(listener.instances_dir.rglob("*.dcm")) == []
    assert listener.store.counts()["instances"] == {}
    for f in list(filler.iterdir())[:8]:
        f.unlink()
    assert store(listener, variant(image)).status == 0x0000


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 1 MiB filesystem (tmpfs) for the spool and the database; needs root."""
    mount = tmp_path / "disk"
    _mount_tmpfs(mount, "size=1m")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk(make_listener, image, small_disk: Path) -> None:
    listener = make_listener(spool=small_disk / "spool", database=small_disk / "db.sqlite")
    assert store(listener, variant(image)).status == 0x0000
    # A data set larger than the disk: pynetdicom's write fails mid-transfer and it aborts
    # the association (every SCU retries an abort); its partial file goes.
    big = synth_exam(22, rows=1024, cols=640).datasets[0]
    with pytest.raises(Closed):
        store(listener, big)
    nothing_left(listener)
    # Space back (the partial file's blocks were freed with it): stores work again.
    assert store(listener, variant(image)).status == 0x0000
    assert len(list(listener.instances_dir.rglob("*.dcm"))) == 2
