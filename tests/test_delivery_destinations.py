"""Destination models, secrets, the sender factory and status classification."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from plugin.delivery import (
    Destination,
    DestinationError,
    DicomDestination,
    DicomwebDestination,
    FolderDestination,
    OrthancDestination,
    make_sender,
)
from plugin.delivery.base import classify_http, classify_status
from plugin.delivery.cstore import CStoreSender
from plugin.delivery.folder import FolderSender
from plugin.delivery.orthanc_rest import OrthancSender
from plugin.delivery.stow import StowSender

ADAPTER = TypeAdapter(Destination)


def parse(data: dict, base: Path | None = None):
    return ADAPTER.validate_python(data, context={"base": base} if base else None)


def test_type_selects_the_model_and_defaults() -> None:
    dicom = parse(
        {"type": "dicom", "name": "pacs", "host": "pacs", "port": 104, "called_ae": "PACS"}
    )
    assert isinstance(dicom, DicomDestination)
    assert (dicom.calling_ae, dicom.tls, dicom.max_pdu) == ("MAMMO_AI", None, 16382)
    web = parse({"type": "dicomweb", "name": "web", "url": "https://pacs/dicom-web/"})
    assert isinstance(web, DicomwebDestination) and web.url == "https://pacs/dicom-web"
    assert isinstance(
        parse({"type": "orthanc", "name": "o", "url": "http://localhost:8042"}), OrthancDestination
    )
    assert isinstance(parse({"type": "folder", "name": "f", "path": "/x"}), FolderDestination)


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    folder = parse({"type": "folder", "name": "f", "path": "out/results"}, base=tmp_path)
    assert folder.path == tmp_path / "out" / "results"
    dicom = parse(
        {
            "type": "dicom",
            "name": "p",
            "host": "h",
            "port": 1,
            "called_ae": "P",
            "tls": {"ca": "pki/ca.pem"},
        },
        base=tmp_path,
    )
    assert dicom.tls.ca == tmp_path / "pki" / "ca.pem"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"type": "smtp", "name": "x"}, "does not match any of the expected tags"),
        ({"type": "folder", "name": "f", "path": "/x", "pth": 1}, "Extra inputs"),
        (
            {"type": "dicom", "name": "p", "host": "h", "port": 70000, "called_ae": "P"},
            "less than or equal to 65535",
        ),
        (
            {"type": "dicom", "name": "p", "host": "h", "port": 104, "called_ae": "A\\B"},
            "without backslash",
        ),
        (
            {
                "type": "dicom",
                "name": "p",
                "host": "h",
                "port": 104,
                "called_ae": "SEVENTEEN_CHARS_X",
            },
            "1 to 16 printable",
        ),
        (
            {
                "type": "dicom",
                "name": "p",
                "host": "h",
                "port": 104,
                "called_ae": "P",
                "tls": {"cert": "c.pem"},
            },
            "both cert and key",
        ),
        ({"type": "dicomweb", "name": "w", "url": "pacs/dicom-web"}, "http:// or https://"),
        (
            {"type": "dicomweb", "name": "w", "url": "http://p", "username": "u"},
            "username together with password_env",
        ),
        (
            {
                "type": "dicomweb",
                "name": "w",
                "url": "http://p",
                "username": "u",
                "password_env": "P",
                "token_env": "T",
            },
            "either token_env or username",
        ),
        (
            {"type": "orthanc", "name": "o", "url": "http://p", "password_env": "P"},
            "username together with password_env",
        ),
        (
            {
                "type": "orthanc",
                "name": "o",
                "url": "http://p",
                "username": "u",
                "password_env": "not a name",
            },
            "should match pattern",
        ),
        ({"type": "folder", "name": "has space", "path": "/x"}, "should match pattern"),
    ],
)
def test_bad_destinations_fail_with_a_reason(data: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        parse(data)


def test_factory_makes_one_sender_per_kind(tmp_path: Path) -> None:
    cases = [
        ({"type": "dicom", "name": "p", "host": "h", "port": 104, "called_ae": "P"}, CStoreSender),
        ({"type": "dicomweb", "name": "w", "url": "http://p/dicom-web"}, StowSender),
        ({"type": "orthanc", "name": "o", "url": "http://p:8042"}, OrthancSender),
        ({"type": "folder", "name": "f", "path": str(tmp_path)}, FolderSender),
    ]
    for data, kind in cases:
        sender = make_sender(parse(data))
        assert isinstance(sender, kind)
        sender.close()


def test_secrets_come_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    dest = parse(
        {
            "type": "orthanc",
            "name": "o",
            "url": "http://p:8042",
            "username": "ai",
            "password_env": "MAMMO_TEST_DELIVERY_PW",
        }
    )
    monkeypatch.delenv("MAMMO_TEST_DELIVERY_PW", raising=False)
    with pytest.raises(DestinationError, match="MAMMO_TEST_DELIVERY_PW, which is not set"):
        make_sender(dest)
    monkeypatch.setenv("MAMMO_TEST_DELIVERY_PW", "s3cret")
    make_sender(dest).close()  # the secret reaching Orthanc: test_delivery_orthanc


def test_unreadable_tls_files_are_a_destination_error(tmp_path: Path) -> None:
    dest = parse(
        {
            "type": "dicom",
            "name": "p",
            "host": "h",
            "port": 104,
            "called_ae": "P",
            "tls": {"ca": str(tmp_path / "missing.pem")},
        }
    )
    with pytest.raises(DestinationError, match="cannot load its TLS files"):
        make_sender(dest)


@pytest.mark.parametrize(
    ("status", "ok", "retryable", "text"),
    [
        (0x0000, True, False, "stored"),
        (0xB000, True, False, "coercion"),
        (0xB007, True, False, "warning 0xB007"),
        (0xA700, False, True, "out of resources"),
        (0xA7FF, False, True, "out of resources"),
        (0xA900, False, False, "does not match SOP class"),
        (0xC000, False, False, "cannot understand"),
        (0xCFFF, False, False, "cannot understand"),
        (0x0122, False, False, "SOP class"),
        (0x0124, False, False, "not authorised"),
        (0x0110, False, True, "failure status 0x0110"),
    ],
)
def test_dimse_status_classes(status: int, ok: bool, retryable: bool, text: str) -> None:
    got_ok, got_retryable, detail = classify_status(status)
    assert (got_ok, got_retryable) == (ok, retryable)
    assert text in detail


@pytest.mark.parametrize(
    ("code", "retryable", "text"),
    [
        (500, True, "will retry"),
        (503, True, "will retry"),
        (429, True, "will retry"),
        (408, True, "will retry"),
        (401, False, "credentials"),
        (403, False, "credentials"),
        (404, False, "url"),
        (400, False, "refused"),
    ],
)
def test_http_status_classes(code: int, retryable: bool, text: str) -> None:
    got, detail = classify_http(code)
    assert got is retryable and text in detail
