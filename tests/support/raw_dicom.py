"""A minimal DICOM Upper Layer client written from PS3.8, for tests that must send what a
well-behaved SCU refuses to: over-long or empty request UIDs, bytes that do not match the
negotiated transfer syntax, a transfer cut off by a TCP reset, huge PDU lengths, and many
data sets per association at full speed.

    with RawAssociation.open(port, [(MG, [EXPLICIT])]) as assoc:
        status = assoc.store(MG, sop_uid, dataset_bytes(ds, EXPLICIT))
        assert status.status == 0xC101
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def dataset_bytes(ds: Dataset, syntax: str) -> bytes:
    """The data set (no file meta) encoded as `syntax` says, or as it was read when the
    caller wants a mismatch (pass the syntax the bytes should claim to be in)."""
    ts = UID(syntax)
    fp = DicomBytesIO()
    fp.is_little_endian = ts.is_little_endian
    fp.is_implicit_VR = ts.is_implicit_VR
    write_dataset(fp, ds)
    return fp.getvalue()


def _element(group: int, elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, elem, len(value)) + value


def command_set(fields: Sequence[tuple[int, bytes]]) -> bytes:
    """An implicit VR little endian command set with its group length."""
    body = b"".join(_element(0x0000, e, v) for e, v in fields)
    return _element(0x0000, 0x0000, struct.pack("<I", len(body))) + body


def decode_command(raw: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos + 8 <= len(raw):
        _, elem, length = struct.unpack_from("<HHI", raw, pos)
        out[elem] = raw[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


@dataclass(frozen=True)
class Response:
    status: int
    error_comment: str | None
    affected_sop_instance: str


class Closed(Exception):
    """The peer aborted or closed the connection instead of answering."""


class RawAssociation:
    """One association over a plain socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.accepted: dict[str, tuple[int, str]] = {}
        """abstract syntax → (presentation context ID, accepted transfer syntax)."""
        self.rejected = False
        self.peer_max_pdu = 16384
        self._message_id = 0

    @classmethod
    def open(
        cls,
        port: int,
        contexts: Sequence[tuple[str, Sequence[str]]],
        *,
        calling: str = "PACS",
        called: str = "MAMMO_AI",
        host: str = "127.0.0.1",
        timeout: float = 30,
        max_pdu: int = 65536,
    ) -> RawAssociation:
        sock = socket.create_connection((host, port), timeout=timeout)
        assoc = cls(sock)
        items = _item(0x10, APPLICATION_CONTEXT)
        for i, (abstract, syntaxes) in enumerate(contexts):
            sub = _item(0x30, _uid(abstract)) + b"".join(_item(0x40, _uid(t)) for t in syntaxes)
            items += _item(0x20, struct.pack(">BBBB", 2 * i + 1, 0, 0, 0) + sub)
        items += _item(0x50, _item(0x51, struct.pack(">I", max_pdu)))
        body = (
            struct.pack(">HH", 1, 0)
            + called.encode().ljust(16)
            + calling.encode().ljust(16)
            + b"\0" * 32
            + items
        )
        assoc._send_pdu(0x01, body)
        kind, payload = assoc._read_pdu()
        if kind == 0x03:
            assoc.rejected = True
            return assoc
        if kind != 0x02:
            raise Closed(f"unexpected PDU type {kind:#x} in answer to A-ASSOCIATE-RQ")
        by_id = {2 * i + 1: abstract for i, (abstract, _) in enumerate(contexts)}
        pos = 68
        while pos < len(payload):
            item, _, length = struct.unpack_from(">BBH", payload, pos)
            value = payload[pos + 4 : pos + 4 + length]
            if item == 0x21 and value[2] == 0:
                cid = value[0]
                ts_len = struct.unpack_from(">H", value, 6)[0]
                syntax = value[8 : 8 + ts_len].rstrip(b"\0").decode()
                assoc.accepted[by_id[cid]] = (cid, syntax)
            elif item == 0x50 and value[:1] == b"\x51":
                assoc.peer_max_pdu = struct.unpack_from(">I", value, 4)[0] or 1 << 30
            pos += 4 + length
        return assoc

    # -- PDUs ---------------------------------------------------------------------------------

    def _send_pdu(self, kind: int, body: bytes) -> None:
        self.sock.sendall(struct.pack(">BBI", kind, 0, len(body)) + body)

    def _recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise Closed("connection closed by the peer")
            out += chunk
        return bytes(out)

    def _read_pdu(self) -> tuple[int, bytes]:
        try:
            kind, _, length = struct.unpack(">BBI", self._recv(6))
        except (TimeoutError, ConnectionError) as exc:
            raise Closed(f"no answer: {type(exc).__name__}") from None
        payload = self._recv(length)
        if kind == 0x07:
            raise Closed(f"A-ABORT (source {payload[2]}, reason {payload[3]})")
        return kind, payload

    def send_pdv(self, cid: int, control: int, data: bytes) -> None:
        item = struct.pack(">IBB", len(data) + 2, cid, control) + data
        self._send_pdu(0x04, item)

    # -- DIMSE --------------------------------------------------------------------------------

    def store_request(self, sop_class: str, sop_instance: str, *, cid: int | None = None) -> int:
        """Send the C-STORE-RQ command; returns the context ID used."""
        if cid is None:
            cid = self.accepted[sop_class][0]
        self._message_id += 1
        cmd = command_set(
            [
                (0x0002, _uid(sop_class)),
                (0x0100, struct.pack("<H", 0x0001)),
                (0x0110, struct.pack("<H", self._message_id)),
                (0x0700, struct.pack("<H", 0)),
                (0x0800, struct.pack("<H", 0x0000)),
                (0x1000, _uid(sop_instance)),
            ]
        )
        self.send_pdv(cid, 0x03, cmd)
        return cid

    def send_data(self, cid: int, data: bytes, *, last: bool = True) -> None:
        step = max(1024, min(self.peer_max_pdu, 1 << 20) - 6)
        chunks = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
        for i, chunk in enumerate(chunks):
            final = last and i == len(chunks) - 1
            self.send_pdv(cid, 0x02 if final else 0x00, chunk)

    def read_response(self) -> Response:
        command = b""
        while True:
            kind, payload = self._read_pdu()
            if kind != 0x04:
                raise Closed(f"unexpected PDU type {kind:#x} instead of a C-STORE-RSP")
            pos = 0
            while pos < len(payload):
                length, _, control = struct.unpack_from(">IBB", payload, pos)
                command += payload[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if control & 0x03 == 0x03:
                    fields = decode_command(command)
                    comment = fields.get(0x0902)
                    return Response(
                        status=struct.unpack("<H", fields[0x0900])[0],
                        error_comment=comment.rstrip(b"\0 ").decode() if comment else None,
                        affected_sop_instance=fields.get(0x1000, b"").rstrip(b"\0").decode(),
                    )

    def store(
        self, sop_class: str, sop_instance: str, data: bytes, *, cid: int | None = None
    ) -> Response:
        cid = self.store_request(sop_class, sop_instance, cid=cid)
        self.send_data(cid, data)
        return self.read_response()

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0): a cable pulled mid-transfer."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def release(self) -> None:
        try:
            self._send_pdu(0x05, b"\0\0\0\0")
            self._read_pdu()
        except (Closed, OSError):
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sock.fileno() != -1:
            self.release()
