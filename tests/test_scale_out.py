"""kill -9 across processes: two listeners, two workers and an assembler + dispatcher, as
separate `plugin serve --roles …` processes sharing a real PostgreSQL (started here) and one
spool. Exams go to both listeners with dcmtk's storescu (a listener that dies mid-exam makes
the sender re-send what was not acknowledged, to the other one, as a PACS would) while
processes of every kind are killed with SIGKILL at random moments and started again.

Then: every acknowledged instance is in the spool and was analysed; each exam version has
exactly one analysis and one result set; every result reached the PACS; and the claims trail
(written in the transactions it describes) shows no job or delivery held by two processes at
once. The embedded default (SQLite, one process with every role) passes the same check.

Measured on two busy cores: PostgreSQL variant 137 s, SQLite 39 s, device workers 23 s,
assembler takeover 14 s (the PostgreSQL server itself starts in about 3 s).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import pytest
from pydicom import dcmread

from plugin.config import load_config
from plugin.store import Store
from tests.support.dcmtk_peer import StoreSCP
from tests.support.pg_server import PASSWORD_ENV, PostgresServer
from tests.support.service_harness import (
    Serve,
    demo_models,
    exam_files,
    free_port,
    storescu,
    wait_until,
    write_config,
)

OBJECTS = 10  # per exam: CAD SR, TID 1500, 4 SEG, 4 SC
LEASE = 4.0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return demo_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer.start() as server:
        yield server


@dataclass
class Proc:
    """One `plugin serve` process of the cluster, started again after each kill."""

    name: str
    kind: str
    roles: tuple[str, ...]
    config: Path
    serve: Serve | None = None
    kills: int = 0

    def start(self) -> None:
        self.serve = Serve.start(self.config, roles=self.roles, timeout=120)

    def kill(self) -> None:
        assert self.serve is not None
        self.serve.kill()
        self.kills += 1


@dataclass
class Cluster:
    procs: list[Proc]
    acked: set[str] = field(default_factory=set)
    """SOP Instance UIDs a listener acknowledged (0x0000)."""
    failed_sends: int = 0
    sending_to: Proc | None = None
    in_flight_kills: int = 0
    """Kills that hit a process in the middle of a transfer, a job or a send."""

    def listeners(self) -> list[Proc]:
        return [p for p in self.procs if "listener" in p.roles]

    def stop(self) -> None:
        for p in self.procs:
            if p.serve is not None:
                p.serve.stop()


def _acknowledged(output: str) -> list[Path]:
    """The files storescu -v saw answered with Success."""
    acked, current = [], None
    for line in output.splitlines():
        if m := re.search(r"Sending file: (.+)$", line):
            current = Path(m.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            current = None
    return acked


def _send_exams(cluster: Cluster, exams: list[list[Path]], rng: random.Random) -> None:
    """Each exam to one listener; what was not acknowledged goes again, to the next one."""
    uid = {}
    for files in exams:
        for f in files:
            uid[f] = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
    for i, files in enumerate(exams):
        todo = list(files)
        turn = i
        deadline = time.monotonic() + 240
        while todo and time.monotonic() < deadline:
            listener = cluster.listeners()[turn % len(cluster.listeners())]
            turn += 1
            cluster.sending_to = listener
            result = storescu(todo, listener.serve.port, extra=["-v"], check=False)
            cluster.sending_to = None
            done = set(_acknowledged(result.stdout + result.stderr))
            cluster.acked.update(uid[f] for f in done)
            if len(done) < len(todo):
                cluster.failed_sends += 1
                time.sleep(1.0)
            todo = [f for f in todo if f not in done]
        assert not todo, "an exam could not be sent within 4 minutes"
        time.sleep(rng.uniform(1.0, 5.0))  # exams keep coming while processes die


def _busy(cluster: Cluster, victim: Proc, store: Store) -> bool:
    """Whether the process is in the middle of something: a transfer to it, a job or a send
    under its lease."""
    if "listener" in victim.roles:
        return cluster.sending_to is victim
    kind = "job" if "worker" in victim.roles else "delivery"
    return any(x.kind == kind and x.owner == victim.name for x in store.leases())


def _killer(
    cluster: Cluster, kills: int, rng: random.Random, stop: threading.Event, storage: Path
) -> None:
    """SIGKILL a process of each kind in turn, at a random moment while one of that kind is
    busy (or after a few seconds of waiting for that), and start it again in the background:
    at once, or (a worker, sometimes) only after its lease has run out, so that the other
    worker takes its job over. Kills go on while the victims restart."""
    store = Store.open(load_config(storage).storage, claimant="test-killer")
    kinds = sorted({p.kind for p in cluster.procs})
    down: set[str] = set()
    restarts: list[threading.Thread] = []

    def restart(victim: Proc, delay: float) -> None:
        time.sleep(delay)
        victim.start()
        down.discard(victim.name)

    try:
        for n in range(kills):
            if stop.wait(rng.uniform(0.2, 1.0)):
                return
            kind = kinds[n % len(kinds)]
            up: list[Proc] = []
            while not up:  # one of the kind is running (not still restarting)
                up = [p for p in cluster.procs if p.kind == kind and p.name not in down]
                time.sleep(0.05)
            deadline = time.monotonic() + 10
            busy: list[Proc] = []
            while not busy and time.monotonic() < deadline:
                busy = [p for p in up if p.name not in down and _busy(cluster, p, store)]
                time.sleep(0.01)
            of_kind = [p for p in up if p.name not in down]
            victim = rng.choice(busy or of_kind)
            time.sleep(rng.uniform(0.0, 0.05 if "listener" in victim.roles else 0.5))
            victim.kill()
            cluster.in_flight_kills += bool(busy)
            down.add(victim.name)
            late = "worker" in victim.roles and len(cluster.procs) > 1 and rng.random() < 0.5
            delay = LEASE + 2 if late else rng.uniform(0.0, 1.0)
            restarts.append(threading.Thread(target=restart, args=(victim, delay)))
            restarts[-1].start()
    finally:
        for thread in restarts:
            thread.join(180)
        store.close()


def _wait_settled(cluster: Cluster, observer: Serve, exams: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        store = observer.store()
        try:
            counts = store.counts()
        finally:
            store.close()
        last = counts
        busy = (
            counts["exams"].get("collecting", 0)
            + counts["jobs"].get("queued", 0)
            + counts["jobs"].get("running", 0)
            + counts["deliveries"].get("pending", 0)
            + counts["deliveries"].get("sending", 0)
        )
        if counts["exams"].get("analysed", 0) == exams and not busy:
            return
        for p in cluster.procs:
            assert p.serve is not None and p.serve.running(), f"{p.name} exited:\n{p.serve.log}"
        time.sleep(0.5)
    raise AssertionError(f"not settled after {timeout} s: {last}")


def _check(
    cluster: Cluster, observer: Serve, pacs: StoreSCP, exams: int, audit_path: Path
) -> dict[str, int]:
    """The exactly-once checks; returns the figures."""
    store = observer.store()
    try:
        studies = {e.study_instance_uid: e for e in store.exams()}
        instances = [i for s in studies for i in store.instances(s)]
        jobs = store.jobs()
        results = store.results()
        deliveries = store.deliveries()
        claims = store.claims()
    finally:
        store.close()
    by_uid = {i.sop_instance_uid: i for i in instances}
    lost = [u for u in cluster.acked if u not in by_uid or not by_uid[u].path.is_file()]
    assert not lost, f"acknowledged instances missing: {len(lost)}"
    assert len(studies) == exams

    done = [j for j in jobs if j.state == "done"]
    assert {j.state for j in jobs} == {"done"}
    per_version = Counter((j.exam_id, j.version) for j in done)
    duplicated = sum(n - 1 for n in per_version.values())
    assert duplicated == 0, per_version
    analysed = {i for j in done for i in j.instance_ids}
    not_analysed = [u for u in cluster.acked if by_uid[u].id not in analysed]
    assert not not_analysed
    latest = {e.id: e.version for e in studies.values()}
    for j in done:
        if j.version == latest[j.exam_id]:
            assert len(j.instance_ids) == 4 and not j.partial

    per_job = Counter(r["job_id"] for r in results)
    assert all(per_job[j.id] == OBJECTS for j in done)
    assert len({(r["job_id"], r["sop_instance_uid"]) for r in results}) == len(results)
    assert len(deliveries) == len(results)
    assert {d.state for d in deliveries} == {"delivered"}
    received = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in pacs.received()}
    assert received == {r["sop_instance_uid"] for r in results}

    # The claims trail: never two holders of one row at once, every claim settled.
    held: dict[tuple[str, int], list] = defaultdict(list)
    for c in claims:
        assert c.released_at is not None, c
        held[(c.kind, c.row_id)].append(c)
    overlaps = 0
    for trail in held.values():
        trail.sort(key=lambda c: c.claimed_at)
        overlaps += sum(b.claimed_at < a.released_at for a, b in pairwise(trail))
    assert overlaps == 0

    # The committed audit events: one "analysed" per exam version, by a worker.
    store = observer.store()
    try:
        events = store.events()
    finally:
        store.close()
    committed = Counter(
        (e.study_instance_uid, e.detail["version"]) for e in events if e.event == "analysed"
    )
    assert sorted(committed.values()) == [1] * len(done)
    assert {e.node for e in events if e.event == "analysed"} <= {
        p.name for p in cluster.procs if "worker" in p.roles
    }
    assert sum(e.event == "delivered" for e in events) == len(deliveries)
    assert {e.detail["sop_instance"] for e in events if e.event == "received"} >= cluster.acked

    audit = [json.loads(line) for line in audit_path.read_text().splitlines()]
    analysed_events = Counter((e["study"], e["version"]) for e in audit if e["event"] == "analysed")
    assert max(analysed_events.values()) == 1  # a killed worker may not have written its line
    workers = {p.name for p in cluster.procs if "worker" in p.roles}
    assert {e["node"] for e in audit if e["event"] == "analysed"} <= workers
    return {
        "kills": sum(p.kills for p in cluster.procs),
        "kills_in_flight": cluster.in_flight_kills,
        "instances": len(cluster.acked),
        "exams": len(studies),
        "versions": len(done),
        "results": len(results),
        "deliveries": len(deliveries),
        "lost": len(lost),
        "duplicated": duplicated,
        "claims": len(claims),
        "taken_over": sum(c.outcome in ("expired", "restart") for c in claims),
        "incomplete_sends": cluster.failed_sends,
    }


def _config(
    folder: Path,
    name: str,
    models: list[Path],
    pacs: StoreSCP,
    storage: dict,
    shared: Path,
    http_port: int | None = None,
    **worker: object,
) -> Path:
    return write_config(
        folder / name,
        port=free_port(),
        models=models,
        destinations=[
            {
                "type": "dicom",
                "name": "pacs",
                "host": "127.0.0.1",
                "port": pacs.port,
                "called_ae": "PACS",
            }
        ],  # fmt: skip
        storage={"spool": str(shared / "spool"), "lease_seconds": LEASE, **storage},
        node={"name": name},
        exams={"settle_seconds": 1, "quiet_seconds": 20, "max_wait_seconds": 120},
        worker={"max_attempts": 20, "retry_delay_seconds": 1, **worker},
        observability={"audit_log": str(shared / "audit.jsonl"), "http_port": http_port},
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_kill9_across_processes_loses_and_duplicates_nothing(
    backend: str,
    tmp_path: Path,
    models: list[Path],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(15)
    shared = tmp_path / "shared"
    # The PACS takes a moment per object, so that sends are in flight when a dispatcher dies.
    pacs = StoreSCP.start(tmp_path / "pacs", ae_title="PACS", extra_args=["--sleep-after", "0.2"])
    if backend == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        monkeypatch.setenv(PASSWORD_ENV, server.password)
        storage = {"database": server.create_database("scale"), "password_env": PASSWORD_ENV}
        layout = [
            ("listener-1", "listener", ("listener",)),
            ("listener-2", "listener", ("listener",)),
            ("worker-1", "worker", ("worker",)),
            ("worker-2", "worker", ("worker",)),
            ("core", "assembler+dispatcher", ("assembler", "dispatcher")),
        ]
        exams, kills = 6, 12
    else:
        storage = {"database": str(shared / "db.sqlite")}
        layout = [("all", "all", ("listener", "assembler", "worker", "dispatcher"))]
        exams, kills = 3, 3
    cluster = Cluster(
        [
            Proc(name, kind, roles, _config(tmp_path, name, models, pacs, storage, shared))
            for name, kind, roles in layout
        ]
    )
    files = [exam_files(tmp_path / "exams", 150 + i) for i in range(exams)]
    stop = threading.Event()
    try:
        for p in cluster.procs:
            p.start()
        killer = threading.Thread(
            target=_killer, args=(cluster, kills, rng, stop, cluster.procs[0].config)
        )
        killer.start()
        _send_exams(cluster, files, rng)
        killer.join(300)
        observer = cluster.procs[-1].serve
        _wait_settled(cluster, observer, exams, timeout=240)
        figures = _check(cluster, observer, pacs, exams, shared / "audit.jsonl")
        assert figures["kills"] == kills
        assert {p.kind for p in cluster.procs if p.kills} == {p.kind for p in cluster.procs}
        print(f"\nkill -9 figures ({backend}): {json.dumps(figures)}")
    finally:
        stop.set()
        cluster.stop()
        pacs.stop()


@pytest.mark.slow
def test_worker_devices_run_as_supervised_processes(tmp_path: Path, models: list[Path]) -> None:
    """`worker.devices` starts one worker process per device, named NODE.DEVICE; one that
    dies is started again; SIGTERM to the parent drains the children too."""
    shared = tmp_path / "shared"
    pacs = StoreSCP.start(tmp_path / "pacs", ae_title="PACS")
    storage = {"database": str(shared / "db.sqlite")}
    config = _config(tmp_path, "gpu-host", models, pacs, storage, shared, devices=["cpu"])
    service = Serve.start(config)
    try:
        wait_until(lambda: "workers on cpu" in service.log, 60, "the device workers", service)

        def analysed(n: int) -> list[str]:
            store = service.store()
            try:
                done = [c.owner for c in store.claims("job") if c.outcome == "done"]
                return done if len(done) >= n else []
            finally:
                store.close()

        def child_pid() -> int | None:
            store = service.store()
            try:
                nodes = {n.claimant: n for n in store.nodes()}
            finally:
                store.close()
            child = nodes.get("gpu-host.cpu")
            return None if child is None or child.stopped_at else child.pid

        storescu(exam_files(tmp_path / "a", 160), service.port)
        assert wait_until(lambda: analysed(1), 120, "the first exam", service) == ["gpu-host.cpu"]
        first = child_pid()
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: child_pid() not in (None, first), 120, "the worker restarted", service)
        storescu(exam_files(tmp_path / "b", 161), service.port)
        owners = wait_until(lambda: analysed(2), 120, "the second exam", service)
        assert owners == ["gpu-host.cpu", "gpu-host.cpu"]
        second = child_pid()
        assert service.stop() == 0
        store = service.store()
        try:
            assert {n.claimant: n.roles for n in store.nodes()} == {
                "gpu-host": "listener,assembler,dispatcher",
                "gpu-host.cpu": "worker",
            }
            assert all(n.stopped_at for n in store.nodes())  # both drained
        finally:
            store.close()
        with pytest.raises(ProcessLookupError):
            os.kill(second, 0)
    finally:
        service.stop()
        pacs.stop()


def _health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as rsp:
            return json.load(rsp)
    except urllib.error.HTTPError as exc:  # 503 still carries the report
        return json.load(exc)


def test_one_assembler_is_active_and_a_standby_takes_over(
    tmp_path: Path,
    models: list[Path],
    postgres: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, postgres.password)
    storage = {"database": postgres.create_database("assemblers"), "password_env": PASSWORD_ENV}
    shared = tmp_path / "shared"
    pacs = StoreSCP.start(tmp_path / "pacs", ae_title="PACS")
    http = free_port()
    first = Serve.start(
        _config(tmp_path, "asm-1", models, pacs, storage, shared), roles=["assembler"]
    )
    second = None
    try:
        active = "this process is the active assembler"
        wait_until(lambda: active in first.log, 30, "the first assembler", first)
        config = _config(tmp_path, "asm-2", models, pacs, storage, shared, http_port=http)
        second = Serve.start(config, roles=["assembler"])
        wait_until(lambda: _health(http).get("assembler") == "standby", 30, "standby", second)
        time.sleep(2 * LEASE / 4)  # it tried the lock again: still standby
        health = _health(http)
        assert (health["assembler"], health["ok"], health["roles"]) == (
            "standby",
            True,
            ["assembler"],
        )
        first.kill()
        wait_until(lambda: _health(http).get("assembler") == "active", 30, "takeover", second)
        assert active in second.log
    finally:
        first.stop()
        if second is not None:
            second.stop()
        pacs.stop()
