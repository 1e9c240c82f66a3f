"""The shipped orthanc/orthanc.json starts Debian's Orthanc with our plugin as documented, and
orthanc/ohif/serve_ohif.py puts OHIF and Orthanc's DICOMweb on one origin."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
from pathlib import Path

import httpx
import pytest

from tests.support.ohif_peer import serve_ohif
from tests.support.orthanc_peer import REPO, SCRIPT, OrthancPeer
from trainer.synth import synth_exam

EXAMPLE = REPO / "orthanc" / "orthanc.json"


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


def test_orthanc_explorer_gets_the_overlay_viewer_button(example_orthanc):
    """With "Viewer": true, Orthanc Explorer's study page gets a button to our viewer."""
    orthanc, _ = example_orthanc
    with orthanc.client() as client:
        script = client.get("/plugins/explorer.js")
    script.raise_for_status()
    assert "mammo-ai-viewer" in script.text
    assert "'../mammo-ai/studies/' + $.mobile.pageData.uuid" in script.text


def test_ohif_proxy_serves_dist_and_dicomweb_on_one_origin(example_orthanc, tmp_path):
    orthanc, _ = example_orthanc
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<html>ohif-dist-marker</html>")
    (dist / "app-config.js").write_text((REPO / "orthanc/ohif/app-config.js").read_text())
    with serve_ohif(dist, orthanc.url, tmp_path) as base:
        with httpx.Client(base_url=base, timeout=30, auth=("radiologist", "s3cret")) as client:
            assert "ohif-dist-marker" in client.get("/").text
            assert "ohif-dist-marker" in client.get("/viewer?StudyInstanceUIDs=1.2").text
            assert "window.location.origin + '/dicom-web'" in client.get("/app-config.js").text
            studies = client.get("/dicom-web/studies", headers={"Accept": "application/json"})
            assert studies.status_code == 200 and studies.json() == []


def test_ohif_proxy_passes_the_callers_credentials_and_adds_none(example_orthanc, tmp_path):
    """The proxy holds no credentials: an anonymous caller gets Orthanc's 401 (and the page a
    challenge, so a browser asks for the Orthanc user), a wrong password 401, and nothing
    escapes /dicom-web/ to Orthanc's other routes."""
    orthanc, _ = example_orthanc
    upload(orthanc, synth_exam(3, rows=80, cols=64).images[0].dataset)
    with serve_ohif(_standin_dist(tmp_path), orthanc.url, tmp_path) as base:
        with httpx.Client(base_url=base, timeout=30) as anonymous:
            refused = anonymous.get("/dicom-web/studies")
            assert refused.status_code == 401
            assert refused.headers["WWW-Authenticate"].startswith("Basic")
            assert "0020000D" not in refused.text
            page = anonymous.get("/viewer?StudyInstanceUIDs=1.2")
            assert page.status_code == 401 and "ohif-dist-marker" not in page.text
            assert page.headers["WWW-Authenticate"].startswith("Basic")
        wrong = httpx.get(base + "/dicom-web/studies", auth=("radiologist", "guess"))
        assert wrong.status_code == 401
        auth = ("radiologist", "s3cret")
        accept = {"Accept": "application/json"}
        studies = httpx.get(base + "/dicom-web/studies", auth=auth, headers=accept)
        assert studies.status_code == 200 and len(studies.json()) == 1
        # Orthanc's metadata names the proxy's origin, so OHIF fetches frames through it.
        study = studies.json()[0]["0020000D"]["Value"][0]
        metadata = httpx.get(
            f"{base}/dicom-web/studies/{study}/metadata", auth=auth, headers=accept
        )
        uris = re.findall(r'"BulkDataURI"\s*:\s*"([^"]+)"', metadata.text)
        assert uris and all(u.startswith(base + "/dicom-web/") for u in uris)
        # Raw paths (a client library would normalise them before sending).
        port = int(base.rsplit(":", 1)[1])
        for raw in ("/dicom-web/../system", "/dicom-web/%2e%2e/system", "/dicom-web/..%2fsystem"):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            token = base64.b64encode(b"radiologist:s3cret").decode()
            connection.request("GET", raw, headers={"Authorization": f"Basic {token}"})
            answer = connection.getresponse()
            assert answer.status == 404, raw
            assert b"DicomAet" not in answer.read()
            connection.close()


def _standin_dist(tmp_path):
    dist = tmp_path / "standin-dist"
    dist.mkdir(exist_ok=True)
    (dist / "index.html").write_text("<html>ohif-dist-marker</html>")
    return dist


def upload(orthanc, ds) -> None:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with orthanc.client() as client:
        client.post("/instances", content=buffer.getvalue()).raise_for_status()


def test_ohif_proxy_listens_on_loopback_only_by_default(tmp_path):
    """Started without --host (as serve_ohif does), it must not serve the LAN."""
    with serve_ohif(_standin_dist(tmp_path), "http://127.0.0.1:9", tmp_path) as base:
        port = int(base.rsplit(":", 1)[1])
        listening = [
            line.split()[1]
            for table in ("/proc/net/tcp", "/proc/net/tcp6")
            if Path(table).exists()
            for line in Path(table).read_text().splitlines()[1:]
            if line.split()[3] == "0A" and int(line.split()[1].rsplit(":", 1)[1], 16) == port
        ]
        assert listening == [f"0100007F:{port:04X}"]
