"""`plugin serve` as a real subprocess for integration tests, with what those tests share:
small model files, a config writer, synthetic exam files, dcmtk `storescu`, and waiting.

    models = demo_models(tmp / "models")
    cfg = write_config(tmp, port=free_port(), models=models, destinations=[...])
    with Serve.start(cfg) as service:
        storescu(files, service.port)
        wait_until(lambda: service.store().counts()["jobs"].get("done") == 1, 60, "analysis")
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from plugin.config import load_config
from plugin.store import Store
from tests.support.dcmtk_peer import free_port, require_dcmtk, wait_for_port
from trainer.synth import encode, synth_exam

REPO = Path(__file__).resolve().parents[2]
SHIPPED = [
    REPO / "models/weights/demo-gmic.safetensors",
    REPO / "models/weights/demo-allconv.safetensors",
]
ROWS, COLS = 512, 416


def demo_models(folder: Path) -> list[Path]:
    """The shipped demo model files, or freshly initialised demo-preset models when they are
    not there yet (the pipeline is the same; only the scores differ)."""
    if all(p.is_file() for p in SHIPPED):
        return SHIPPED
    from models.allconv import PRESETS as ALLCONV
    from models.gmic import PRESETS as GMIC
    from models.modelfile import new_model_file

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for family, presets in (("gmic", GMIC), ("allconv", ALLCONV)):
        path = folder / f"test-{family}.safetensors"
        if not path.exists():
            new_model_file(path, family, presets["demo"], name=f"test-{family}")
        out.append(path)
    return out


def write_config(
    folder: Path,
    *,
    port: int,
    models: Sequence[Path],
    destinations: Sequence[dict[str, Any]] = (),
    http_port: int | None = None,
    **sections: dict[str, Any],
) -> Path:
    """A config for a test service under `folder`; `sections` override/extend the defaults
    (short timers, one flip per model, CPU)."""
    data: dict[str, Any] = {
        "listener": {"port": port, "ae_title": "MAMMO_AI"},
        "storage": {"spool": "var/spool", "database": "var/db.sqlite", "min_free_mb": 1},
        "exams": {"settle_seconds": 1, "quiet_seconds": 4, "max_wait_seconds": 60},
        "models": {"members": [{"path": str(p)} for p in models], "device": "cpu"},
        "worker": {"max_attempts": 3, "retry_delay_seconds": 1},
        "delivery": {
            "max_attempts": 5,
            "initial_delay_seconds": 0.5,
            "max_delay_seconds": 2,
            "poll_seconds": 0.2,
        },
        "destinations": list(destinations),
        "observability": {
            "http_port": http_port,
            "log_format": "json",
            "audit_log": "var/audit.jsonl",
        },
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class Serve:
    """A running `plugin serve` subprocess."""

    config: Path
    port: int
    log_path: Path
    process: subprocess.Popen = field(repr=False)

    @classmethod
    def start(
        cls,
        config: Path,
        *,
        timeout: float = 90,
        roles: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> Serve:
        """Start and wait until it listens (or, without the listener role, has started)."""
        port = int(yaml.safe_load(config.read_text())["listener"]["port"])
        log_path = config.parent / f"serve-{time.monotonic_ns()}.log"
        command = [sys.executable, "-m", "plugin.cli", "serve", "--config", str(config)]
        if roles is not None:
            command += ["--roles", ",".join(roles)]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        service = cls(config, port, log_path, process)
        try:
            if roles is None or "listener" in roles:
                wait_for_port(port, process, timeout, log_path)
            else:
                wait_until(lambda: "plugin serve:" in service.log, timeout, "start-up", service)
        except BaseException:
            service.kill()
            raise
        return service

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def store(self) -> Store:
        return Store.open(load_config(self.config).storage, claimant="test-observer")

    def audit(self) -> list[dict[str, Any]]:
        import json

        path = load_config(self.config).observability.audit_log
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM: the service drains; returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: no draining, like a power cut for the process."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def exam_files(folder: Path, seed: int, syntax: str = "explicit") -> list[Path]:
    """One synthetic four-view exam (512x416) written as DICOM files in `syntax`."""
    exam = synth_exam(seed, rows=ROWS, cols=COLS, malignant=seed % 2 == 0, benign=False)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in exam.images:
        ds = image.dataset if syntax == "explicit" else encode(image.dataset, syntax)
        path = folder / f"{seed}-{image.view_key}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(
    files: Sequence[Path],
    port: int,
    *,
    calling: str = "PACS",
    called: str = "MAMMO_AI",
    extra: Sequence[str] = (),
    check: bool = True,
) -> subprocess.CompletedProcess:
    """dcmtk's storescu: one association sending `files`. Output is in the result."""
    tool = require_dcmtk("storescu")
    result = subprocess.run(
        [tool, "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"storescu failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, service: Serve | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if service is not None and not service.running():
            raise AssertionError(f"service exited while waiting for {what}:\n{service.log[-4000:]}")
        time.sleep(0.2)
    tail = f"\n{service.log[-4000:]}" if service is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{tail}")


def counts(service: Serve) -> dict[str, dict[str, int]]:
    store = service.store()
    try:
        return store.counts()
    finally:
        store.close()


__all__ = [
    "Serve",
    "counts",
    "demo_models",
    "exam_files",
    "free_port",
    "storescu",
    "wait_until",
    "write_config",
]
