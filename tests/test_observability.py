"""Logs and the audit trail never carry instance UIDs in clear; DICOM's own UIDs stay readable."""

import json
import logging

from plugin.observability import AuditTrail, JsonFormatter, TextFormatter, hash_uid, scrub_uids

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
