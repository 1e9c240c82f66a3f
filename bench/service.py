"""Service benchmark: listener ingest throughput against dcmtk's storescp on the same files in
the same run, exam turnaround (last image acknowledged → every result delivered) of
`plugin serve`, and scale-out: ingest MB/s and exams/s with 1 and 2 worker processes on
PostgreSQL against SQLite, in the same run.

    python bench/service.py [--images 16] [--size 2048x1664] [--exams 8] [--scale-exams 8]

Prints a table; the ingest ratio (ours / storescp) is the figure to compare across machines.
Needs dcmtk (storescu, storescp).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.ensemble import default_member  # noqa: E402
from plugin.config import ListenerConfig  # noqa: E402
from plugin.listener import Listener  # noqa: E402
from plugin.observability import AuditTrail, Metrics  # noqa: E402
from plugin.store import Store  # noqa: E402
from tests.support.dcmtk_peer import free_port  # noqa: E402
from trainer.synth import synth_exam  # noqa: E402


def dcmtk(name: str) -> str:
    for folder in ["/usr/bin", "/usr/local/bin", *os.environ.get("PATH", "").split(os.pathsep)]:
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            out = subprocess.run([path, "--version"], capture_output=True, text=True)
            if "dcmtk" in (out.stdout + out.stderr).lower():
                return str(path)
    sys.exit(f"dcmtk's {name} not found; install it with `apt-get install dcmtk`")


def wait_port(port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def make_images(folder: Path, count: int, rows: int, cols: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    seed = 0
    while len(paths) < count:
        for image in synth_exam(seed, rows=rows, cols=cols).images[: count - len(paths)]:
            path = folder / f"{seed}-{image.view_key}.dcm"
            image.dataset.save_as(path, enforce_file_format=True)
            paths.append(path)
        seed += 1
    return paths


def send(files: list[Path], port: int, called: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            dcmtk("storescu"),
            "-aet",
            "BENCH",
            "-aec",
            called,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def ingest_storescp(files: list[Path], work: Path) -> float:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "SCP", "-od", str(out), "+xa", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        return send(files, port, "SCP")
    finally:
        proc.terminate()
        proc.wait()


def ingest_listener(files: list[Path], work: Path) -> float:
    # One spool for every run: a process receives into one folder (plugin.listener.receive_into).
    spool = work.parent / "listener-spool"
    store = Store(work / "listener" / "db.sqlite", spool)
    listener = Listener(
        ListenerConfig(port=free_port()),
        store,
        min_free_bytes=0,
        audit=AuditTrail(work / "listener" / "audit.jsonl"),
        metrics=Metrics(),
    )
    port = listener.start()
    try:
        return send(files, port, "MAMMO_AI")
    finally:
        listener.stop()
        store.close()
        for entry in spool.iterdir():  # the next run starts empty, like storescp's
            if entry.is_dir() and entry.name != ".incoming":
                shutil.rmtree(entry)
            elif entry.is_file():
                entry.unlink()


def write_exam(seed: int, folder: Path, rows: int, cols: int) -> list[Path]:
    """One synthetic four-view exam as DICOM files in `folder`, named by seed and view."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in synth_exam(seed, rows=rows, cols=cols).images:
        path = folder / f"{seed}-{image.view_key}.dcm"
        image.dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def model_files(work: Path) -> list[Path]:
    shipped = [
        REPO / "models/weights/demo-gmic.safetensors",
        REPO / "models/weights/demo-allconv.safetensors",
    ]
    if all(p.is_file() for p in shipped):
        return shipped
    from models.allconv import PRESETS as ALLCONV
    from models.gmic import PRESETS as GMIC
    from models.modelfile import new_model_file

    return [
        new_model_file(
            work / f"bench-{family}.safetensors", family, presets["demo"], name=f"bench-{family}"
        )
        for family, presets in (("gmic", GMIC), ("allconv", ALLCONV))
    ]


def turnaround(work: Path, exams: int, rows: int, cols: int, device: str) -> dict[str, list]:
    folder = work / "service"
    port = free_port()
    config = {
        "listener": {"port": port},
        "storage": {"spool": "var/spool", "database": "var/db.sqlite", "min_free_mb": 1},
        "exams": {"settle_seconds": 1, "quiet_seconds": 30, "max_wait_seconds": 120},
        "models": {
            "members": [
                {"path": str(p), "flips": list(default_member(p).flips)} for p in model_files(work)
            ],
            "device": device,
        },
        "destinations": [{"type": "folder", "name": "folder", "path": "results"}],
        "delivery": {"poll_seconds": 0.1},
        "observability": {"http_port": None, "audit_log": "var/audit.jsonl"},
    }
    folder.mkdir()
    (folder / "config.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "plugin.cli", "serve", "--config", str(folder / "config.yml")],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=(folder / "serve.log").open("wb"),
    )
    try:
        wait_port(port, 120)
        for seed in range(exams):
            send(write_exam(1000 + seed, folder / "in", rows, cols), port, "MAMMO_AI")
            # One exam at a time: the figure is the latency of one exam, not queueing.
            store = Store(folder / "var/db.sqlite", folder / "var/spool")
            try:
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    c = store.counts()
                    if (
                        c["jobs"].get("done", 0) == seed + 1
                        and not c["deliveries"].get("pending")
                        and not c["deliveries"].get("sending")
                    ):
                        break
                    time.sleep(0.05)
            finally:
                store.close()
        store = Store(folder / "var/db.sqlite", folder / "var/spool")
        times = store.job_times()
        store.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return {
        "turnaround": [t.delivered - t.last_received for t in times],
        "analysis": [t.finished - t.started for t in times],
    }


def scale_out(
    work: Path, backend: str, workers: int, exams: list[list[Path]], device: str
) -> dict[str, float]:
    """One listener + assembler + dispatcher process and `workers` worker processes on one
    store: ingest MB/s (every exam sent back to back) and exams/s (first image sent to the
    last result delivered)."""
    folder = work / f"scale-{backend}-{workers}"
    folder.mkdir()
    env = dict(os.environ)
    server = None
    if backend == "postgresql":
        from tests.support.pg_server import PASSWORD_ENV, PostgresServer

        server = PostgresServer.start()
        env[PASSWORD_ENV] = server.password
        os.environ[PASSWORD_ENV] = server.password
        storage = {"database": server.create_database("bench"), "password_env": PASSWORD_ENV}
    else:
        storage = {"database": str(folder / "db.sqlite")}
    procs: list[subprocess.Popen] = []
    port = free_port()
    roles = [("core", "listener,assembler,dispatcher")] + [
        (f"worker-{i}", "worker") for i in range(workers)
    ]
    try:
        for name, role in roles:
            config = {
                "listener": {"port": port},
                "storage": {"spool": str(folder / "spool"), "min_free_mb": 1, **storage},
                "exams": {"settle_seconds": 0.5, "quiet_seconds": 30, "max_wait_seconds": 120},
                "models": {
                    "members": [{"path": str(p)} for p in model_files(work)],
                    "device": device,
                },
                "destinations": [{"type": "folder", "name": "folder", "path": "results"}],
                "delivery": {"poll_seconds": 0.1},
                "observability": {"http_port": None, "audit_log": str(folder / "audit.jsonl")},
                "node": {"name": name},
            }
            path = folder / f"{name}.yml"
            path.write_text(yaml.safe_dump(config))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "plugin.cli", "serve", "--config", str(path)]
                    + ["--roles", role],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=(folder / f"{name}.log").open("wb"),
                )
            )
        wait_port(port, 120)
        deadline = time.monotonic() + 180
        for name, _ in roles:  # every worker has loaded its models
            log = folder / f"{name}.log"
            while "plugin serve:" not in log.read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        files = [f for exam in exams for f in exam]
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        started = time.perf_counter()
        sent = send(files, port, "MAMMO_AI")
        password = server.password if server else None
        store = Store(storage["database"], folder / "spool", password=password, claimant="bench")
        c: dict = {}
        try:
            deadline = time.monotonic() + 1200
            while time.monotonic() < deadline:
                c = store.counts()
                if c["jobs"].get("done", 0) == len(exams) and set(c["deliveries"]) == {"delivered"}:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError(f"scale-out run {backend}/{workers} did not finish: {c}")
        finally:
            store.close()
        elapsed = time.perf_counter() - started
        return {"ingest_mb_s": megabytes / sent, "exams_s": len(exams) / elapsed}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if server is not None:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="files for the ingest test")
    parser.add_argument("--size", default="2048x1664", help="ingest image size ROWSxCOLS")
    parser.add_argument("--exams", type=int, default=8, help="exams for the turnaround test")
    parser.add_argument("--exam-size", default="1024x832", help="turnaround image size")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--scale-exams", type=int, default=8, help="exams for the scale-out runs (0: skip)"
    )
    parser.add_argument("--scale-size", default="1024x832", help="scale-out image size")
    args = parser.parse_args()
    rows, cols = map(int, args.size.lower().split("x"))
    erows, ecols = map(int, args.exam_size.lower().split("x"))

    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        work = Path(tmp)
        files = make_images(work / "files", args.images, rows, cols)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        # Alternate and repeat so page cache and warm-up favour neither.
        ours, theirs = [], []
        for run in range(2):
            for name, fn, out in (
                ("storescp", ingest_storescp, theirs),
                ("listener", ingest_listener, ours),
            ):
                sub = work / f"{name}-{run}"
                sub.mkdir()
                out.append(megabytes / fn(files, sub))
                shutil.rmtree(sub)
        times = turnaround(work, args.exams, erows, ecols, args.device)
        scale: dict[tuple[str, int], dict[str, float]] = {}
        if args.scale_exams:
            srows, scols = map(int, args.scale_size.lower().split("x"))
            exams = [
                write_exam(2000 + seed, work / "scale-in", srows, scols)
                for seed in range(args.scale_exams)
            ]
            backends = ["sqlite"]
            if _postgres_installed():
                backends.append("postgresql")
            else:
                print("PostgreSQL server binaries not found: scale-out on SQLite only")
            for workers in (1, 2):
                for backend in backends:
                    scale[(backend, workers)] = scale_out(
                        work, backend, workers, exams, args.device
                    )

    import torch

    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    ta, an = sorted(times["turnaround"]), sorted(times["analysis"])

    def p95(values: list[float]) -> float:
        return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]

    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, device {device}"
    )
    print(f"{'figure':52} {'value':>12}")
    print(f"{'ingest files':52} {f'{args.images} x {rows}x{cols}':>12}")
    print(f"{'ingest data (MB)':52} {megabytes:12.1f}")
    print(f"{'dcmtk storescp MB/s (best of 2)':52} {max(theirs):12.1f}")
    print(f"{'plugin listener MB/s (fsync + SQLite commit, best of 2)':52} {max(ours):12.1f}")
    print(f"{'ratio listener / storescp':52} {max(ours) / max(theirs):12.2f}")
    print(f"{'exams (four views, ' + f'{erows}x{ecols}, 2 models x 2 flips)':52} {len(ta):12d}")
    print(f"{'turnaround median s (last image -> all delivered)':52} {statistics.median(ta):12.2f}")
    print(f"{'turnaround p95 s':52} {p95(ta):12.2f}")
    print(f"{'  of which analysis median s':52} {statistics.median(an):12.2f}")
    print(f"{'  (settle time, included above, s)':52} {1.0:12.2f}")
    if scale:
        print(f"\nscale-out: {args.scale_exams} exams of {args.scale_size}, one listener process")
        print(f"{'store':12} {'workers':>8} {'ingest MB/s':>12} {'exams/s':>10} {'vs SQLite':>10}")
        for (backend, workers), fig in scale.items():
            base = scale[("sqlite", workers)]["exams_s"]
            print(
                f"{backend:12} {workers:8d} {fig['ingest_mb_s']:12.1f} {fig['exams_s']:10.3f}"
                f" {fig['exams_s'] / base:10.2f}"
            )
    return 0


def _postgres_installed() -> bool:
    from tests.support.pg_server import postgres_bindir

    return postgres_bindir() is not None


if __name__ == "__main__":
    sys.exit(main())
