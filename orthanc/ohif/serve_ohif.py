#!/usr/bin/env python3
"""Serve the OHIF dist and Orthanc's DICOMweb from one origin (Orthanc 1.10 has no CORS).

    python3 orthanc/ohif/serve_ohif.py --dist orthanc/ohif/dist --orthanc http://127.0.0.1:8042

GET/POST under /dicom-web/ go to Orthanc (with HTTP basic credentials from the environment
variables MAMMO_AI_ORTHANC_USER / MAMMO_AI_ORTHANC_PASSWORD when set); everything else is a file
of the dist, and unknown paths get index.html (OHIF routes in the browser). Standard library
only, so Debian's python3 runs it as is; for many users put nginx in front with the same rules.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PROXIED = "/dicom-web/"
_FORWARDED_HEADERS = ("Accept", "Content-Type", "Range")
_RETURNED_HEADERS = ("Content-Type", "Content-Length", "Content-Range", "ETag", "Last-Modified")


def make_handler(dist: Path, orthanc: str, auth: str | None):
    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(dist), **kwargs)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.startswith(PROXIED):
                self._proxy(None)
                return
            local = dist / self.path.split("?", 1)[0].lstrip("/")
            if not local.resolve().is_relative_to(dist.resolve()) or not local.exists():
                self.path = "/index.html"
            super().do_GET()

        def do_POST(self) -> None:  # noqa: N802
            if not self.path.startswith(PROXIED):
                self.send_error(405, "only DICOMweb accepts POST here")
                return
            length = int(self.headers.get("Content-Length", 0))
            self._proxy(self.rfile.read(length))

        def _proxy(self, body: bytes | None) -> None:
            request = urllib.request.Request(orthanc + self.path, data=body, method=self.command)
            for name in _FORWARDED_HEADERS:
                if self.headers.get(name):
                    request.add_header(name, self.headers[name])
            if auth:
                request.add_header("Authorization", auth)
            try:
                with urllib.request.urlopen(request, timeout=300) as answer:
                    self._relay(answer.status, answer.headers, answer.read())
            except urllib.error.HTTPError as error:
                self._relay(error.code, error.headers, error.read())
            except OSError as error:
                self.send_error(502, f"Orthanc at {orthanc} is not reachable: {error}")

        def _relay(self, status: int, headers, payload: bytes) -> None:
            self.send_response(status)
            for name in _RETURNED_HEADERS:
                if name in headers and name != "Content-Length":
                    self.send_header(name, headers[name])
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dist", type=Path, default=Path(__file__).with_name("dist"))
    parser.add_argument("--orthanc", default="http://127.0.0.1:8042", help="Orthanc's HTTP URL")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve the LAN")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)
    if not (args.dist / "index.html").is_file():
        parser.error(f"{args.dist} holds no OHIF dist; run orthanc/ohif/fetch_ohif.sh first")
    user, password = (
        os.environ.get("MAMMO_AI_ORTHANC_USER"),
        os.environ.get("MAMMO_AI_ORTHANC_PASSWORD"),
    )
    auth = None
    if user and password:
        auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    mimetypes.add_type("application/wasm", ".wasm")
    handler = make_handler(args.dist, args.orthanc.rstrip("/"), auth)
    server = ThreadingHTTPServer((args.host, args.port), handler)
    print(
        f"OHIF on http://{args.host}:{server.server_port}/ → DICOMweb of {args.orthanc}", flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
