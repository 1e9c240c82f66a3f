"""`plugin serve`: run the DICOM service (listener, exams, worker, delivery) until SIGTERM."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plugin.config import DEFAULT_CONFIG, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the DICOM listener and the analysis pipeline")
    p.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="config file (default ./config.yml)"
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from plugin.observability import configure_logging
    from plugin.service import Service

    config = load_config(args.config)
    obs = config.observability
    configure_logging(obs.log_level, obs.log_format)
    service = Service(config)
    service.start()
    cfg = config.listener
    http = f", health http://{obs.http_host}:{service.http.port}/health" if service.http else ""
    print(
        f"plugin serve: listening as {cfg.ae_title} on {cfg.host}:{service.port}{http}; "
        "SIGTERM or Ctrl-C drains and stops",
        file=sys.stderr,
        flush=True,
    )
    service.run_until_signal()
    return 0
