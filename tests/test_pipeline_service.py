"""`plugin serve` with several exams in the pipeline at once: SIGKILL while they are in
flight loses nothing, leaves no pool process behind, and never gives an exam a second result
set; a flood of exams waits in the store while the worker holds only what its in-flight limit
allows.

About 100 s on 2 CPU cores (512×416 synthetic exams, the demo models, three service starts).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

from models.ensemble import default_member
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
PIPELINE = {"decode_processes": 1, "output_processes": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return demo_models(tmp_path_factory.mktemp("models"))


def folder_config(tmp: Path, models: list[Path], outputs: list[str], **worker) -> Path:
    """Results to a folder (files named by SOP Instance UID, so a second result set would
    show); a pool process per stage; the default flips; batches of two exams."""
    path = write_config(
        tmp,
        port=free_port(),
        models=models,
        destinations=[{"type": "folder", "name": "out", "path": "out", "outputs": outputs}],
        worker={"max_attempts": 5, **PIPELINE, **worker},
    )
    data = yaml.safe_load(path.read_text())
    data["models"].update(max_batch=8, max_batch_wait_ms=200)
    for member in data["models"]["members"]:
        member["flips"] = list(default_member(Path(member["path"])).flips)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (the pool processes of a service)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry.name))
    return out


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


def kill_with_exams_in_flight(service: Serve, running: int, done: int) -> None:
    """SIGKILL once `running` jobs are in the pipeline and `done` committed; its pool
    processes follow it."""
    wait_until(
        lambda: (
            (c := counts(service)["jobs"]).get("running", 0) >= running and c.get("done", 0) >= done
        ),
        180,
        f"{running} exams in flight, {done} done",
        service,
    )
    pool = children(service.process.pid)
    assert len(pool) >= 2  # a decode and an output process
    service.kill()
    wait_until(lambda: not alive(pool), 15, "the pool processes to end with their parent")


def test_sigkill_with_several_exams_in_flight(tmp_path: Path, models: list[Path]) -> None:
    exams = 4
    config = folder_config(tmp_path / "svc", models, ["cad_sr", "tid1500", "seg", "sc"])
    files = [f for n in range(exams) for f in exam_files(tmp_path / "in", 80 + n)]
    service = Serve.start(config)
    storescu(files, service.port)
    kill_with_exams_in_flight(service, running=3, done=0)
    service = Serve.start(config)
    kill_with_exams_in_flight(service, running=1, done=1)

    service = Serve.start(config)
    try:
        wait_until(
            lambda: counts(service)["deliveries"].get("delivered", 0) == exams * OBJECTS,
            240,
            "every exam delivered",
            service,
        )
        store = service.store()
        try:
            jobs = store.jobs()
            results = store.results()
        finally:
            store.close()
    finally:
        service.stop()
    assert [j.state for j in jobs] == ["done"] * exams
    assert len({j.exam_id for j in jobs}) == exams and max(j.attempts for j in jobs) >= 2
    # One result set per exam: as many objects as one analysis makes, each UID once, each
    # file in the spool what the row says; the spool holds no other set.
    assert len(results) == exams * OBJECTS
    assert len({r["sop_instance_uid"] for r in results}) == exams * OBJECTS
    for r in results:
        assert dcmread(r["path"], stop_before_pixels=True).SOPInstanceUID == r["sop_instance_uid"]
    spool = config.parent / "var/spool/results"
    assert sorted(p.name for p in spool.rglob("*.dcm")) == sorted(
        Path(r["path"]).name for r in results
    )
    assert not [p for p in spool.rglob("*") if p.name.endswith(".tmp")]
    delivered = config.parent / "out"
    assert sorted(p.stem for p in delivered.glob("*.dcm")) == sorted(
        r["sop_instance_uid"] for r in results
    )


def test_a_flood_waits_in_the_store_not_in_memory(tmp_path: Path, models: list[Path]) -> None:
    exams = 6
    config = folder_config(tmp_path / "svc", models, ["cad_sr"], max_exams_in_flight=2)
    files = [f for n in range(exams) for f in exam_files(tmp_path / "in", 90 + n)]
    service = Serve.start(config)
    try:
        storescu(files, service.port)
        running, queued = [], []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            jobs = counts(service)["jobs"]
            running.append(jobs.get("running", 0))
            queued.append(jobs.get("queued", 0))
            if jobs.get("done", 0) == exams:
                break
            time.sleep(0.1)
        assert counts(service)["jobs"] == {"done": exams}
        peak_kb = _peak_rss_kb(service.process.pid)
    finally:
        service.stop()
    assert max(running) == 2  # claimed only as room frees
    assert max(queued) >= 3  # the rest waited in the store
    assert peak_kb < 4 * 2**20, f"peak RSS {peak_kb} kB"


def _peak_rss_kb(pid: int) -> int:
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")
