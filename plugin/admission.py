"""What a received data set must satisfy before the listener keeps it: a header that parses,
valid UIDs, image attributes the worker can use, pixel data as long as the header says, and
bytes encoded as the negotiated transfer syntax says.

Every check raises `Refused` with a failure status in the 0xC1xx range ("cannot understand":
the sender must not resend the same bytes) and a reason that names the attribute and what is
wrong with it, never its value: reasons reach the sender's ErrorComment, the audit trail, the
database and the logs.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, JPEG2000TransferSyntaxes, RLELossless

NOT_DICOM = 0xC100
BAD_UIDS = 0xC101
TRUNCATED_PIXELS = 0xC102
TOO_LARGE = 0xC103
BAD_ATTRIBUTE = 0xC104
SYNTAX_MISMATCH = 0xC105

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_INTEGER = re.compile(r"^\s*[+-]?\d+\s*$")


class Refused(Exception):
    """A C-STORE answered with a failure status; the reason goes into ErrorComment."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID.match(value))


def read_header(path: Path) -> tuple[Dataset, int | None]:
    """The data set up to the pixels, and the file offset of the Pixel Data element (None
    when the file has none)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fp:
            header = dcmread(fp, stop_before_pixels=True)
            offset = fp.tell()
            # Touch every element now: a malformed value must fail here, not in the worker.
            for _ in header.iterall():
                pass
    except Exception as exc:  # noqa: BLE001 - any parse failure means "cannot understand"
        raise Refused(NOT_DICOM, f"not a parseable DICOM data set ({type(exc).__name__})") from None
    if "TransferSyntaxUID" not in header.file_meta:
        raise Refused(NOT_DICOM, "no transfer syntax in the file meta")
    return header, (offset if offset < size else None)


# (keyword, allowed VRs, minimum, maximum): what reading and the outputs convert to int.
_IMAGE_INTEGERS = (
    ("Rows", ("US",), 1, 65535),
    ("Columns", ("US",), 1, 65535),
    ("BitsAllocated", ("US",), 1, 64),
    ("BitsStored", ("US",), 1, 64),
    ("HighBit", ("US",), 0, 63),
    ("SamplesPerPixel", ("US",), 1, 4),
    ("PixelRepresentation", ("US",), 0, 1),
    ("NumberOfFrames", ("IS",), 1, 2**31 - 1),
)


def image_integers(header: Dataset) -> dict[str, int]:
    """The image attributes the worker converts to integers, checked: present where the pixel
    module requires them, of the right VR, integral and in range."""
    out: dict[str, int] = {}
    for keyword, vrs, low, high in _IMAGE_INTEGERS:
        elem = header.get(keyword)
        if elem is None:
            continue
        elem = header[keyword]  # the DataElement, with its VR as received
        if elem.VR not in vrs:
            raise Refused(BAD_ATTRIBUTE, f"{keyword} has VR {elem.VR}; expected {vrs[0]}")
        value = elem.value
        if value in (None, "", b""):
            continue
        if isinstance(value, (list, tuple)) or elem.VM != 1:
            raise Refused(BAD_ATTRIBUTE, f"{keyword} holds several values; expected one")
        if elem.VR == "IS" and not _INTEGER.match(str(value)):
            raise Refused(BAD_ATTRIBUTE, f"{keyword} is not an integer")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise Refused(BAD_ATTRIBUTE, f"{keyword} is not an integer") from None
        if not low <= number <= high:
            raise Refused(BAD_ATTRIBUTE, f"{keyword} is out of range ({low}–{high})")
        out[keyword] = number
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if keyword not in out:
            raise Refused(BAD_ATTRIBUTE, f"{keyword} is missing or empty")
    if "BitsStored" in out and out["BitsStored"] > out["BitsAllocated"]:
        raise Refused(BAD_ATTRIBUTE, "BitsStored is larger than BitsAllocated")
    return out


# -- encoding --------------------------------------------------------------------------------

_J2K = frozenset(JPEG2000TransferSyntaxes)  # JPEG 2000 and HTJ2K
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "


def check_encoding(header: Dataset, syntax: UID, path: Path, offset: int | None) -> None:
    """The bytes must be what the negotiated transfer syntax says: the VR encoding and byte
    order pydicom found, and for the pixels, native or encapsulated as the syntax requires
    (with a codestream of the syntax's family)."""
    if syntax.is_deflated:
        return  # the pixels are inside the deflated stream; the worker checks when it decodes
    found_encoding = _data_set_encoding(path)
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    if found_encoding is not None and found_encoding != (implicit, little):
        implicit, little = found_encoding
        found = ("explicit VR", "implicit VR")[bool(implicit)]
        found += (" big endian", " little endian")[bool(little)]
        raise Refused(SYNTAX_MISMATCH, f"data set is {found}, unlike the negotiated syntax")
    if offset is None:
        return
    with path.open("rb") as fp:
        fp.seek(offset)
        head = fp.read(12)
        if len(head) < 8:
            return  # too short to hold an element: the pixel check reports it
        fmt = "<" if little else ">"
        group, element = struct.unpack(fmt + "HH", head[:4])
        if (group, element) != (0x7FE0, 0x0010):
            return  # Float/Double Float Pixel Data: not ours to judge
        length = (
            struct.unpack(fmt + "I", head[4:8])[0]
            if implicit
            else struct.unpack(fmt + "I", head[8:12])[0]
        )
        encapsulated = length == 0xFFFFFFFF
        if encapsulated != syntax.is_compressed:
            found, wanted = ("encapsulated", "native")[:: 1 if encapsulated else -1]
            reason = f"Pixel Data is {found}; the negotiated syntax is {wanted}"
            raise Refused(SYNTAX_MISMATCH, reason)
        if encapsulated:
            _check_codestream(fp, syntax)


_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)


def _data_set_encoding(path: Path) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) as the first element after the file meta is written, or
    None when there is no element to look at. pydicom silently reads either VR encoding
    whatever the transfer syntax says, so this looks at the bytes."""
    with path.open("rb") as fp:
        fp.seek(132)
        while True:  # the file meta group: explicit VR little endian by definition
            head = fp.read(8)
            if len(head) < 8:
                return None
            group = struct.unpack("<H", head[:2])[0]
            if group != 0x0002:
                break
            if head[4:6] in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL"):
                length = struct.unpack("<I", fp.read(4))[0]
            else:
                length = struct.unpack("<H", head[6:8])[0]
            fp.seek(length, 1)
    little = group <= 0x00FF or struct.unpack(">H", head[:2])[0] > 0x00FF
    return head[4:6] not in _VRS, little


def _check_codestream(fp, syntax: UID) -> None:  # noqa: ANN001 - a binary file object
    """The first fragment starts the way the syntax's codec family starts."""
    item = fp.read(8)  # Basic Offset Table item
    if len(item) < 8 or item[:4] != b"\xfe\xff\x00\xe0":
        raise Refused(SYNTAX_MISMATCH, "encapsulated Pixel Data has no Basic Offset Table item")
    fp.seek(struct.unpack("<I", item[4:])[0], 1)
    item = fp.read(8)
    if len(item) < 8 or item[:4] != b"\xfe\xff\x00\xe0":
        return  # no fragment: the pixel check reports missing data
    first = fp.read(16)
    if syntax in _J2K:
        ok = first[:4] == b"\xff\x4f\xff\x51" or first[:8] == _JP2_SIGNATURE
    elif syntax == RLELossless:
        segments = struct.unpack("<I", first[:4])[0] if len(first) >= 4 else 0
        ok = 1 <= segments <= 15
    else:  # JPEG baseline/extended/lossless and JPEG-LS: an SOI marker
        ok = first[:2] == b"\xff\xd8"
    if not ok:
        raise Refused(SYNTAX_MISMATCH, "compressed Pixel Data is not in the negotiated format")
