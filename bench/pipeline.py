"""Analysis pipeline benchmark: a stream of four-view exams (3328×2560, uncompressed and
JPEG 2000) through the service's real worker path, against the forward-only ceiling measured
in the same run on the same batches.

    python bench/pipeline.py [--exams 32] [--models published,demo] [--precision bf16]

Per row: the exams are received by the listener and queued by the assembler first (not timed);
then a worker-only service analyses them, and the store's claims give each exam's latency from
claim to commit. The worker warms up first, as it does by default (`plugin.warm_up`), and
claims nothing meanwhile; the warm-up exam is in no figure. `stream` claims as the pipeline has
room (the configured defaults); `lone` feeds one exam at a time (the latency a lone exam sees);
`serial` is one exam at a time without pool processes, the worker as it was before the
pipeline; `pools` streams with one decode and one output process (what the defaults give from 4
CPUs on). The forward-only ceiling replays the ensemble's batches (the images of each
`predict_exams` call, views × flips in chunks of `models.max_batch`) through the member modules
alone. Each row also gives the median time an exam spent in each of the pipeline's stages,
waits included (`plugin.pipeline.StageTimes`: decode, ensemble, objects, and of the last the
build and the durable writes as measured where they ran).

`published` = GMIC published architecture ×2 flips + all-conv ResNet-50 ×4 flips, random
weights (the architectures' cost, not their scores); `demo` = the shipped demo models with
the shipped config's flips. Needs dcmtk's storescu.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.compute_thread import on_compute_thread  # noqa: E402
from models.ensemble import FLIPS, resolve_device  # noqa: E402
from models.family import get_family  # noqa: E402
from models.mammogram import Mammogram  # noqa: E402
from models.modelfile import load_model, new_model_file  # noqa: E402
from models.numerics import PRECISIONS, autocast  # noqa: E402
from plugin.allocator import keep_freed_memory  # noqa: E402
from plugin.config import load_config, machine_cpus  # noqa: E402
from plugin.pipeline import Outcome, StageTimes  # noqa: E402
from plugin.service import Service  # noqa: E402
from trainer.synth import encode, synth_exam  # noqa: E402

ROWS, COLS = 3328, 2560


def demo_models() -> list[tuple[Path, list[str]]]:
    """The shipped `config.yml`'s members and flips: what `make serve` runs."""
    members = load_config(REPO / "config.yml").models.members
    return [(REPO / m.path, list(m.flips)) for m in members]


PROPOSE = {"explicit": [], "jpeg2000": ["-xv"]}
"""storescu's options to send each syntax as it is stored."""
MODES = {
    "stream": {},
    "lone": {"max_exams_in_flight": 1},
    "serial": {"max_exams_in_flight": 1, "decode_processes": 0, "output_processes": 0},
    "pools": {"decode_processes": 1, "output_processes": 1},
}


@dataclass(frozen=True)
class Row:
    models: str
    syntax: str
    mode: str
    exams: int
    seconds: float
    latencies: list[float]
    forward_seconds: float
    batches: int
    stages: dict[str, float]
    """Median seconds per exam of each pipeline stage (`plugin.pipeline.StageTimes`)."""

    @property
    def exams_per_s(self) -> float:
        return self.exams / self.seconds

    @property
    def ceiling(self) -> float:
        return self.exams / self.forward_seconds


# -- inputs ---------------------------------------------------------------------------------------


def storescu() -> str:
    """dcmtk's storescu (pynetdicom installs a script of the same name)."""
    for folder in ["/usr/bin", "/usr/local/bin", *os.environ.get("PATH", "").split(os.pathsep)]:
        path = Path(folder) / "storescu"
        if path.is_file() and os.access(path, os.X_OK):
            out = subprocess.run([path, "--version"], capture_output=True, text=True)
            if "dcmtk" in (out.stdout + out.stderr).lower():
                return str(path)
    sys.exit("dcmtk's storescu not found; install it with `apt-get install dcmtk`")


def make_exams(folder: Path, count: int, syntax: str) -> list[list[Path]]:
    """`count` four-view exams: one synthetic exam (3328×2560) encoded once, copied under
    new Study/Series/SOP Instance UIDs (the pixel data, compressed or not, is shared)."""
    from pydicom.uid import generate_uid

    images = synth_exam(7, rows=ROWS, cols=COLS, malignant=True, benign=False).images
    sources = [
        img.dataset if syntax == "explicit" else encode(img.dataset, syntax) for img in images
    ]
    exams = []
    for n in range(count):
        study, series = generate_uid(), generate_uid()
        files = []
        for k, ds in enumerate(sources):
            copy_ = copy.copy(ds)
            copy_.file_meta = copy.copy(ds.file_meta)
            copy_.StudyInstanceUID, copy_.SeriesInstanceUID = study, series
            copy_.SOPInstanceUID = generate_uid()
            copy_.file_meta.MediaStorageSOPInstanceUID = copy_.SOPInstanceUID
            path = folder / f"{n}-{k}.dcm"
            copy_.save_as(path, enforce_file_format=True)
            files.append(path)
        exams.append(files)
    return exams


def published_models(folder: Path) -> list[tuple[Path, list[str]]]:
    from models.allconv import PRESETS as ALLCONV
    from models.gmic import PRESETS as GMIC

    torch.manual_seed(0)
    gmic, allconv = folder / "gmic-published.safetensors", folder / "allconv-resnet50.safetensors"
    new_model_file(gmic, "gmic", GMIC["published"], name="gmic-published-random")
    new_model_file(allconv, "allconv", ALLCONV["resnet50"], name="allconv-resnet50-random")
    return [(gmic, ["none", "vflip"]), (allconv, ["none", "hflip", "vflip", "hvflip"])]


# -- one row ---------------------------------------------------------------------------------------


def write_config(
    folder: Path, members: list[tuple[Path, list[str]]], args: argparse.Namespace, mode: str
) -> Path:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = {
        "listener": {"port": port},
        "storage": {"spool": "var/spool", "database": "var/db.sqlite", "min_free_mb": 1},
        "exams": {"settle_seconds": 0.5, "quiet_seconds": 600, "max_wait_seconds": 900},
        "models": {
            "members": [{"path": str(p), "flips": flips} for p, flips in members],
            "device": args.device,
            "precision": args.precision,
            "max_batch": args.max_batch,
        },
        "worker": MODES[mode],
        "destinations": [{"type": "folder", "name": "folder", "path": "results"}],
        "observability": {
            "http_port": None,
            "audit_log": "var/audit.jsonl",
            "log_level": "WARNING",
        },
    }
    folder.mkdir(parents=True)
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.05)


def receive(config: Path, port: int, exams: list[list[Path]], syntax: str) -> None:
    """The exams through a listener and assembler (`plugin serve`, not timed) until every
    one is a queued job."""
    from plugin.store import Store

    serve = subprocess.Popen(
        [sys.executable, "-m", "plugin.cli", "serve", "--config", str(config)]
        + ["--roles", "listener,assembler"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=(config.parent / "receive.log").open("wb"),
    )
    try:
        wait(lambda: _listening(port), 120, "the listener")
        for files in exams:
            subprocess.run(
                [storescu(), *PROPOSE[syntax], "-aec", "MAMMO_AI", "127.0.0.1", str(port)]
                + list(map(str, files)),
                check=True,
                capture_output=True,
            )
        store = Store.open(load_config(config).storage, claimant="bench")
        try:
            wait(
                lambda: store.counts()["jobs"].get("queued", 0) == len(exams),
                300,
                "every exam queued",
            )
        finally:
            store.close()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_row(
    work: Path,
    label: str,
    members: list[tuple[Path, list[str]]],
    exams: list[list[Path]],
    syntax: str,
    mode: str,
    args: argparse.Namespace,
) -> Row:
    path = write_config(work / f"{label}-{syntax}-{mode}", members, args, mode)
    config = load_config(path)
    receive(path, config.listener.port, exams, syntax)
    worker = Service(config, roles=["worker"])
    batches: list[int] = []
    predict = worker.ensemble.predict_exams

    def recorded(batch: Sequence[Sequence[Mammogram]]):
        if not worker.worker.warming_up:  # the start's synthetic exam is not the stream's
            batches.append(sum(len(e) for e in batch))
        return predict(batch)

    worker.ensemble.predict_exams = recorded  # type: ignore[method-assign]
    times: list[StageTimes] = []
    commit = worker.worker._commit

    def timed(outcome: Outcome) -> None:
        if not worker.worker.warming_up:  # its outcome arrives before the warm-up ends
            times.append(outcome.times)
        commit(outcome)

    worker.worker._commit = timed  # before start(): the pipeline reports to it
    worker.start()
    try:
        wait(
            lambda: (
                worker.store.counts()["jobs"].get("done", 0) == len(exams)
                or worker.store.counts()["jobs"].get("quarantined", 0) > 0
            ),
            3600,
            "every exam analysed",
        )
        if worker.store.counts()["jobs"].get("quarantined"):
            sys.exit(
                f"an exam was quarantined: {[j.reason for j in worker.store.jobs('quarantined')]}"
            )
        claims = worker.store.claims("job")
    finally:
        worker.stop()
    latencies = [c.released_at - c.claimed_at for c in claims if c.released_at is not None]
    seconds = max(c.released_at for c in claims) - min(c.claimed_at for c in claims)
    # Where the ensemble ran its forwards: a second OpenMP team would slow both.
    forward = on_compute_thread(forward_only, members, exams[0], batches, args)
    stages = {
        name: statistics.median(getattr(t, name) for t in times)
        for name in ("decode", "ensemble", "objects", "build", "write")
    }
    return Row(label, syntax, mode, len(exams), seconds, latencies, forward, len(batches), stages)


def forward_only(
    members: list[tuple[Path, list[str]]],
    exam: list[Path],
    batches: list[int],
    args: argparse.Namespace,
) -> float:
    """Seconds of the member modules' forwards alone for `batches` (images per call): each
    call's images × the member's flips, in chunks of `max_batch`, at the run's precision."""
    from plugin.decoding import decode

    device = resolve_device(args.device)
    images = decode([(str(p), p) for p in exam], keep_pixels=False).mammograms
    total = 0.0
    for path, flips in members:
        module = load_model(path, device=device)
        family = get_family(module.card.family)
        prepared = [family.preprocess(m, module.card.preprocessing).tensor for m in images]
        with torch.inference_mode():  # warm-up, not timed: the service's module is warm
            module(prepared[0].unsqueeze(0).to(device))
        for count in batches:
            x = torch.stack([prepared[i % len(prepared)] for i in range(count)]).to(device)
            batch = torch.cat([torch.flip(x, FLIPS[f]) if FLIPS[f] else x for f in flips])
            _sync(device)
            started = time.perf_counter()
            with torch.inference_mode(), autocast(device, args.precision):
                for chunk in torch.split(batch, args.max_batch):
                    module(chunk)
            _sync(device)
            total += time.perf_counter() - started
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- report ----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    keep_freed_memory()  # as `plugin serve` does: the worker runs in this process
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exams", type=int, default=32, help="exams per row (default 32)")
    p.add_argument(
        "--models",
        default="published,demo" if cuda else "demo",
        help="comma-separated: published, demo (default: both on a GPU, demo on the CPU)",
    )
    p.add_argument("--syntaxes", default="explicit,jpeg2000", help="explicit, jpeg2000")
    p.add_argument(
        "--modes", default="stream,lone,serial", help=f"comma-separated: {', '.join(MODES)}"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16" if cuda else "fp32", choices=list(PRECISIONS))
    p.add_argument("--max-batch", type=int, default=32 if cuda else 8)
    args = p.parse_args()

    device = resolve_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"{args.exams} exams of {ROWS}x{COLS} per row; {device} ({where or 'cpu'}), "
        f"{machine_cpus()} CPUs, torch {torch.__version__}, {args.precision}, "
        f"max_batch {args.max_batch}",
        flush=True,
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        sets = {"demo": demo_models()}
        if "published" in args.models:
            sets["published"] = published_models(work)
        for syntax in args.syntaxes.split(","):
            folder = work / f"in-{syntax}"
            folder.mkdir()
            started = time.perf_counter()
            exams = make_exams(folder, args.exams, syntax)
            print(f"{syntax}: exams written in {time.perf_counter() - started:.0f} s", flush=True)
            for label in args.models.split(","):
                for mode in args.modes.split(","):
                    row = run_row(work, label, sets[label], exams, syntax, mode, args)
                    rows.append(row)
                    _print(row, header=len(rows) == 1)
            shutil.rmtree(folder)
    lone = [r for r in rows if r.mode in ("lone", "serial") and r.syntax == "explicit"]
    for r in lone:
        per_exam = statistics.median(r.latencies)
        forward = r.forward_seconds / r.exams
        print(
            f"{r.models} {r.mode}: a whole uncompressed exam takes {per_exam:.2f} s = "
            f"{per_exam / forward:.1f} x its forward passes ({forward:.2f} s)"
        )
    return 0


def _print(r: Row, header: bool) -> None:
    if header:
        print(
            f"{'models':10} {'syntax':9} {'mode':7} {'exams':>5} {'exams/s':>8} {'p50 s':>7} "
            f"{'p95 s':>7} {'fwd-only/s':>10} {'e2e/fwd':>8} {'batches':>7}   "
            "median s per exam: decode ensemble objects (build write)"
        )
    t = r.stages
    print(
        f"{r.models:10} {r.syntax:9} {r.mode:7} {r.exams:5d} {r.exams_per_s:8.3f} "
        f"{percentile(r.latencies, 0.5):7.2f} {percentile(r.latencies, 0.95):7.2f} "
        f"{r.ceiling:10.3f} {r.exams_per_s / r.ceiling:8.2f} {r.batches:7d}   "
        f"{t['decode']:6.2f} {t['ensemble']:8.2f} {t['objects']:7.2f} "
        f"({t['build']:.2f} {t['write']:.2f})",
        flush=True,
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
