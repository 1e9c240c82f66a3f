"""Nothing acknowledged is lost and nothing is analysed or delivered twice: SIGKILL the
service while it receives, analyses and delivers, restart it, and count. Also a destination
that is down: deliveries retry and complete, or dead-letter and come back with `plugin retry`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import DigitalMammographyXRayImageStorageForPresentation as MG

from plugin.cli import main
from tests.support.dcmtk_peer import StoreSCP
from tests.support.service_harness import (
    Serve,
    counts,
    demo_models,
    exam_files,
    free_port,
    storescu,
    wait_until,
    write_config,
)

OBJECTS = 10  # per exam: CAD SR, TID 1500, 4 SEG, 4 SC


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return demo_models(tmp_path_factory.mktemp("models"))


def start_pacs(folder: Path, **kw) -> StoreSCP:
    """storescp that appends every file it writes to received.log (counts re-sends too)."""
    log = folder.parent / f"{folder.name}-received.log"
    args = ["-xcr", f"sh -c 'echo #f >> {log}'", *kw.pop("extra_args", ())]
    return StoreSCP.start(folder, ae_title="PACS", extra_args=args, **kw)


def receptions(pacs: StoreSCP) -> int:
    log = pacs.output_dir.parent / f"{pacs.output_dir.name}-received.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def config_for(tmp: Path, models: list[Path], pacs_port: int, **sections) -> Path:
    return write_config(
        tmp,
        port=free_port(),
        models=models,
        destinations=[
            {
                "type": "dicom",
                "name": "pacs",
                "host": "127.0.0.1",
                "port": pacs_port,
                "called_ae": "PACS",
            }
        ],
        **sections,
    )


def assert_exactly_once(service: Serve, pacs: StoreSCP, exams: int) -> None:
    store = service.store()
    try:
        jobs = store.jobs()
        assert [j.state for j in jobs] == ["done"] * exams
        assert len({j.exam_id for j in jobs}) == exams  # one analysis per exam
        assert all(len(j.instance_ids) == 4 and not j.partial for j in jobs)
        deliveries = store.deliveries()
        assert len(deliveries) == exams * OBJECTS
        assert {d.state for d in deliveries} == {"delivered"}
    finally:
        store.close()
    assert len(pacs.received()) == exams * OBJECTS


def test_sigkill_during_receive(tmp_path: Path, models: list[Path]) -> None:
    pacs = start_pacs(tmp_path / "pacs")
    config = config_for(
        tmp_path / "svc", models, pacs.port, exams={"settle_seconds": 1, "quiet_seconds": 60}
    )
    files = [*exam_files(tmp_path / "a", 40), *exam_files(tmp_path / "b", 41)]
    service = Serve.start(config)
    acked: list[Path] = []

    def sender() -> None:
        ae = AE(ae_title="PACS")
        ae.requested_contexts = [build_context(MG)]
        assoc = ae.associate("127.0.0.1", service.port, ae_title="MAMMO_AI")
        for path in files:
            status = assoc.send_c_store(path) if assoc.is_established else None
            if status is None or "Status" not in status:
                return  # the connection died under us: no answer, so not acknowledged
            if status.Status == 0x0000:
                acked.append(path)
            time.sleep(0.3)
        assoc.release()

    thread = threading.Thread(target=sender)
    thread.start()
    wait_until(lambda: len(acked) >= 5, 60, "five acknowledged instances", service)
    service.kill()
    thread.join(30)
    assert 5 <= len(acked) < len(files)

    store = service.store()
    try:  # every acknowledged instance is in the spool and the database
        for path in acked:
            ds = dcmread(path, stop_before_pixels=True)
            (inst,) = [
                i
                for i in store.instances(ds.StudyInstanceUID)
                if i.sop_instance_uid == ds.SOPInstanceUID
            ]
            assert dcmread(inst.path).SOPInstanceUID == ds.SOPInstanceUID
    finally:
        store.close()

    # Restart; the sender (like a PACS) re-sends what was not acknowledged.
    service = Serve.start(config)
    try:
        storescu([p for p in files if p not in acked], service.port)
        wait_until(
            lambda: counts(service)["deliveries"].get("delivered", 0) == 2 * OBJECTS,
            180,
            "both exams delivered",
            service,
        )
        assert_exactly_once(service, pacs, exams=2)
        assert receptions(pacs) == 2 * OBJECTS
        incoming = config.parent / "var/spool/.incoming"
        assert [f for f in incoming.rglob("*") if f.is_file()] == []
    finally:
        service.stop()
        pacs.stop()


def test_sigkill_during_analysis(tmp_path: Path, models: list[Path]) -> None:
    pacs = start_pacs(tmp_path / "pacs")
    config = config_for(tmp_path / "svc", models, pacs.port)
    service = Serve.start(config)
    storescu(exam_files(tmp_path / "a", 42), service.port)
    wait_until(lambda: counts(service)["jobs"].get("running"), 60, "analysis running", service)
    service.kill()
    assert counts(service)["jobs"] == {"running": 1}

    service = Serve.start(config)
    try:
        wait_until(
            lambda: counts(service)["deliveries"].get("delivered", 0) == OBJECTS,
            120,
            "results delivered",
            service,
        )
        assert_exactly_once(service, pacs, exams=1)
        store = service.store()
        (job,) = store.jobs()
        store.close()
        assert (job.attempts, job.version) == (2, 1)
        assert receptions(pacs) == OBJECTS
    finally:
        service.stop()
        pacs.stop()


def test_sigkill_during_delivery(tmp_path: Path, models: list[Path]) -> None:
    # The PACS takes a second per object, so the kill lands mid-delivery.
    pacs = start_pacs(tmp_path / "pacs", extra_args=["--sleep-after", "1"])
    config = config_for(tmp_path / "svc", models, pacs.port)
    service = Serve.start(config)
    storescu(exam_files(tmp_path / "a", 43), service.port)
    wait_until(
        lambda: counts(service)["deliveries"].get("delivered", 0) >= 2,
        120,
        "some deliveries done",
        service,
    )
    service.kill()
    done_before = counts(service)["deliveries"]["delivered"]
    assert done_before < OBJECTS

    service = Serve.start(config)
    try:
        wait_until(
            lambda: counts(service)["deliveries"].get("delivered", 0) == OBJECTS,
            120,
            "all deliveries done",
            service,
        )
        assert_exactly_once(service, pacs, exams=1)
        # At most the one object in flight at the kill reached the PACS twice (same UID, so
        # the PACS keeps one instance); everything else exactly once.
        assert OBJECTS <= receptions(pacs) <= OBJECTS + 1
    finally:
        service.stop()
        pacs.stop()


def test_destination_down_retries_then_dead_letters_and_plugin_retry(
    tmp_path: Path, models: list[Path], capsys
) -> None:
    pacs_port = free_port()
    config = config_for(
        tmp_path / "svc",
        models,
        pacs_port,
        delivery={
            "max_attempts": 4,
            "initial_delay_seconds": 1,
            "multiplier": 2,
            "max_delay_seconds": 4,
        },
    )
    service = Serve.start(config)
    try:
        # Down, then up before the attempts run out: the deliveries retry and complete.
        storescu(exam_files(tmp_path / "a", 44), service.port)
        wait_until(
            lambda: any(d.attempts >= 2 for d in _deliveries(service)),
            60,
            "a second delivery attempt",
            service,
        )
        pacs = start_pacs(tmp_path / "pacs", port=pacs_port)
        wait_until(
            lambda: counts(service)["deliveries"].get("delivered") == OBJECTS,
            60,
            "deliveries after the PACS came up",
            service,
        )
        assert max(d.attempts for d in _deliveries(service)) >= 2
        pacs.stop()

        # Down for longer than the attempts last: dead letters, then `plugin retry`.
        storescu(exam_files(tmp_path / "b", 45), service.port)
        wait_until(
            lambda: counts(service)["deliveries"].get("dead") == OBJECTS,
            90,
            "dead letters",
            service,
        )
        assert main(["status", "--config", str(config)]) == 0
        assert "dead letters" in capsys.readouterr().out
        pacs = start_pacs(tmp_path / "pacs2", port=pacs_port)
        assert main(["retry", "--dead-letters", "--config", str(config)]) == 0
        assert f"requeued {OBJECTS} dead letter(s)" in capsys.readouterr().out
        wait_until(
            lambda: counts(service)["deliveries"].get("delivered") == 2 * OBJECTS,
            60,
            "re-queued deliveries",
            service,
        )
        assert len(pacs.received()) == OBJECTS
        assert [e["event"] for e in service.audit()].count("dead_letter") == OBJECTS
        pacs.stop()
    finally:
        service.stop()


def _deliveries(service: Serve):
    store = service.store()
    try:
        return store.deliveries()
    finally:
        store.close()
