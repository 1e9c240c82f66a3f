#!/usr/bin/env python3
"""Serve the OHIF dist and Orthanc's DICOMweb from one origin (Orthanc 1.10 has no CORS).

    python3 orthanc/ohif/serve_ohif.py --dist orthanc/ohif/dist --orthanc http://127.0.0.1:8042

Requests under /dicom-web/ go to Orthanc with the caller's own credentials (its Authorization
header) and never any of the proxy's: a caller Orthanc would refuse is refused here too, with
Orthanc's own 401, whose challenge makes the browser ask for the Orthanc user once. A page load
without credentials gets the same challenge when Orthanc demands authentication. The Host
header goes through, so the BulkDataURIs in Orthanc's metadata name this origin, not Orthanc's.
One OHIF bug is worked around in the metadata (`default_voi_function_dropped`).
Everything else is a file of the dist, and unknown paths get index.html (OHIF routes in the
browser). Binds 127.0.0.1 unless told otherwise; put TLS (nginx) in front before serving a LAN,
since basic credentials travel in clear over plain HTTP. Standard library only, so Debian's
python3 runs it as is.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import posixpath
import urllib.error
import urllib.parse
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PROXIED = "/dicom-web/"
_FORWARDED_HEADERS = ("Accept", "Content-Type", "Range", "Authorization", "Host")
_RETURNED_HEADERS = ("Content-Type", "Content-Range", "ETag", "Last-Modified", "WWW-Authenticate")
_CHALLENGE = 'Basic realm="Orthanc (OHIF at mammo-ai)"'


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect from Orthanc is relayed to the browser, not followed with the caller's
    credentials to wherever it points."""

    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def proxied_path(raw: str) -> str | None:
    """The Orthanc path for a request path, or None unless it stays under /dicom-web/ once
    percent-decoded and normalised (no `..` escapes to Orthanc's other routes)."""
    path, _, query = raw.partition("?")
    decoded = urllib.parse.unquote(path)
    normal = posixpath.normpath(decoded)
    if decoded.endswith("/") and not normal.endswith("/"):
        normal += "/"
    if "\\" in decoded or normal != decoded or not normal.startswith(PROXIED):
        return None
    return path + (f"?{query}" if query else "")


_VOI_LUT_FUNCTION = "00281056"


def default_voi_function_dropped(payload: bytes) -> bytes:
    """DICOMweb JSON without VOI LUT Function where it says LINEAR, the value its absence
    means. OHIF 3.13's image loader (cornerstone dicom-image-loader) takes the first element
    of that value, i.e. the letter "L" of a string, and fails every such image with "Invalid
    VOI LUT function"; the rendering is the same without it. Other values pass unchanged."""
    if _VOI_LUT_FUNCTION.encode() not in payload:
        return payload
    try:
        data = json.loads(payload)
    except ValueError:
        return payload
    items = data if isinstance(data, list) else [data]
    for item in items:
        element = item.get(_VOI_LUT_FUNCTION) if isinstance(item, dict) else None
        if isinstance(element, dict) and element.get("Value") == ["LINEAR"]:
            del item[_VOI_LUT_FUNCTION]
    return json.dumps(data).encode()


def make_handler(dist: Path, orthanc: str):
    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(dist), **kwargs)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.startswith(PROXIED):
                self._proxy(None)
                return
            local = dist / urllib.parse.unquote(self.path.split("?", 1)[0]).lstrip("/")
            if not local.resolve().is_relative_to(dist.resolve()) or not local.is_file():
                self.path = "/index.html"
            if self.path.split("?", 1)[0] in ("/", "/index.html") and not self._may_see_page():
                return
            super().do_GET()

        def do_POST(self) -> None:  # noqa: N802
            if not self.path.startswith(PROXIED):
                self.send_error(405, "only DICOMweb accepts POST here")
                return
            length = int(self.headers.get("Content-Length", 0))
            self._proxy(self.rfile.read(length))

        def _may_see_page(self) -> bool:
            """Challenge a page load that Orthanc would refuse, so the browser asks for the
            Orthanc user before OHIF starts (and then sends it with every request)."""
            status, _, _ = self._ask_orthanc("GET", "/system", None)
            if status != 401:
                return True
            self._relay(
                401,
                {"WWW-Authenticate": _CHALLENGE, "Content-Type": "text/plain"},
                b"Orthanc user required\n",
            )
            return False

        def _proxy(self, body: bytes | None) -> None:
            path = proxied_path(self.path)
            if path is None:
                self.send_error(404, "only Orthanc's DICOMweb is served under /dicom-web/")
                return
            status, headers, payload = self._ask_orthanc(self.command, path, body)
            if status == 200 and "json" in headers.get("Content-Type", ""):
                payload = default_voi_function_dropped(payload)
            self._relay(status, headers, payload)

        def _ask_orthanc(self, method: str, path: str, body: bytes | None):
            request = urllib.request.Request(orthanc + path, data=body, method=method)
            for name in _FORWARDED_HEADERS:
                if self.headers.get(name):
                    request.add_header(name, self.headers[name])
            try:
                with _OPENER.open(request, timeout=300) as answer:
                    return answer.status, answer.headers, answer.read()
            except urllib.error.HTTPError as error:
                return error.code, error.headers, error.read()
            except OSError as error:
                message = f"Orthanc at {orthanc} is not reachable: {error}\n".encode()
                return 502, {"Content-Type": "text/plain"}, message

        def _relay(self, status: int, headers, payload: bytes) -> None:
            self.send_response(status)
            for name in _RETURNED_HEADERS:
                if name in headers:
                    self.send_header(name, headers[name])
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's name
            # Paths carry study UIDs: log the status line only, never the request line.
            if args and str(args[0]).startswith(("GET", "POST", "HEAD")):
                return
            super().log_message(format, *args)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dist", type=Path, default=Path(__file__).with_name("dist"))
    parser.add_argument("--orthanc", default="http://127.0.0.1:8042", help="Orthanc's HTTP URL")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (only behind TLS: 0.0.0.0)"
    )
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)
    if not (args.dist / "index.html").is_file():
        parser.error(f"{args.dist} holds no OHIF dist; run orthanc/ohif/fetch_ohif.sh first")
    mimetypes.add_type("application/wasm", ".wasm")
    handler = make_handler(args.dist, args.orthanc.rstrip("/"))
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
