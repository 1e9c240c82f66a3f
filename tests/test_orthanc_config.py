"""The shipped orthanc/orthanc.json starts Debian's Orthanc with our plugin as documented, and
orthanc/ohif/serve_ohif.py puts OHIF and Orthanc's DICOMweb on one origin."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from dcmtk_peer import free_port, stop_process, wait_for_port
from orthanc_peer import OrthancPeer
from test_orthanc_routing import REPO, SCRIPT

EXAMPLE = REPO / "orthanc" / "orthanc.json"
SERVE_OHIF = REPO / "orthanc" / "ohif" / "serve_ohif.py"


def example_config() -> dict:
    lines = [ln for ln in EXAMPLE.read_text().splitlines() if not ln.strip().startswith("//")]
    return json.loads("\n".join(lines))


@pytest.fixture(scope="module")
def example_orthanc(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("example")
    config = example_config()
    for key in ("StorageDirectory", "IndexDirectory", "HttpPort", "DicomPort"):
        del config[key]  # the peer's temporary folder and free ports
    config["PythonScript"] = str(SCRIPT)
    config["RemoteAccessAllowed"] = False
    with OrthancPeer.start(
        tmp / "orthanc",
        users={"radiologist": "s3cret"},  # the example reads the password from the environment
        plugins=config.pop("Plugins"),
        extra_config=config,
        env={"MAMMO_AI_ORTHANC_PASSWORD": "s3cret"},
    ) as orthanc:
        yield orthanc, tmp


def test_example_configuration_loads_plugins_and_routing(example_orthanc):
    orthanc, _ = example_orthanc
    assert set(orthanc.get("/plugins")) >= {"python", "dicom-web"}
    assert "gdcm" not in orthanc.get("/plugins")
    status = orthanc.get("/mammo-ai/routing")
    assert status["ConfigurationProblem"] is None
    assert orthanc.get("/modalities") == ["mammoai"]
    assert example_config()["BuiltinDecoderTranscoderOrder"] == "Before"
    with httpx.Client(base_url=orthanc.url) as anonymous:
        assert anonymous.get("/mammo-ai/routing").status_code == 401


def test_ohif_proxy_serves_dist_and_dicomweb_on_one_origin(example_orthanc, tmp_path):
    orthanc, _ = example_orthanc
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<html>ohif-dist-marker</html>")
    (dist / "app-config.js").write_text((REPO / "orthanc/ohif/app-config.js").read_text())
    port = free_port()
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        proxy = subprocess.Popen(
            [
                sys.executable,
                SERVE_OHIF,
                "--dist",
                dist,
                "--orthanc",
                orthanc.url,
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"MAMMO_AI_ORTHANC_USER": "radiologist", "MAMMO_AI_ORTHANC_PASSWORD": "s3cret"},
        )
    try:
        wait_for_port(port, proxy, 10, log)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert "ohif-dist-marker" in client.get("/").text
            assert "ohif-dist-marker" in client.get("/viewer?StudyInstanceUIDs=1.2").text
            assert "window.location.origin + '/dicom-web'" in client.get("/app-config.js").text
            studies = client.get("/dicom-web/studies", headers={"Accept": "application/json"})
            assert studies.status_code == 200 and studies.json() == []
    finally:
        stop_process(proxy)
