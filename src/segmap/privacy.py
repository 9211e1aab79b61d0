"""One redaction function for everything segmap shows: logs, job records, pages, metrics, ``segmap jobs show``.

Two kinds of text must never leave the process on a page or in a record:

- **patient data**: the value of a patient-identifying DICOM attribute, in any of the forms a log line carries it:
  the keyword (``PatientName: DOE^JOHN``, ``'PatientID': '123'``, Orthanc's ``"PatientName": "DOE^JOHN"``), pydicom's
  dataset dump (``(0010,0010) Patient's Name  PN: 'DOE^JOHN'``), the tag alone (``(0010,0020) 123``, ``00100020``) and
  DICOM JSON (``"00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]}``). A bare DICOM person name
  (components joined by ``^``, as in ``DOE^JOHN``) is redacted wherever it stands, since nothing else in segmap's
  output has that shape.
- **secrets**: the user-info of any URL (``http://user:S3cret@host`` -> ``http://host``, found and rebuilt with
  :func:`urllib.parse.urlsplit`), ``password=``/``token=``/``secret=`` values in query strings and connection strings,
  and ``Authorization`` header values.

The attribute list comes from pydicom's data dictionary by keyword, so tags and names cannot drift apart. This
module is ground floor: it imports nothing of segmap's.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from urllib.parse import SplitResult, urlsplit, urlunsplit

from pydicom.datadict import dictionary_description, tag_for_keyword

REDACTED = "[redacted]"

#: DICOM attributes whose values identify a patient (or lead straight to one): never shown anywhere.
PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientBirthName",
    "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence", "PatientAddress", "PatientTelephoneNumbers",
    "PatientMotherBirthName", "MedicalRecordLocator", "AccessionNumber", "PatientInsurancePlanCodeSequence",
    "MilitaryRank", "BranchOfService", "CountryOfResidence", "RegionOfResidence", "ResponsiblePerson",
    "PatientComments", "AdmissionID", "ReferringPhysicianName", "RequestingPhysician", "PerformingPhysicianName",
    "OperatorsName", "InstitutionAddress",
)

#: Query and connection-string keys whose values are secrets.
SECRET_KEYS = ("password", "passwd", "pwd", "pass", "token", "access_token", "secret", "api_key", "apikey",
               "sslpassword", "client_secret")


@lru_cache(maxsize=1)
def _patient_patterns() -> tuple[re.Pattern, ...]:
    keywords, hex_tags, names = [], [], []
    for keyword in PATIENT_KEYWORDS:
        tag = tag_for_keyword(keyword)
        if tag is None:  # a keyword this pydicom does not know: keep the others working
            continue
        keywords.append(keyword)
        hex_tags.append(f"{tag >> 16:04X}{tag & 0xFFFF:04X}")
        names.append(re.escape(dictionary_description(tag)))
    kw = "|".join(sorted(keywords, key=len, reverse=True))
    tags = "|".join(hex_tags)
    groups = "|".join(f"{t[:4]}\\s*,\\s*{t[4:]}" for t in hex_tags)
    described = "|".join(sorted(names, key=len, reverse=True))
    # A value: a quoted string, or the rest of a run of characters up to a delimiter.
    value = r"""(?:\[redacted\]|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s,;}\]\)]+(?:[ ^][^\s,;}\]\)=:]+)*)"""
    return (
        # DICOM JSON: "00100010": {"vr": "PN", "Value": [...]} -- the whole Value array goes.
        re.compile(rf'(?i)("(?:{tags})"\s*:\s*\{{[^{{}}]*?"Value"\s*:\s*)\[(?:[^\[\]]|\[[^\[\]]*\])*\]'),
        # pydicom's dump: (0010,0010) Patient's Name   PN: 'DOE^JOHN'
        re.compile(rf"(?i)(\(\s*(?:{groups})\s*\)\s*(?:(?:{described})\s+)?(?:[A-Z]{{2}}\s*:\s*)?)({value})"),
        # the keyword or its description, in code, YAML, JSON or prose: PatientName=..., "PatientID": "..."
        re.compile(rf"""(?i)(["']?\b(?:{kw}|{described})\b["']?\s*(?:[:=]|\s)\s*)({value})"""),
        # a bare tag: 00100010 value, 0x00100020=value, 0010,0020: value
        re.compile(rf"""(?i)(\b(?:0x)?(?:{tags}|{groups})\b["']?\s*[:=]?\s*)({value})"""),
    )


#: A DICOM person name: two or more components joined by carets (DOE^JOHN, DOE^JOHN^^DR).
_PERSON_NAME = re.compile(r"(?<![\w^])[^\W\d_][\w'.-]*(?:\^[\w'.-]*)+\^?[\w'.-]*")


def redact_patient(text: str) -> str:
    """``text`` with every patient-identifying DICOM value replaced by ``[redacted]`` (the attribute stays)."""
    if not text:
        return text
    json_form, *others = _patient_patterns()
    text = json_form.sub(lambda m: m.group(1) + f'["{REDACTED}"]', text)
    for pattern in others:
        text = pattern.sub(lambda m: m.group(1) + (m.group(2) if m.group(2).startswith(REDACTED) else REDACTED), text)
    return _PERSON_NAME.sub(REDACTED, text)


def strip_userinfo(url: str) -> str:
    """``url`` without user name and password (``http://u:p@h:8042/x`` -> ``http://h:8042/x``) and without secret
    query values; anything that is not a URL with a network location comes back unchanged."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return _redact_secret_pairs(str(url))
    if not parts.netloc or "@" not in parts.netloc:
        return _redact_secret_pairs(str(url))
    host = parts.netloc.rpartition("@")[2]
    return _redact_secret_pairs(urlunsplit(SplitResult(parts.scheme, host, parts.path, parts.query, parts.fragment)))


_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_SECRET_PAIR = re.compile(rf"(?i)(\b(?:{'|'.join(SECRET_KEYS)})\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s&;,'\"]+)")
_AUTH_HEADER = re.compile(r"""(?i)\b(authorization["']?\s*[:=]\s*["']?(?:(?:bearer|basic|token)\s+)?)[^\s'"]+""")


def _redact_secret_pairs(text: str) -> str:
    return _SECRET_PAIR.sub(lambda m: m.group(1) + REDACTED, text)


def redact_secrets(text: str) -> str:
    """``text`` with URL user-info, ``password=``-style values and Authorization header values removed."""
    if not text:
        return text
    text = _URL.sub(lambda m: strip_userinfo(m.group(0)), text)
    text = _AUTH_HEADER.sub(lambda m: m.group(1) + REDACTED, text)
    return _redact_secret_pairs(text)


def redact(text: str) -> str:
    """The one function every shown text passes: secrets first (a URL may hold a name), then patient data."""
    return redact_patient(redact_secrets(text)) if text else text


class RedactingFilter(logging.Filter):
    """A logging filter that rewrites each record's message through :func:`redact` (arguments merged first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler to report
            return True
        cleaned = redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Make every handler of ``logger`` (the root logger by default) redact what it writes. Idempotent."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
