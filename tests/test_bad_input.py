"""Bad input against a running `plugin serve`: each gets its specific status or recorded
reason, the service keeps running, and a good exam sent in between is analysed and delivered.
(The disk watermark's 0xA700 is in test_listener.py, with the watermark set above free space.)
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import DigitalMammographyXRayImageStorageForPresentation as MG

from plugin.observability import hash_uid
from tests.support.service_harness import (
    Serve,
    counts,
    storescu,
    wait_until,
)
from trainer.synth import synth_exam

pytestmark = pytest.mark.slow  # a running `plugin serve` with models


def variant(ds, **changes):
    out = copy.deepcopy(ds)
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        if value is None:
            delattr(out, keyword)
        else:
            setattr(out, keyword, value)
    return out


def garbage_file(folder: Path) -> Path:
    """A valid file meta followed by bytes that are not a data set."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / "garbage.dcm"
    with path.open("wb") as fp:
        fp.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fp, meta, enforce_standard=True)
        fp.write(b"\xff\xfe not DICOM at all " + os.urandom(4000))
    return path


@pytest.fixture(scope="module")
def service(folder_service):
    with folder_service("bad", listener={"allowed_callers": [{"ae_title": "PACS"}]}) as running:
        yield running


def test_bad_input_gets_specific_answers_and_loses_nothing(service: Serve, tmp_path, monkeypatch):
    exam = synth_exam(60, rows=512, cols=416)
    good = exam.datasets
    template = good[0]
    no_view = variant(template, ViewPosition=None, ViewCodeSequence=None)
    cases = [
        ("truncated pixel data", variant(template, PixelData=template.PixelData[:1000]), 0xC102),
        ("65535x65535 header", variant(template, Rows=65535, Columns=65535), 0xC103),
        ("missing laterality", variant(template, ImageLaterality=None), 0x0000),
        ("missing view", no_view, 0x0000),
        ("CT image", variant(template, SOPClassUID=CTImageStorage), 0x0000),
    ]
    cases[-1][1].file_meta.MediaStorageSOPClassUID = CTImageStorage

    ae = AE(ae_title="STRANGER")
    ae.requested_contexts = [
        build_context(MG, [ExplicitVRLittleEndian]),
        build_context(CTImageStorage, [ExplicitVRLittleEndian]),
    ]
    stranger = ae.associate("127.0.0.1", service.port, ae_title="MAMMO_AI")
    assert stranger.is_rejected and int(stranger.acceptor.primitive.diagnostic) == 0x03

    ae.ae_title = "PACS"
    assoc = ae.associate("127.0.0.1", service.port, ae_title="MAMMO_AI")
    assert assoc.is_established
    statuses = {}
    try:
        for i, (name, ds, _) in enumerate(cases):
            statuses[name] = assoc.send_c_store(ds).Status
            assert assoc.send_c_store(good[i % 4]).Status == 0x0000  # good ones in between
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        statuses["non-DICOM bytes"] = assoc.send_c_store(garbage_file(tmp_path)).Status
    finally:
        assoc.release()
    expected = {name: status for name, _, status in cases} | {"non-DICOM bytes": 0xC100}
    assert statuses == expected

    wait_until(
        lambda: counts(service)["deliveries"].get("delivered") == 1,
        120,
        "the good exam's CAD SR",
        service,
    )
    assert service.running()
    store = service.store()
    try:
        (job,) = store.jobs()
        assert job.state == "done" and not job.partial and len(job.instance_ids) == 4
        assert store.counts()["instances"] == {"accepted": 4, "ignored": 3}
    finally:
        store.close()

    audit = service.audit()
    # Which instance got which answer: the audit names each by its hashed SOP Instance UID.
    said = {e["sop_instance"]: e for e in audit if e["event"] in ("skipped", "refused")}
    heard = {name: said[hash_uid(str(ds.SOPInstanceUID))] for name, ds, _ in cases}
    answers = {name: (e["event"], e.get("status"), e["reason"]) for name, e in heard.items()}
    assert answers["truncated pixel data"][:2] == ("refused", "0xC102")
    assert answers["truncated pixel data"][2].startswith("pixel data truncated: ")
    assert answers["65535x65535 header"] == (
        "refused",
        "0xC103",
        "header claims more pixels than max_image_pixels",
    )
    assert answers["missing laterality"][:2] == ("skipped", None)
    assert answers["missing laterality"][2].startswith(
        "unusable mammography header: no laterality: ImageLaterality (0020,0062)"
    )
    assert answers["missing view"][:2] == ("skipped", None)
    assert answers["missing view"][2].startswith(
        "unusable mammography header: no view: ViewCodeSequence (0054,0220)"
    )
    assert answers["CT image"] == ("skipped", None, "not a mammography image (CT Image Storage)")
    refused = sorted(e["status"] for e in audit if e["event"] == "refused")
    assert refused == ["0xC100", "0xC102", "0xC103"]
    assert [e["calling_ae"] for e in audit if e["event"] == "association_rejected"] == ["STRANGER"]


@pytest.fixture(scope="module")
def service_all_outputs(folder_service):
    with folder_service("bad-views", outputs=["cad_sr", "seg", "sc"]) as running:
        yield running


def _raw(ds, tag: int, vr: str, value: bytes):
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    value += b" " if len(value) % 2 else b""
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    return ds


def test_one_bad_view_never_sinks_the_exam(service_all_outputs: Serve, tmp_path) -> None:
    """Accepted with 0x0000, failing later: a header the outputs cannot copy is repaired; a
    view whose pixels cannot be decoded is left out with its reason and the exam delivered
    as partial. Only the bad view is lost."""
    from pydicom.encaps import encapsulate, generate_frames

    from trainer.synth import encode

    service = service_all_outputs
    # Exam 1: PatientName received as LO with two values (the SEG/SR builders copy it).
    first = synth_exam(61, rows=512, cols=416).datasets
    _raw(first[0], 0x00100010, "LO", b"DOE\\JANE")
    # … and one view with WindowWidth 0, which the heat-map's windowing rejects.
    first[2].WindowCenter, first[2].WindowWidth = 2048, 0
    # … and an older exposure of its fourth view, which the later one supersedes.
    older = copy.deepcopy(first[3])
    older.SOPInstanceUID, older.AcquisitionDate = generate_uid(), "19990101"
    # Exam 2: one view a JPEG 2000 codestream cut short (its start is well formed).
    second = synth_exam(64, rows=512, cols=416).datasets
    cut = encode(second[1], "jpeg2000")
    fragment = next(generate_frames(cut.PixelData, number_of_frames=1))
    cut.PixelData = encapsulate([fragment[: len(fragment) // 3]])
    second[1] = cut
    paths = []
    for n, ds in enumerate([*first, *second, older]):
        path = tmp_path / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    storescu(paths[:5] + paths[6:], service.port)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(MG, [JPEG2000Lossless])
    assoc = ae.associate("127.0.0.1", service.port, ae_title="MAMMO_AI")
    try:
        assert assoc.send_c_store(cut).Status == 0x0000  # its start is well formed
    finally:
        assoc.release()
    wait_until(
        lambda: counts(service)["jobs"].get("done", 0) == 2, 180, "both exams analysed", service
    )
    analysed = {e["study"]: e for e in service.audit() if e["event"] == "analysed"}
    # One CAD SR per exam, a SEG and a heat-map per analysed view.
    expected = sum(1 + 2 * len(e["views"]) for e in analysed.values())
    wait_until(
        lambda: counts(service)["deliveries"].get("delivered", 0) == expected,
        60,
        "the results of every analysed view",
        service,
    )
    first_uid, second_uid = (str(x[0].StudyInstanceUID) for x in (first, second))
    by_study = {hash_uid(uid): analysed[hash_uid(uid)] for uid in (first_uid, second_uid)}
    one, two = by_study[hash_uid(first_uid)], by_study[hash_uid(second_uid)]
    ((left,),) = [two["left_out"]]
    assert two["outcome"] == "partial" and len(two["views"]) == 3
    assert left["stage"] == "decode" and "truncated" in left["reason"]
    # The heat-map of the WindowWidth-0 view fails, or (once the SC builder copes) it does
    # not: either way the exam is analysed, and only that view can be missing.
    assert [(x["stage"], x["reason"]) for x in one["left_out"]] in (
        [],
        [("output", "sc output failed (ValueError)")],
    )
    assert len(one["views"]) == 4 - len(one["left_out"])
    # The result says which image the selection passed over, and why, without its UID.
    assert one["closed_by"] == "complete" and two["skipped"] == []
    ((passed_over,),) = [one["skipped"]]
    assert passed_over["sop_instance"] == hash_uid(str(older.SOPInstanceUID))
    view = f"{older.ImageLaterality}-{older.ViewPosition}"
    assert passed_over["reason"] == (
        f"duplicate {view}: another image was chosen (later acquisition)"
    )
    assert "DOE" not in service.log and "JANE" not in service.log
    assert counts(service)["exams"].get("quarantined", 0) == 0
