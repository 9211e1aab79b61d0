"""The one redaction function: patient data in every form a log line carries it, and secrets."""

from __future__ import annotations

import io
import logging

import pydicom
import pytest

from segmap.privacy import RedactingFilter, redact, redact_patient, redact_secrets, strip_userinfo

pytestmark = pytest.mark.unit

SECRETS = ("DOE", "JOHN", "JANE", "ACC123", "S3cret", "1234567", "19700101", "Main Street")


def _clean(text: str) -> None:
    for needle in SECRETS:
        assert needle not in text, f"{needle!r} survived in {text!r}"


@pytest.mark.parametrize("line", [
    "PatientName: DOE^JOHN",
    "PatientName=DOE^JOHN series 1.2.3",
    "'PatientName': 'DOE^JOHN', 'Modality': 'CT'",
    '{"PatientName": "DOE^JOHN", "PatientID": "1234567"}',
    "patient_name DOE^JOHN",
    "AccessionNumber ACC123",
    "Accession Number: ACC123",
    "PatientBirthDate 19700101",
    "(0010,0010) Patient's Name                      PN: 'DOE^JOHN'",
    "(0010, 0020) Patient ID                        LO: '1234567'",
    "(0008,0050) Accession Number                  SH: 'ACC123'",
    '"00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]}',
    '{"00080050": {"vr": "SH", "Value": ["ACC123"]}, "00080060": {"vr": "CS", "Value": ["CT"]}}',
    "00100020=1234567",
    "0x00100030: 19700101",
    "PatientAddress: 1 Main Street, Springfield",
    "OtherPatientIDs 1234567",
    "error: could not match DOE^JOHN to any rule",
    "Traceback: ValueError('bad name DOE^JANE^^DR')",
])
def test_patient_values_are_redacted_in_every_form(line):
    out = redact(line)
    _clean(out)
    assert "[redacted]" in out


def test_the_rest_of_the_line_survives():
    line = '{"00080060": {"vr": "CS", "Value": ["CT"]}, "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]}}'
    out = redact(line)
    assert '"00080060": {"vr": "CS", "Value": ["CT"]}' in out
    assert "DOE" not in out
    plain = "segmap: error: no series matches the task's rules (found CT 'Abdomen 5mm', 40 slices) in 1.2.826.0.1.3"
    assert redact(plain) == plain


def test_a_pydicom_dataset_dump_is_clean():
    ds = pydicom.Dataset()
    ds.PatientName = "DOE^JOHN"
    ds.PatientID = "1234567"
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "ACC123"
    ds.Modality = "CT"
    out = redact(str(ds))
    _clean(out)
    assert "Modality" in out and "CT" in out


@pytest.mark.parametrize("url, want", [
    ("http://u:S3cret@h", "http://h"),
    ("https://user:S3cret@orthanc.example:8042/dicom-web?x=1", "https://orthanc.example:8042/dicom-web?x=1"),
    ("postgresql://segmap:S3cret@db/segmap?sslmode=require", "postgresql://db/segmap?sslmode=require"),
    ("postgresql://db/segmap?password=S3cret&sslmode=require", "postgresql://db/segmap?password=[redacted]&sslmode=require"),
    ("http://h:8042/x", "http://h:8042/x"),
    ("not a url", "not a url"),
])
def test_strip_userinfo(url, want):
    assert strip_userinfo(url) == want


@pytest.mark.parametrize("line", [
    "export failed: POST http://u:S3cret@h/instances: connection refused",
    "store: dbname=segmap user=segmap password=S3cret host=db",
    "Authorization: Bearer S3cret",
    "headers {'Authorization': 'Basic S3cret'}",
    "token=S3cret",
])
def test_secrets_are_redacted(line):
    out = redact_secrets(line)
    assert "S3cret" not in out
    assert "[redacted]" in out or "://h" in out


def test_the_log_filter_redacts_messages_arguments_and_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("segmap.test_privacy")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("destination %s failed for %s", "http://u:S3cret@h", "PatientName=DOE^JOHN")
        try:
            raise ValueError("AccessionNumber ACC123")
        except ValueError:
            logger.exception("job failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    _clean(text)
    assert "destination http://h failed" in text
    assert "job failed" in text and "ValueError" in text


def test_redact_is_idempotent():
    once = redact('PatientName: DOE^JOHN "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]}')
    assert redact(once) == once
    assert redact_patient("") == ""
