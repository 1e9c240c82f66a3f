"""orthanc/ohif/serve_ohif.py started for a test: the OHIF dist and an Orthanc's DICOMweb on
one free local port.

    with serve_ohif(dist, orthanc.url, tmp_path) as base_url:
        httpx.get(base_url + "/dicom-web/studies", auth=("radiologist", "s3cret"))
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.dcmtk_peer import free_port, stop_process, wait_for_port

REPO = Path(__file__).resolve().parents[2]
SERVE_OHIF = REPO / "orthanc" / "ohif" / "serve_ohif.py"
OHIF_DIST = REPO / "orthanc" / "ohif" / "dist"


@contextmanager
def serve_ohif(dist: Path, orthanc_url: str, workdir: Path) -> Iterator[str]:
    """Run the proxy with an empty environment (it must need no credentials of its own)."""
    port = free_port()
    log = workdir / "serve_ohif.log"
    with log.open("wb") as out:
        proxy = subprocess.Popen(
            [
                sys.executable,
                SERVE_OHIF,
                "--dist",
                dist,
                "--orthanc",
                orthanc_url,
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={},
        )
    try:
        wait_for_port(port, proxy, 10, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proxy)
