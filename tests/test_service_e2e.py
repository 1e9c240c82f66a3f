"""`plugin serve` end to end with real peers: dcmtk `storescu` sends synthetic four-view exams
(uncompressed, JPEG 2000, JPEG-LS), dcmtk `storescp` receives every configured result object,
and `dciodvfy` finds no error in any of them."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.request

import pytest
from pydicom import dcmread

from plugin.cli import main
from plugin.config import load_config
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

SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",
    "jpeg2000": "1.2.840.10008.1.2.4.90",
    "jpegls": "1.2.840.10008.1.2.4.80",
}
OUTPUTS = ["cad_sr", "tid1500", "seg", "sc"]
OBJECTS_PER_EXAM = 1 + 1 + 4 + 4  # CAD SR, TID 1500 SR, a SEG and an SC per view


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("e2e")
    pacs = StoreSCP.start(tmp / "pacs", ae_title="PACS")
    http_port = free_port()
    config = write_config(
        tmp / "service",
        port=free_port(),
        http_port=http_port,
        models=demo_models(tmp / "models"),
        destinations=[
            {
                "type": "dicom",
                "name": "pacs",
                "host": "127.0.0.1",
                "port": pacs.port,
                "called_ae": "PACS",
                "outputs": OUTPUTS,
            },
            {"type": "folder", "name": "folder", "path": "results", "outputs": ["cad_sr"]},
        ],
    )
    service = Serve.start(config)
    exams = {
        syntax: exam_files(tmp / "in" / syntax, seed, syntax)
        for seed, syntax in enumerate(SYNTAXES, start=20)
    }
    for syntax, files in exams.items():
        # -xv / -xt propose the compressed syntax the files are in (plus uncompressed).
        flag = {"jpeg2000": ["-xv"], "jpegls": ["-xt"]}.get(syntax, [])
        storescu(files, service.port, extra=flag)
    wait_until(
        lambda: (
            counts(service)["deliveries"].get("delivered", 0) == len(exams) * (OBJECTS_PER_EXAM + 1)
        ),
        240,
        "every result delivered",
        service,
    )
    yield {"service": service, "pacs": pacs, "exams": exams, "tmp": tmp, "http": http_port}
    service.stop()
    pacs.stop()


def test_every_exam_is_analysed_once_and_inputs_are_stored_as_received(pipeline) -> None:
    service: Serve = pipeline["service"]
    store = service.store()
    try:
        assert store.counts()["jobs"] == {"done": 3}
        assert {e.state for e in store.exams()} == {"analysed"}
        for syntax, files in pipeline["exams"].items():
            study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            stored = store.instances(study)
            assert len(stored) == 4
            assert {i.transfer_syntax_uid for i in stored} == {SYNTAXES[syntax]}
            for inst in stored:
                assert (
                    dcmread(inst.path, stop_before_pixels=True).file_meta.TransferSyntaxUID
                    == SYNTAXES[syntax]
                )
            assert [j.partial for j in store.jobs() if j.study_instance_uid == study] == [False]
    finally:
        store.close()


def test_pacs_receives_every_configured_object_and_dciodvfy_finds_no_error(pipeline) -> None:
    received = pipeline["pacs"].received()
    assert len(received) == 3 * OBJECTS_PER_EXAM
    classes = {}
    for path in received:
        ds = dcmread(path, stop_before_pixels=True)
        classes[str(ds.SOPClassUID)] = classes.get(str(ds.SOPClassUID), 0) + 1
    assert classes == {
        "1.2.840.10008.5.1.4.1.1.88.50": 3,  # Mammography CAD SR
        "1.2.840.10008.5.1.4.1.1.88.33": 3,  # Comprehensive SR (TID 1500)
        "1.2.840.10008.5.1.4.1.1.66.4": 12,  # Segmentation
        "1.2.840.10008.5.1.4.1.1.7": 12,  # Secondary Capture
    }
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy not found; install it with `apt-get install dicom3tools`")
    for path in received:
        out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"
    # The folder destination took only what it was configured for.
    folder = pipeline["service"].config.parent / "results"
    assert len(list(folder.glob("*.dcm"))) == 3


def test_status_health_metrics_and_audit(pipeline, capsys) -> None:
    service: Serve = pipeline["service"]
    assert main(["status", "--config", str(service.config)]) == 0
    out = capsys.readouterr().out
    assert "jobs        done 3" in out and "deliveries  delivered 33" in out
    with urllib.request.urlopen(f"http://127.0.0.1:{pipeline['http']}/health") as rsp:
        health = json.load(rsp)
    assert health["ok"] and health["queues"]["deliveries_pending"] == 0
    node = socket.gethostname()  # node.name's default
    assert (health["node"], health["assembler"]) == (node, "active")
    assert health["roles"] == ["listener", "assembler", "worker", "dispatcher"]
    assert f"{node}" in out and "listener,assembler,worker,dispatcher" in out  # status: nodes
    with urllib.request.urlopen(f"http://127.0.0.1:{pipeline['http']}/metrics") as rsp:
        metrics = rsp.read().decode()
    n = f'node="{node}"'
    assert f'mammo_instances_total{{{n},outcome="accepted"}} 12.0' in metrics
    assert f'mammo_exams_total{{{n},outcome="complete"}} 3.0' in metrics
    assert (
        f'mammo_delivery_attempts_total{{destination="pacs",{n},outcome="delivered"}} 30.0'
        in metrics
    )
    for stage in ("analyse", "decode", "ensemble", "objects", "turnaround"):
        assert f'mammo_stage_seconds_count{{{n},stage="{stage}"}} 3.0' in metrics

    events = [e["event"] for e in service.audit()]
    assert events.count("received") == 12 and events.count("analysed") == 3
    assert {e["node"] for e in service.audit()} == {node}
    # The same events as committed with their transitions (`plugin audit`).
    assert main(["audit", "--config", str(service.config)]) == 0
    committed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = [e["event"] for e in committed]
    assert (kinds.count("received"), kinds.count("analysed"), kinds.count("delivered")) == (
        12,
        3,
        33,
    )
    assert events.count("delivered") == 33
    # No patient identifiers or UIDs in the logs or the audit trail.
    study = str(dcmread(pipeline["exams"]["explicit"][0], stop_before_pixels=True).StudyInstanceUID)
    patient = str(dcmread(pipeline["exams"]["explicit"][0], stop_before_pixels=True).PatientID)
    audit_text = (service.config.parent / "var" / "audit.jsonl").read_text()
    for text in (service.log, audit_text, json.dumps(committed)):
        assert study not in text and patient not in text


def test_the_warm_up_exam_leaves_nothing_behind(pipeline) -> None:
    """Before its first job the worker analysed a synthetic exam (`plugin.warm_up`): the log
    says so, and nothing of it remains: no job, result or delivery (the counts and metrics in
    the test above are the three sent exams' alone) and no file in the spool."""
    service: Serve = pipeline["service"]
    lines = [json.loads(line) for line in service.log.splitlines() if line.startswith("{")]
    said = [e["msg"] for e in lines]
    assert [m for m in said if "warm-up" in m] == ["warm-up analysis done"]
    assert said.index("warm-up analysis done") < said.index("exam analysed")  # before any job
    assert lines[said.index("warm-up analysis done")]["seconds"] > 0
    warm_up = load_config(service.config).storage.spool / "warm-up"
    assert warm_up.is_dir() and not any(warm_up.iterdir())


def test_resent_exam_is_a_duplicate_not_a_new_analysis(pipeline) -> None:
    service: Serve = pipeline["service"]
    storescu(pipeline["exams"]["explicit"], service.port)
    store = service.store()
    try:
        assert store.counts()["instances"] == {"accepted": 12}
        assert store.counts()["jobs"] == {"done": 3}
    finally:
        store.close()
    assert [e["event"] for e in service.audit()].count("duplicate") == 4


def test_plugin_demo_shows_what_came_back_and_where(pipeline, capsys) -> None:
    service: Serve = pipeline["service"]
    assert main(["demo", "--config", str(service.config), "--seed", "5", "--timeout", "120"]) == 0
    out = capsys.readouterr().out
    assert "C-STORE R-MLO: 0x0000" in out and "exam malignancy score" in out
    assert out.count("delivered") == OBJECTS_PER_EXAM + 1
    assert f"folder → {service.config.parent / 'results'}" in out


def test_sigterm_drains_and_exits_cleanly(pipeline) -> None:
    service: Serve = pipeline["service"]
    assert service.stop() == 0
    assert '"msg": "stopped"' in service.log
