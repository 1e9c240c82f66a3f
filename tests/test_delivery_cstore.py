"""C-STORE sender against dcmtk's storescp: contexts, statuses, faults and TLS.

Rejections by AE title are tested against Orthanc in test_delivery_orthanc.py (storescp has
no calling-AE check).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from plugin.delivery import DicomDestination, DicomTls, make_sender
from tests.support.dcmtk_peer import StoreSCP, free_port, make_test_pki
from tests.support.delivery_samples import SampleObject, write_sample_batch

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> list[SampleObject]:
    return write_sample_batch(tmp_path_factory.mktemp("batch"))


def sender_for(port: int, called_ae: str = "PACS", **kwargs):
    return make_sender(
        DicomDestination(
            type="dicom", name="pacs", host="127.0.0.1", port=port, called_ae=called_ae, **kwargs
        )
    )


def test_batch_arrives_unchanged_over_one_association(tmp_path: Path, batch) -> None:
    with StoreSCP.start(tmp_path / "in", ae_title="PACS", extra_args=["-v", "+v"]) as scp:
        outcomes = sender_for(scp.port).send([b.path for b in batch])
        assert [o.sop_instance_uid for o in outcomes] == [b.sop_instance_uid for b in batch]
        assert all(o.ok for o in outcomes), outcomes
        assert scp.received_syntaxes() == {b.sop_instance_uid: b.transfer_syntax_uid for b in batch}
    log = scp.log_path.read_text()
    assert log.count("Association Acknowledged") == 1
    # One proposed context per (SOP class, transfer syntax) present: the two mammograms
    # (explicit VR LE and JPEG-LS) each get their own, with a single transfer syntax.
    proposed = re.findall(r"Context ID:\s+\d+ \(Proposed\)", log)
    assert len(proposed) == len({(b.sop_class_uid, b.transfer_syntax_uid) for b in batch}) == 4
    assert "=JPEGLSLossless" in log


def test_syntax_the_peer_refuses_fails_only_that_object(tmp_path: Path, batch) -> None:
    # Without +xa storescp accepts only uncompressed syntaxes: the JPEG-LS context is refused.
    with StoreSCP.start(tmp_path / "in", ae_title="PACS", accept_all_syntaxes=False) as scp:
        outcomes = sender_for(scp.port).send([b.path for b in batch])
        received = scp.received_uids()
    for b, outcome in zip(batch, outcomes, strict=True):
        if b.transfer_syntax_uid == JPEG_LS_LOSSLESS:
            assert (outcome.ok, outcome.retryable) == (False, False)
            assert "did not accept SOP class" in outcome.detail
            assert b.sop_instance_uid not in received
        else:
            assert outcome.ok and b.sop_instance_uid in received


def test_peer_down_is_retryable(batch) -> None:
    started = time.monotonic()
    outcomes = sender_for(free_port()).send([b.path for b in batch])
    assert all(not o.ok and o.retryable for o in outcomes)
    assert "cannot connect to PACS@127.0.0.1" in outcomes[0].detail
    assert time.monotonic() - started < 10


def test_abort_mid_batch_is_retryable_and_fast(tmp_path: Path, batch) -> None:
    with StoreSCP.start(tmp_path / "in", ae_title="PACS", extra_args=["--abort-after"]) as scp:
        started = time.monotonic()
        outcomes = sender_for(scp.port).send([b.path for b in batch])
        elapsed = time.monotonic() - started
    assert all(not o.ok and o.retryable for o in outcomes), outcomes
    assert "no C-STORE response" in outcomes[0].detail
    assert all("association lost" in o.detail for o in outcomes[1:])
    assert elapsed < 10, "the rest of the batch must not wait for timeouts"


def test_unreadable_file_does_not_stop_the_batch(tmp_path: Path, batch) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 200)
    with StoreSCP.start(tmp_path / "in", ae_title="PACS") as scp:
        outcomes = sender_for(scp.port).send([junk, batch[0].path])
        assert scp.received_uids() == {batch[0].sop_instance_uid}
    assert (outcomes[0].ok, outcomes[0].retryable, outcomes[0].sop_instance_uid) == (
        False,
        False,
        "",
    )
    assert outcomes[1].ok


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def test_tls_with_client_certificate(tmp_path: Path, batch, pki) -> None:
    server = (pki["server_key"], pki["server_cert"], pki["ca"])
    paths = [b.path for b in batch[:2]]
    with StoreSCP.start(tmp_path / "in", ae_title="PACS", tls=server) as scp:
        good = DicomTls(
            ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"], server_name="localhost"
        )
        assert all(o.ok for o in sender_for(scp.port, tls=good).send(paths))
        untrusted = DicomTls(
            ca=pki["other_ca"],
            cert=pki["client_cert"],
            key=pki["client_key"],
            server_name="localhost",
        )
        refused = sender_for(scp.port, tls=untrusted).send(paths)
        anonymous = sender_for(scp.port, tls=DicomTls(ca=pki["ca"], server_name="localhost"))
        no_cert = anonymous.send(paths)
        assert scp.received_uids() == {b.sop_instance_uid for b in batch[:2]}
        assert len(scp.received()) == 2
    assert all(not o.ok and o.retryable for o in refused + no_cert)
    assert "TLS handshake failed" in refused[0].detail
    assert "client certificate" in no_cert[0].detail
