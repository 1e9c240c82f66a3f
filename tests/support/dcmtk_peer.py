"""dcmtk's `storescp` as a real C-STORE peer for tests (Debian package `dcmtk`).

    with StoreSCP.start(tmp_path / "in", ae_title="PACS") as scp:
        ... send to 127.0.0.1:scp.port, called AE "PACS" ...
        assert uid in scp.received_uids()

Options worth knowing (`storescp --help`): `--abort-after` / `--abort-during` abort the
association around the first C-STORE (fault injection), `--refuse` refuses every association,
`+xa` (default here) accepts every transfer syntax dcmtk knows, `+tls KEY CERT` with `+cf CA`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from pydicom import dcmread


@cache
def dcmtk_tool(name: str) -> Path | None:
    """dcmtk's executable `name`, or None. pynetdicom installs console scripts with the same
    names as dcmtk's (storescp, storescu, ...) that may come first on PATH, so only a binary
    that calls itself dcmtk in `--version` is taken."""
    seen: set[Path] = set()
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]:
        candidate = Path(folder) / name
        if candidate in seen or not os.access(candidate, os.X_OK):
            continue
        seen.add(candidate)
        with candidate.open("rb") as head:
            if head.read(4) != b"\x7fELF":
                continue  # a script (pyenv shim, pynetdicom entry point), not dcmtk
        try:
            result = subprocess.run(
                [candidate, "--version"], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (result.stdout + result.stderr).lower():
            return candidate
    return None


def require_dcmtk(name: str) -> Path:
    """dcmtk's `name`, or skip the test with how to install it."""
    tool = dcmtk_tool(name)
    if tool is None:
        pytest.skip(f"dcmtk's {name} not found; install it with `apt-get install dcmtk`")
    return tool


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float, log: Path) -> None:
    """Until something listens on 127.0.0.1:`port`; fail with the peer's log if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"peer exited with code {process.returncode} before listening on {port}:\n"
                + log.read_text(errors="replace")[-3000:]
            )
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"peer did not listen on {port} within {timeout} s")


def stop_process(process: subprocess.Popen, timeout: float = 10) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


@dataclass
class StoreSCP:
    """A running `storescp` writing what it receives into `output_dir`."""

    port: int
    ae_title: str
    output_dir: Path
    log_path: Path
    process: subprocess.Popen = field(repr=False)

    @classmethod
    def start(
        cls,
        output_dir: Path,
        *,
        ae_title: str = "STORESCP",
        port: int | None = None,
        accept_all_syntaxes: bool = True,
        tls: tuple[Path, Path, Path | None] | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10,
    ) -> StoreSCP:
        """Start listening on 127.0.0.1 (a free port unless `port`). `tls` is (key, cert,
        trusted CA or None); with a CA, clients must present a certificate it signed."""
        tool = require_dcmtk("storescp")
        output_dir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        args: list[str | Path] = [tool, "-aet", ae_title, "-od", output_dir, "-pm"]
        if accept_all_syntaxes:
            args.append("+xa")
        if tls is not None:
            key, cert, ca = tls
            args += ["+tls", key, cert]
            args += ["+cf", ca, "-rc"] if ca is not None else ["-ic"]
        args += [*extra_args, str(port)]
        log_path = output_dir.parent / f"storescp-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        scp = cls(port, ae_title, output_dir, log_path, process)
        try:
            wait_for_port(port, process, startup_timeout, log_path)
        except BaseException:
            scp.stop()
            raise
        return scp

    def received(self) -> list[Path]:
        return sorted(p for p in self.output_dir.iterdir() if p.is_file())

    def received_uids(self) -> set[str]:
        return {
            str(
                dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID
            )
            for p in self.received()
        }

    def received_syntaxes(self) -> dict[str, str]:
        """SOP Instance UID → transfer syntax it was written in."""
        out = {}
        for p in self.received():
            ds = dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            out[str(ds.SOPInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
        return out

    def stop(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> StoreSCP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_test_pki(folder: Path, host: str = "localhost") -> dict[str, Path]:
    """A throwaway CA, a server certificate for `host` (and 127.0.0.1) and a client
    certificate, with openssl. Returns paths: ca, server_key, server_cert, client_key,
    client_cert, other_ca (a CA that signed nothing here, for negative tests)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found; install it with `apt-get install openssl`")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str | Path) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=folder)

    paths = {
        k: folder / f"{k}.pem"
        for k in (
            "ca",
            "ca_key",
            "server_key",
            "server_cert",
            "client_key",
            "client_cert",
            "other_ca",
            "other_ca_key",
        )
    }
    for ca, key, cn in (("ca", "ca_key", "Test CA"), ("other_ca", "other_ca_key", "Other CA")):
        run(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={cn}",
            "-keyout",
            paths[key],
            "-out",
            paths[ca],
        )
    for role, ext in (("server", f"subjectAltName=DNS:{host},IP:127.0.0.1"), ("client", None)):
        csr = folder / f"{role}.csr"
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={role}",
            "-keyout",
            paths[f"{role}_key"],
            "-out",
            csr,
        )
        extfile = folder / f"{role}.ext"
        extfile.write_text(f"{ext}\n" if ext else "basicConstraints=CA:FALSE\n")
        run(
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            paths["ca"],
            "-CAkey",
            paths["ca_key"],
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            extfile,
            "-out",
            paths[f"{role}_cert"],
        )
    return paths
