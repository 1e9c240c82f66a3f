"""Senders against a real Orthanc (Debian's orthanc + orthanc-dicomweb): REST, STOW-RS and
C-STORE, including its authentication, AE-title checks and a Lua filter that discards."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from plugin.delivery import (
    DicomDestination,
    DicomwebDestination,
    OrthancDestination,
    make_sender,
)
from plugin.delivery.stow import _instance_outcome
from tests.support.dcmtk_peer import free_port
from tests.support.delivery_samples import SampleObject, write_sample_batch
from tests.support.orthanc_peer import OrthancPeer

USER, PASSWORD, PASSWORD_ENV = "ai", "orthanc-test-pw", "MAMMO_TEST_ORTHANC_PW"
LUA_FILTER = """
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.SeriesDescription ~= 'DISCARD ME'
end
"""


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("orthanc")
    (workdir / "filter.lua").write_text(LUA_FILTER)
    extra = {
        "LuaScripts": [str(workdir / "filter.lua")],
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowMove": False,
    }
    with OrthancPeer.start(
        workdir,
        users={USER: PASSWORD},
        modalities={"ai": ("AISCU", "127.0.0.1", free_port())},
        extra_config=extra,
    ) as peer:
        yield peer


@pytest.fixture(autouse=True)
def password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)


def batch(tmp_path: Path, seed: int) -> list[SampleObject]:
    return write_sample_batch(tmp_path / f"batch{seed}", seed=seed)


def rest_sender(url: str):
    return make_sender(
        OrthancDestination(
            type="orthanc", name="o", url=url, username=USER, password_env=PASSWORD_ENV
        )
    )


def stow_sender(url: str, password_env: str = PASSWORD_ENV):
    return make_sender(
        DicomwebDestination(
            type="dicomweb", name="w", url=url, username=USER, password_env=password_env
        )
    )


def stored_syntax(orthanc: OrthancPeer, uid: str) -> str | None:
    orthanc_id = orthanc.find_instance(uid)
    if orthanc_id is None:
        return None
    return dcmread(io.BytesIO(orthanc.instance_file(orthanc_id))).file_meta.TransferSyntaxUID


def test_rest_upload_stores_the_bytes_and_is_idempotent(orthanc, tmp_path: Path) -> None:
    objects = batch(tmp_path, seed=21)
    sender = rest_sender(orthanc.url)
    outcomes = sender.send([b.path for b in objects])
    assert [o.sop_instance_uid for o in outcomes] == [b.sop_instance_uid for b in objects]
    assert all(o.ok and o.detail == "stored in Orthanc" for o in outcomes), outcomes
    for b in objects:
        orthanc_id = orthanc.find_instance(b.sop_instance_uid)
        assert orthanc_id is not None
        assert orthanc.instance_file(orthanc_id) == b.path.read_bytes()
    again = sender.send([objects[0].path])
    assert again[0].ok and "already stored" in again[0].detail
    sender.close()


def test_rest_discarded_by_orthanc_filter_is_not_retryable(orthanc, tmp_path: Path) -> None:
    source = batch(tmp_path, seed=22)[0]
    ds = dcmread(source.path)
    ds.SeriesDescription = "DISCARD ME"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "discard.dcm"
    ds.save_as(path)
    (outcome,) = rest_sender(orthanc.url).send([path])
    assert (outcome.ok, outcome.retryable) == (False, False)
    assert "FilteredOut" in outcome.detail
    assert orthanc.find_instance(ds.SOPInstanceUID) is None


def test_wrong_password_is_not_retryable(orthanc, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MAMMO_TEST_WRONG_PW", "nope")
    path = batch(tmp_path, seed=21)[0].path
    rest = make_sender(
        OrthancDestination(
            type="orthanc",
            name="o",
            url=orthanc.url,
            username=USER,
            password_env="MAMMO_TEST_WRONG_PW",
        )
    ).send([path])
    stow = stow_sender(orthanc.dicomweb_url, "MAMMO_TEST_WRONG_PW").send([path])
    for outcome in rest + stow:
        assert (outcome.ok, outcome.retryable) == (False, False)
        assert "HTTP 401" in outcome.detail and "credentials" in outcome.detail


def test_stow_stores_the_batch_in_its_transfer_syntaxes(orthanc, tmp_path: Path) -> None:
    objects = batch(tmp_path, seed=23)
    sender = stow_sender(orthanc.dicomweb_url)
    outcomes = sender.send([b.path for b in objects])
    sender.close()
    assert all(o.ok and o.detail == "stored (STOW-RS)" for o in outcomes), outcomes
    for b in objects:
        assert stored_syntax(orthanc, b.sop_instance_uid) == b.transfer_syntax_uid


def test_http_peers_down_are_retryable(tmp_path: Path) -> None:
    path = batch(tmp_path, seed=21)[0].path
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    outcomes = rest_sender(url).send([path, path]) + stow_sender(url + "/dicom-web").send([path])
    assert all(not o.ok and o.retryable for o in outcomes), outcomes
    assert "cannot reach" in outcomes[0].detail
    assert time.monotonic() - started < 10


def cstore_sender(orthanc: OrthancPeer, calling_ae: str, called_ae: str | None = None):
    return make_sender(
        DicomDestination(
            type="dicom",
            name="orthanc-dicom",
            host="127.0.0.1",
            port=orthanc.dicom_port,
            called_ae=called_ae or orthanc.ae_title,
            calling_ae=calling_ae,
        )
    )


def test_cstore_into_orthanc(orthanc, tmp_path: Path) -> None:
    objects = batch(tmp_path, seed=24)
    outcomes = cstore_sender(orthanc, "AISCU").send([b.path for b in objects])
    assert all(o.ok for o in outcomes), outcomes
    for b in objects:
        assert stored_syntax(orthanc, b.sop_instance_uid) == b.transfer_syntax_uid


@pytest.mark.parametrize(
    ("calling", "called", "reason"),
    [
        ("STRANGER", None, "Calling AE title not recognised"),
        ("AISCU", "NOT_ORTHANC", "Called AE title not recognised"),
    ],
)
def test_cstore_rejected_by_ae_title_is_not_retryable(
    orthanc, tmp_path: Path, calling: str, called: str | None, reason: str
) -> None:
    objects = batch(tmp_path, seed=25)
    outcomes = cstore_sender(orthanc, calling, called).send([b.path for b in objects])
    assert all((o.ok, o.retryable) == (False, False) for o in outcomes), outcomes
    assert reason in outcomes[0].detail and "plugin retry" in outcomes[0].detail
    assert orthanc.find_instance(objects[0].sop_instance_uid) is None


def _item(uid: str, **values: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    item.ReferencedSOPInstanceUID = uid
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def test_stow_report_is_read_per_instance() -> None:
    # Orthanc reports every instance as stored, so the per-instance failure paths of a STOW
    # response (PS3.18 10.5.3) are checked on a report built here.
    report = Dataset()
    report.ReferencedSOPSequence = [_item("1.1"), _item("1.2", WarningReason=0xB000)]
    report.FailedSOPSequence = [
        _item("1.3", FailureReason=0xA700),
        _item("1.4", FailureReason=0xC000),
    ]
    got = {u: _instance_outcome(u, report) for u in ("1.1", "1.2", "1.3", "1.4", "1.5")}
    assert (got["1.1"].ok, got["1.2"].ok) == (True, True)
    assert "coercion" in got["1.2"].detail
    assert (got["1.3"].ok, got["1.3"].retryable) == (False, True)
    assert (got["1.4"].ok, got["1.4"].retryable) == (False, False)
    assert (got["1.5"].ok, got["1.5"].retryable) == (False, True)
    assert _instance_outcome("1.6", Dataset()).ok  # a bare 200 without a report


def test_senders_ask_orthanc_what_it_already_holds(orthanc, tmp_path: Path) -> None:
    # Before re-sending an object an earlier attempt may have delivered, the outbox asks:
    # Orthanc REST (/tools/lookup), QIDO-RS and C-FIND each answer for Orthanc.
    objects = batch(tmp_path, seed=27)
    held, new = objects[:2], objects[2:]
    rest = rest_sender(orthanc.url)
    assert all(o.ok for o in rest.send([b.path for b in held]))
    senders = {
        "rest": rest,
        "qido": stow_sender(orthanc.dicomweb_url),
        "c-find": cstore_sender(orthanc, "AISCU"),
    }
    for name, sender in senders.items():
        found = sender.present([b.path for b in objects])
        sender.close()
        assert found == {b.sop_instance_uid for b in held}, name
    assert new and all(orthanc.find_instance(b.sop_instance_uid) is None for b in new)
    # A peer that cannot answer (nothing listening) knows of nothing: everything is resent.
    down = make_sender(
        DicomDestination(
            type="dicom",
            name="down",
            host="127.0.0.1",
            port=free_port(),
            called_ae="NOBODY",
            calling_ae="AISCU",
        )
    )
    assert down.present([b.path for b in held]) == set()
