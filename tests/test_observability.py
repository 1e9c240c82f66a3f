"""Logs and the audit trail never carry instance UIDs in clear; DICOM's own UIDs stay readable."""

import json
import logging
import sys
import warnings

import pydicom
import pytest

from plugin.observability import (
    AuditTrail,
    JsonFormatter,
    TextFormatter,
    cap,
    hash_uid,
    quiet_pydicom,
    scrub_uids,
)

STUDY = "1.2.826.0.1.3680043.8.498.12345678901234567890"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _record(message: str, **fields) -> logging.LogRecord:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, message, None, None)
    record.fields = fields
    return record


def test_scrub_hashes_instance_uids_and_keeps_standard_ones():
    text = scrub_uids(f"study {STUDY} sent {CT_IMAGE_STORAGE}")
    assert STUDY not in text and hash_uid(STUDY) in text
    assert CT_IMAGE_STORAGE in text


def test_json_and_text_formatters_pseudonymise_fields_and_messages():
    record = _record(f"analysis of {STUDY} failed", study=STUDY, attempt=2)
    as_json = json.loads(JsonFormatter().format(record))
    as_text = TextFormatter().format(record)
    for line in (json.dumps(as_json), as_text):
        assert STUDY not in line
        assert hash_uid(STUDY) in line
    assert as_json["study"] == hash_uid(STUDY) and as_json["attempt"] == 2
    assert "attempt=2" in as_text


def test_audit_trail_hashes_uids(tmp_path):
    audit = AuditTrail(tmp_path / "audit.jsonl")
    audit.record("received", study=STUDY, detail=f"from PACS: {STUDY}")
    audit.close()
    line = (tmp_path / "audit.jsonl").read_text()
    assert STUDY not in line
    event = json.loads(line)
    assert event["event"] == "received" and event["study"] == hash_uid(STUDY)


def test_tracebacks_in_json_logs_are_scrubbed():
    try:
        open(f"/nonexistent/spool/instances/{STUDY}/x.dcm")
    except OSError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = JsonFormatter().format(record)
    assert STUDY not in line and hash_uid(STUDY) in json.loads(line)["exc"]


@pytest.fixture
def pydicom_logger_level():
    logger = logging.getLogger("pydicom")
    level = logger.level
    yield logger
    logger.setLevel(level)


def test_pydicom_value_warnings_are_kept_from_logs_and_console(pydicom_logger_level, caplog):
    def copy_birth_date(quiet: bool) -> list[str]:
        """What a result builder does with the source's patient module; pydicom quotes an
        invalid value in its warning, here a birth date."""
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if quiet:
                quiet_pydicom()
            pydicom.Dataset().PatientBirthDate = "12/04/1961"
        return [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]

    assert any("12/04/1961" in m for m in copy_birth_date(quiet=False))  # the leak
    assert not any("12/04/1961" in m for m in copy_birth_date(quiet=True))


def test_lines_are_capped_and_library_values_redacted(tmp_path):
    """A 1 MB value in a message, a field, an audit event or a traceback never makes a line
    longer than 16 kB, and values quoted by pydicom/pynetdicom messages are taken out."""
    huge = "PIDLEAK" * 150_000
    formatter = JsonFormatter()
    try:
        raise ValueError(f"Invalid 'Affected SOP Instance UID' value '{huge}'")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "pynetdicom", logging.ERROR, __file__, 1, f"Invalid value for VR DA: '{huge}'", None, None
    )
    record.exc_info = exc_info
    record.fields = {"reason": huge, "list": [huge] * 100, "nested": {"k": huge}}
    line = formatter.format(record)
    assert len(line) <= 16384 and "PIDLEAK" * 100 not in line
    assert "value <redacted>" in json.loads(line)["exc"]
    assert "VR DA: <redacted>" in json.loads(line)["msg"]
    audit = AuditTrail(tmp_path / "audit.jsonl")
    audit.record("skipped", reason=huge, sop_instance="1.2.3.4.5.6")
    audit.close()
    (event,) = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(event["reason"]) <= 512 and event["reason"].endswith("more chars]")
    assert cap("short") == "short"
