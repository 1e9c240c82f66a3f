"""A temporary Orthanc (Debian's `orthanc`, plus `orthanc-dicomweb` / `orthanc-python`) for tests.

    with OrthancPeer.start(tmp_path / "orthanc", plugins=("dicomweb",)) as orthanc:
        orthanc.get("/system")
        assert uid in orthanc.instance_uids()

Each peer has its own config file, storage folder and free HTTP and DICOM ports, so it never
touches the packaged /etc/orthanc service (which uses 4242/8042). `extra_config` is merged
last and can set anything Orthanc reads (DicomModalities, DicomCheckCalledAet, StableAge, ...).
`restart()` keeps the storage; it waits for the old process to exit first, since Orthanc's
SQLite index stays locked until then.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from tests.support.dcmtk_peer import free_port, stop_process, wait_for_port

PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
PLUGIN_FILES = {
    "dicomweb": ("libOrthancDicomWeb.so", "orthanc-dicomweb"),
    "python": ("libOrthancPython.so", "orthanc-python"),
}


def orthanc_binary() -> Path:
    """The Orthanc server executable, or skip the test with how to install it."""
    found = shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.skip("Orthanc not found; install it with `apt-get install orthanc orthanc-dicomweb`")
    return Path(found)


def plugin_path(name: str) -> Path:
    """A plugin by short name ("dicomweb", "python") or path, or skip if it is not installed."""
    if name not in PLUGIN_FILES:
        return Path(name)
    filename, package = PLUGIN_FILES[name]
    path = PLUGIN_DIR / filename
    if not path.exists():
        pytest.skip(f"Orthanc plugin {name} not found at {path}; `apt-get install {package}`")
    return path


@dataclass
class OrthancPeer:
    workdir: Path
    config: dict[str, Any]
    env: dict[str, str]
    auth: tuple[str, str] | None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        ae_title: str = "ORTHANCTEST",
        http_port: int | None = None,
        dicom_port: int | None = None,
        plugins: Sequence[str] = ("dicomweb",),
        python_script: Path | None = None,
        users: Mapping[str, str] | None = None,
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30,
    ) -> OrthancPeer:
        """Write `workdir/orthanc.json` and start Orthanc on it.

        `plugins`: short names ("dicomweb", "python") or .so paths; "python" needs
        `python_script`. `users` turns on HTTP basic authentication. `modalities`: name →
        (AE title, host, port), Orthanc's DicomModalities. `env` is added to the environment
        (e.g. PYTHONPATH for the python plugin's script).
        """
        binary = orthanc_binary()
        workdir.mkdir(parents=True, exist_ok=True)
        storage = workdir / "storage"
        config: dict[str, Any] = {
            "Name": f"test-{ae_title}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": http_port or free_port(),
            "DicomPort": dicom_port or free_port(),
            "DicomAet": ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(users),
            "RegisteredUsers": dict(users or {}),
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "Plugins": [str(plugin_path(p)) for p in plugins],
            "StableAge": 60,
            "HttpTimeout": 60,
        }
        if "dicomweb" in plugins:
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        if python_script is not None:
            config["PythonScript"] = str(python_script)
        config.update(extra_config or {})
        (workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
        auth = next(iter(users.items())) if users else None
        peer = cls(workdir, config, {**os.environ, **(env or {})}, auth)
        peer._launch(binary, startup_timeout)
        return peer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config['HttpPort']}"

    @property
    def dicomweb_url(self) -> str:
        return self.url + self.config.get("DicomWeb", {}).get("Root", "/dicom-web/").rstrip("/")

    @property
    def dicom_port(self) -> int:
        return int(self.config["DicomPort"])

    @property
    def ae_title(self) -> str:
        return str(self.config["DicomAet"])

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=30)

    def get(self, route: str, **params: Any) -> Any:
        with self.client() as client:
            response = client.get(route, params=params)
            response.raise_for_status()
            return response.json()

    def post(self, route: str, body: Any) -> Any:
        with self.client() as client:
            response = client.post(route, json=body)
            response.raise_for_status()
            return response.json()

    def instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every instance Orthanc holds."""
        return {
            item["MainDicomTags"]["SOPInstanceUID"] for item in self.get("/instances", expand="")
        }

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc's identifier of the instance with this SOP Instance UID, or None."""
        found = self.post(
            "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}
        )
        return found[0] if found else None

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file, byte for byte."""
        with self.client() as client:
            response = client.get(f"/instances/{orthanc_id}/file")
            response.raise_for_status()
            return response.content

    def restart(self, startup_timeout: float = 30) -> None:
        self.stop()
        self._launch(orthanc_binary(), startup_timeout)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=20)
            self.process = None

    def __enter__(self) -> OrthancPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _launch(self, binary: Path, startup_timeout: float) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [binary, str(self.workdir / "orthanc.json")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
            )
        try:
            wait_for_port(self.config["HttpPort"], self.process, startup_timeout, self.log_path)
            self._wait_for_system(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_for_system(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/system")
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Orthanc did not answer /system within {timeout} s:\n"
                        + self.log_path.read_text(errors="replace")[-3000:]
                    ) from None
                time.sleep(0.1)


# Our Orthanc plugin (orthanc/mammo_ai_orthanc.py) and uploads, as the Orthanc tests drive them.

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "orthanc" / "mammo_ai_orthanc.py"


def plugin_config(stable_age: int) -> dict:
    return {
        "StableAge": stable_age,
        "UserMetadata": {"MammoAiRouted": 4601},
        "MammoAI": {"Modality": "mammoai", "PollInterval": 0.5, "RetryDelays": [1]},
    }


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def upload(orthanc: OrthancPeer, datasets) -> list[str]:
    ids = []
    with orthanc.client() as client:
        for ds in datasets:
            response = client.post("/instances", content=dicom_bytes(ds))
            response.raise_for_status()
            ids.append(response.json()["ID"])
    return ids
