"""De-identification: salted hashes for identifiers, and scrubbing them out of any free text.

PatientName, PatientID, PatientBirthDate (and manifest columns that hold them) are only ever
hashed here; they never reach the catalog, the errors table or a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

SALT_ENV = "VOXSEARCH_SALT"
SALT_FILE = ".salt"
# Manifest columns that identify a person: hashed into patient_key (the first present) or dropped.
PATIENT_COLUMNS = ("patient_id", "patientid", "mrn", "medical_record_number")
IDENTIFIER_COLUMNS = frozenset(PATIENT_COLUMNS + (
    "patient_name", "patientname", "name", "patient_birth_date", "patientbirthdate", "birth_date", "dob",
    "date_of_birth", "accession_number", "accession", "ssn", "address", "phone",
))


def salted_hash(salt: str, kind: str, value: str, length: int = 20) -> str:
    """Keyed hash (HMAC-SHA256): without the salt nobody can test guesses of an identifier."""
    return hmac.new(salt.encode(), f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:length]


def load_or_create_salt(catalog_dir: Path, explicit: str | None = None) -> str:
    """The salt for a catalog: given, from VOXSEARCH_SALT, or created once beside the catalog.

    It must stay the same across incremental runs, or the same study would get a new id.
    """
    if explicit:
        return explicit
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV]
    path = Path(catalog_dir) / SALT_FILE
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_hex(32)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(salt)
    os.replace(tmp, path)
    return salt


def identifier_variants(values) -> list[str]:
    """The strings under which an identifier may appear in text (DICOM PN uses ^ between parts)."""
    out = set()
    for value in values:
        if not value:
            continue
        value = str(value).strip()
        if len(value) < 3:
            continue
        out.add(value)
        parts = [p for p in re.split(r"[\^ ,]+", value) if len(p) >= 3]
        out.update(parts)
        if "^" in value:
            out.add(value.replace("^", " "))
        if re.fullmatch(r"\d{8}", value):  # DICOM DA -> ISO date
            out.add(f"{value[:4]}-{value[4:6]}-{value[6:]}")
    return sorted(out, key=len, reverse=True)


def scrub(text: str | None, identifiers) -> str | None:
    if not text:
        return text
    for variant in identifier_variants(identifiers):
        text = re.sub(re.escape(variant), "[redacted]", text, flags=re.IGNORECASE)
    return text
