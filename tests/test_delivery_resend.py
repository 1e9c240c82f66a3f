"""At-least-once delivery without duplicates where the destination can say what it holds:
an object whose earlier attempt may have reached the destination is looked up there (here by
C-FIND against a real Orthanc) and not sent again. About 40 s on 2 cores."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support.orthanc_peer import OrthancPeer
from tests.support.service_harness import (
    Serve,
    demo_models,
    exam_files,
    free_port,
    storescu,
    wait_until,
    write_config,
)


def _deliveries(service: Serve):
    store = service.store()
    try:
        return store.deliveries()
    finally:
        store.close()


def test_object_already_at_the_destination_is_not_sent_again(tmp_path: Path) -> None:
    orthanc_port = free_port()
    config = write_config(
        tmp_path / "svc",
        port=free_port(),
        models=demo_models(tmp_path / "models"),
        destinations=[
            {
                "type": "dicom",
                "name": "orthanc",
                "host": "127.0.0.1",
                "port": orthanc_port,
                "called_ae": "ORTHANCTEST",
                "outputs": ["cad_sr"],
            }
        ],
        delivery={"max_attempts": 20, "initial_delay_seconds": 0.5, "max_delay_seconds": 1},
    )
    # The destination is down: the CAD SR is attempted and stays pending.
    with Serve.start(config) as service:
        storescu(exam_files(tmp_path / "exam", 71), service.port)
        (delivery,) = wait_until(
            lambda: [d for d in _deliveries(service) if d.attempts >= 1 and d.state == "pending"],
            120,
            "a failed delivery attempt",
            service,
        )
    path = (
        delivery.path
        if delivery.path.is_absolute()
        else config.parent / "var/spool" / delivery.path
    )
    # An earlier attempt did reach it (as after a crash between the send and its record).
    # Orthanc answers C-FIND only for the modalities it knows.
    known = {"ai": ("MAMMO_AI", "127.0.0.1", free_port())}
    with OrthancPeer.start(
        tmp_path / "orthanc", dicom_port=orthanc_port, modalities=known
    ) as orthanc:
        httpx.post(f"{orthanc.url}/instances", content=path.read_bytes()).raise_for_status()
        with Serve.start(config) as service:
            wait_until(
                lambda: [d for d in _deliveries(service) if d.state == "delivered"],
                60,
                "the delivery settled",
                service,
            )
            # The audit line is written after the state's commit: wait for it too.
            events = wait_until(
                lambda: [e for e in service.audit() if e["event"] == "delivered"],
                30,
                "the delivery audited",
                service,
            )
        assert len(events) == 1 and "already at the destination" in events[0]["detail"]
        assert orthanc.instance_uids() == {delivery.sop_instance_uid}
        # Orthanc saw one instance arrive (the REST upload), none by C-STORE.
        assert orthanc.get("/statistics")["CountInstances"] == 1
        assert not [
            c for c in orthanc.get("/changes")["Changes"] if c["ChangeType"] == "NewInstance"
        ][1:]
