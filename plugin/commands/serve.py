"""`plugin serve`: run the DICOM service's roles (listener, assembler, worker, dispatcher)
until SIGTERM. With `worker.devices`, the workers run as one child process per device."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from models.command_line import Subcommands
from plugin.config import DEFAULT_CONFIG, Config, load_config

log = logging.getLogger(__name__)


def register(sub: Subcommands) -> None:
    from plugin.service import ROLES

    p = sub.add_parser("serve", help="run the DICOM listener and the analysis pipeline")
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="config file (default ./config.yml)"
    )
    p.add_argument(
        "--roles",
        default=",".join(ROLES),
        help="comma-separated roles this process runs (default: all of "
        + ", ".join(ROLES)
        + "); several nodes share a PostgreSQL store and a spool",
    )
    p.add_argument("--node", help="this process's name in leases and the audit (node.name)")
    p.add_argument(
        "--device", help="run the worker on this device (what each worker.devices child gets)"
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from plugin.listener import prepare_process
    from plugin.observability import configure_logging
    from plugin.service import ROLES, Service

    config = load_config(args.config)
    if args.node:
        config = config.model_copy(
            update={"node": config.node.model_copy(update={"name": args.node})}
        )
    if args.device:
        config = config.model_copy(
            update={"models": config.models.model_copy(update={"device": args.device})}
        )
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    unknown = sorted(set(roles) - set(ROLES))
    if unknown or not roles:
        raise ValueError(f"--roles: unknown role(s) {', '.join(unknown) or '(none)'}; use {ROLES}")
    obs = config.observability
    configure_logging(obs.log_level, obs.log_format)
    children: list[_Child] = []
    if "worker" in roles and config.worker.devices and not args.device:
        roles.remove("worker")
        children = [_Child(args.config, config, device) for device in config.worker.devices]
    if not roles:
        return _supervise_only(children)
    service = Service(config, roles=roles)
    prepare_process(service.store, service.roles)  # process-wide settings, once
    service.start()
    for child in children:
        child.start()
    cfg = config.listener
    where = f"listening as {cfg.ae_title} on {cfg.host}:{service.port}" if service.port else ""
    http = f"health http://{obs.http_host}:{service.http.port}/health" if service.http else ""
    workers = f"workers on {', '.join(c.device for c in children)}" if children else ""
    parts = [f"node {service.node}, roles {','.join(service.roles)}", where, http, workers]
    print(
        "plugin serve: "
        + "; ".join(x for x in parts if x)
        + "; SIGTERM or Ctrl-C drains and stops",
        file=sys.stderr,
        flush=True,
    )
    try:
        service.run_until_signal()
    finally:
        for child in children:
            child.stop()
    return 0


def _supervise_only(children: list[_Child]) -> int:
    """Only device workers: start them and wait for SIGTERM/SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    for child in children:
        child.start()
    print(
        f"plugin serve: workers on {', '.join(c.device for c in children)}; SIGTERM drains",
        file=sys.stderr,
        flush=True,
    )
    stop.wait()
    for child in children:
        child.stop()
    return 0


class _Child:
    """One worker process on one device, started again (after a pause) when it exits."""

    def __init__(self, config_path: Path, config: Config, device: str) -> None:
        self.args = [
            sys.executable,
            "-m",
            "plugin.cli",
            "serve",
            "--config",
            str(config_path),
            "--roles",
            "worker",
            "--device",
            device,
            "--node",
            f"{config.node.name}.{device.replace(':', '')}",
        ]
        self.device = device
        self.process: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"child-{device}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.process = subprocess.Popen(self.args)
            code = self.process.wait()
            if self._stop.is_set():
                return
            log.error(
                "worker process exited; starting it again",
                extra={"fields": {"device": self.device, "exit_code": code}},
            )
            time.sleep(2)

    def stop(self, timeout: float = 150) -> None:
        self._stop.set()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._thread.join(5)
