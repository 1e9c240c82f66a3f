"""The listener in-process with a real store and a pynetdicom SCU: association checks,
transfer-syntax preference, durable writes, and the status of every kind of C-STORE."""

from __future__ import annotations

import copy
import os
import ssl
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import DigitalMammographyXRayImageStorageForPresentation as MG
from pynetdicom.sop_class import Verification

from plugin.listener import Listener
from plugin.store import Store
from tests.support.dcmtk_peer import make_test_pki
from trainer.synth import encode


def associate(
    listener: Listener, *, calling: str = "PACS", called: str = "MAMMO_AI", contexts=None, tls=None
):
    ae = AE(ae_title=calling)
    ae.requested_contexts = contexts or [
        build_context(MG, [ExplicitVRLittleEndian]),
        build_context(CTImageStorage, [ExplicitVRLittleEndian]),
        build_context(Verification),
    ]
    kwargs = {"tls_args": tls} if tls else {}
    return ae.associate("127.0.0.1", listener.port, ae_title=called, **kwargs)


def send(listener: Listener, ds: Dataset | Path, **kw) -> Dataset:
    assoc = associate(listener, **kw)
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def audit_events(listener: Listener) -> list[dict]:
    import json

    return [json.loads(x) for x in listener.audit.path.read_text().splitlines()]


def test_stores_durably_then_acknowledges(make_listener, synth_exam_small) -> None:
    listener = make_listener()
    ds = synth_exam_small.image("L-CC").dataset
    status = send(listener, ds)
    assert status.Status == 0x0000
    (inst,) = listener.store.instances(ds.StudyInstanceUID)
    assert inst.status == "accepted" and inst.path.parent.parent == listener.instances_dir
    assert dcmread(inst.path).SOPInstanceUID == ds.SOPInstanceUID
    assert inst.description.laterality == "L" and inst.description.view == "CC"
    assert list(listener.incoming.iterdir()) == []  # nothing left half-written
    assert send(listener, ds).Status == 0x0000  # a re-send is a duplicate, not a new image
    assert len(listener.store.instances(ds.StudyInstanceUID, current_only=False)) == 1
    assert [e["event"] for e in audit_events(listener)] == ["received", "duplicate"]


def test_compressed_syntax_is_preferred_and_kept(make_listener, synth_exam_small) -> None:
    listener = make_listener()
    ds = encode(synth_exam_small.image("R-CC").dataset, "jpeg2000")
    # One context offering both: the pitfall of reference §2.3 (a sender that must then
    # decompress J2K). The listener picks the compressed syntax.
    assoc = associate(
        listener, contexts=[build_context(MG, [ExplicitVRLittleEndian, JPEG2000Lossless])]
    )
    try:
        (cx,) = assoc.accepted_contexts
        assert cx.transfer_syntax[0] == JPEG2000Lossless
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    (inst,) = listener.store.instances(ds.StudyInstanceUID)
    assert dcmread(inst.path).file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert inst.transfer_syntax_uid == JPEG2000Lossless

    # Offered the default uncompressed list in one context, a sender is not asked to deflate.
    plain = synth_exam_small.image("L-MLO").dataset
    assoc = associate(listener, contexts=[build_context(MG)])
    try:
        assert assoc.accepted_contexts[0].transfer_syntax[0] == ExplicitVRLittleEndian
        assert assoc.send_c_store(plain).Status == 0x0000
    finally:
        assoc.release()
    # A deflated data set, when it is the only offer, is stored too.
    deflated = copy.deepcopy(synth_exam_small.image("L-CC").dataset)
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    assoc = associate(listener, contexts=[build_context(MG, [DeflatedExplicitVRLittleEndian])])
    try:
        assert assoc.send_c_store(deflated).Status == 0x0000
    finally:
        assoc.release()
    assert len(listener.store.instances(ds.StudyInstanceUID)) == 3


def test_association_checks(make_listener) -> None:
    listener = make_listener(
        allowed_callers=[{"ae_title": "PACS"}, {"ae_title": "MODALITY", "address": "10.9.9.9"}]
    )
    ok = associate(listener)
    assert ok.is_established and ok.send_c_echo().Status == 0x0000
    ok.release()
    for kwargs, diagnostic in (
        ({"calling": "STRANGER"}, 0x03),
        ({"called": "OTHER"}, 0x07),
        ({"calling": "MODALITY"}, 0x03),
    ):
        assoc = associate(listener, **kwargs)
        assert assoc.is_rejected, kwargs
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, int(rj.diagnostic)) == (0x01, 0x01, diagnostic)
    rejected = [e for e in audit_events(listener) if e["event"] == "association_rejected"]
    assert len(rejected) == 3
    assert listener.metrics.associations.labels("rejected")._value.get() == 3


def test_watermark_refuses_with_out_of_resources(make_listener, synth_exam_small) -> None:
    listener = make_listener(min_free_bytes=2**62)
    # Below the watermark when the association is requested: rejected as transient.
    assoc = associate(listener)
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, int(rj.diagnostic)) == (0x02, 0x03, 0x02)
    # Crossed while an association is open: each C-STORE answers 0xA700.
    listener.min_free_bytes = 0
    assoc = associate(listener)
    assert assoc.is_established
    listener.min_free_bytes = 2**62
    try:
        status = assoc.send_c_store(synth_exam_small.image("L-MLO").dataset)
    finally:
        assoc.release()
    assert status.Status == 0xA700
    assert "disk watermark" in status.ErrorComment
    assert listener.store.counts()["instances"] == {}
    assert list(listener.instances_dir.rglob("*.dcm")) == []
    assert list(listener.incoming.iterdir()) == []


def test_store_failure_is_out_of_resources_not_cannot_understand(
    make_listener, synth_exam_small
) -> None:
    listener = make_listener()
    listener.store.close()  # the database is gone
    status = send(listener, synth_exam_small.image("L-MLO").dataset)
    assert status.Status == 0xA700
    listener.store = Store(listener.store.database, listener.store.spool)


def test_statuses_for_bad_input(make_listener, synth_exam_small, tmp_path, monkeypatch) -> None:
    listener = make_listener()
    good = synth_exam_small.image("R-MLO").dataset

    truncated = copy.deepcopy(good)
    truncated.SOPInstanceUID = truncated.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 2]
    status = send(listener, truncated)
    assert (status.Status, status.ErrorComment[:22]) == (0xC102, "pixel data truncated: ")

    huge = copy.deepcopy(good)
    huge.SOPInstanceUID = huge.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    huge.Rows = huge.Columns = 65535
    assert send(listener, huge).Status == 0xC103

    no_side = copy.deepcopy(good)
    no_side.SOPInstanceUID = no_side.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del no_side.ImageLaterality
    no_side.Laterality = ""
    assert send(listener, no_side).Status == 0x0000

    ct = copy.deepcopy(good)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    assert send(listener, ct).Status == 0x0000

    # Non-DICOM bytes behind a valid file meta: sent raw with chunked sending.
    garbage = tmp_path / "garbage.dcm"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with garbage.open("wb") as fp:
        fp.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fp, meta, enforce_standard=True)
        fp.write(b"\xff\xfe this is not a data set" + os.urandom(2000))
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assert send(listener, garbage).Status == 0xC100

    ignored = {
        e["sop_instance"]: e["reason"] for e in audit_events(listener) if e["event"] == "skipped"
    }
    assert len(ignored) == 2
    reasons = sorted(ignored.values())
    assert "laterality" in reasons[1].lower() and reasons[1].startswith("unusable")
    assert reasons[0] == "not a mammography image (CT Image Storage)"
    refused = [e["status"] for e in audit_events(listener) if e["event"] == "refused"]
    assert refused == ["0xC102", "0xC103", "0xC100"]
    # Ignored images are recorded (for the audit) but keep no bytes; nothing opened an exam.
    assert listener.store.counts()["instances"] == {"ignored": 2}
    assert listener.store.counts()["exams"] == {}
    assert list(listener.instances_dir.rglob("*.dcm")) == []


@pytest.mark.slow  # makes a test PKI with openssl: about 10 s
def test_tls_with_client_certificates(make_listener, tmp_path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    listener = make_listener(
        tls={
            "certificate": pki["server_cert"],
            "private_key": pki["server_key"],
            "ca_certificates": pki["ca"],
        }
    )
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki["ca"])
    ctx.load_cert_chain(pki["client_cert"], pki["client_key"])
    assoc = associate(listener, tls=(ctx, "localhost"))
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()
    anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki["ca"])
    assert not associate(listener, tls=(anonymous, "localhost")).is_established
