"""De-identification: salted hashes for identifiers, and scrubbing them out of any free text.

PatientName, PatientID, PatientBirthDate (and manifest columns that hold them) are only ever
hashed or used to scrub text here; they never reach the catalog, the errors table or a log line.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import unicodedata
from pathlib import Path

from voxsearch.common.durable import atomic_write_text
from voxsearch.common.storage import is_uri

SALT_ENV = "VOXSEARCH_SALT"
SALT_FILE = ".salt"
REDACTED = "[redacted]"

# Manifest columns compared in compact form (lower case, no spaces/underscores/punctuation), so
# "Patient Name", "patient_name" and "PatientName" are one column. A "patient"/"patients" prefix is
# ignored too ("Patient E-mail" is "email").
# The first present patient column is hashed into patient_key.
PATIENT_COLUMNS = frozenset({"patientid", "mrn", "medicalrecordnumber"})
# Person identifiers of DICOM PS3.15 Table E.1-1 (Basic Profile) as manifests name them: never kept.
IDENTIFIER_COLUMNS = PATIENT_COLUMNS | frozenset({
    # names
    "name", "names", "fullname", "firstname", "lastname", "givenname", "familyname", "middlename", "surname",
    "forename", "forenames", "maidenname", "birthname", "mothersmaidenname", "mothersbirthname", "othernames",
    "otherpatientnames", "nickname", "initials",
    # ids
    "otherpatientids", "otherids", "medicalrecord", "medicalrecordlocator", "hospitalnumber",
    "hospitalid", "recordnumber", "accession", "accessionnumber", "accessionno", "accessionid", "ssn",
    "socialsecuritynumber", "nationalid", "nationalidentifier", "nationalidnumber", "nhsnumber", "insuranceid",
    "insurancenumber", "insuranceplanidentification", "healthplannumber", "passportnumber", "licensenumber",
    "driverslicense", "admissionid", "visitid", "encounterid",
    # dates of the person
    "birthdate", "dateofbirth", "dob", "birthtime", "timeofbirth", "birthday", "deathdate", "dateofdeath",
    # contact
    "address", "streetaddress", "street", "city", "zip", "zipcode", "postcode", "postalcode", "phone",
    "phonenumber", "phonenumbers", "telephone", "telephonenumber", "telephonenumbers", "mobile", "fax", "email",
    "emailaddress", "countryofresidence", "regionofresidence",
    # people and places around the study
    "referringphysician", "referringphysicianname", "performingphysicianname", "requestingphysician",
    "physiciansofrecord", "nameofphysiciansreadingstudy", "readingphysician", "operatorsname", "operator",
    "radiologist", "responsibleperson", "institutionname", "institutionaddress", "institution",
})

# Header attributes of DICOM PS3.15 Table E.1-1 that name or number a person: read only to hash the
# patient and to scrub text of them.
DICOM_IDENTIFIER_KEYWORDS = (
    "PatientID", "PatientName", "PatientBirthDate", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "MedicalRecordLocator",
    "AccessionNumber", "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    "OperatorsName",
)


def column_key(name) -> str:
    """A manifest column's catalog name: lower case, runs of spaces and punctuation as one underscore."""
    return re.sub(r"[\W_]+", "_", str(name).strip().lower()).strip("_")


def _compact_forms(name) -> set[str]:
    key = re.sub(r"[\W_]+", "", str(name).lower())
    return {key} | {key[len(p):] for p in ("patients", "patient") if key.startswith(p) and key[len(p):]}


def is_identifier_column(name) -> bool:
    return bool(_compact_forms(name) & IDENTIFIER_COLUMNS)


def is_patient_column(name) -> bool:
    return bool(_compact_forms(name) & PATIENT_COLUMNS)


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
    if is_uri(catalog_dir):
        raise ValueError(f"catalog {catalog_dir} is in object storage: give its salt (--salt-file or {SALT_ENV}); "
                         "the secret is not stored in a bucket beside the catalog")
    path = Path(catalog_dir) / SALT_FILE
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_hex(32)
    atomic_write_text(path, salt, mode=0o600)
    return salt


class IdentifierSeal:
    """Identifiers on their way from the ingest driver to its workers, for scrubbing only.

    Work items pass through Ray's object store, which spills to disk under memory pressure; sealed
    under a key that lives only in the memory of this run's processes, what could land there is
    ciphertext.
    """

    def __init__(self, key: str | None = None):
        from cryptography.fernet import Fernet

        self.key = key or Fernet.generate_key().decode()
        self._fernet = Fernet(self.key.encode())

    def seal(self, values) -> str | None:
        values = [str(v) for v in values or () if v]
        return self._fernet.encrypt(json.dumps(values).encode()).decode() if values else None

    def open(self, token: str | None) -> list[str]:
        return json.loads(self._fernet.decrypt(token.encode())) if token else []


# --- scrubbing -------------------------------------------------------------------------------------

_MONTHS = ("jan(?:uary)?", "feb(?:ruary)?", "mar(?:ch)?", "apr(?:il)?", "may", "june?", "july?", "aug(?:ust)?",
           "sep(?:t(?:ember)?)?", "oct(?:ober)?", "nov(?:ember)?", "dec(?:ember)?")
_MONTH_ANY = "|".join(_MONTHS)
_ORDINAL = r"(?:st|nd|rd|th)?"
# Before/after a match: no letter or digit (underscore and punctuation separate words, as in file names).
_NOT_ALNUM_BEFORE, _NOT_ALNUM_AFTER = r"(?<![^\W_])", r"(?![^\W_])"
# Scripts written without spaces between words: their name parts cannot wait for a word boundary.
_UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_ID_SEP = r"[\s./_-]?"


def _valid_date(y: int, m: int, d: int) -> dt.date | None:
    try:
        return dt.date(y, m, d) if 1800 <= y <= 2200 else None
    except ValueError:
        return None


def _dates_of(value: str) -> set[dt.date]:
    """The dates an identifier value may denote (both readings when day and month could swap)."""
    v = value.strip()
    found = set()
    m = re.match(r"(\d{4})(\d{2})(\d{2})(?:\d{2}(?:\d{2}){0,2})?(?!\d)", v)  # DICOM DA, or DT with a time
    if m:
        found.add(_valid_date(int(m.group(1)), int(m.group(2)), int(m.group(3))))
    m = re.match(r"(\d{4})[-./](\d{1,2})[-./](\d{1,2})(?!\d)", v)
    if m:
        found.add(_valid_date(int(m.group(1)), int(m.group(2)), int(m.group(3))))
    m = re.match(r"(\d{1,2})[-./ ](\d{1,2})[-./ ](\d{4})(?!\d)", v)
    if m:
        a, b, y = int(m.group(1)), int(m.group(2)), int(m.group(3))
        found |= {_valid_date(y, b, a), _valid_date(y, a, b)}
    for pattern, order in ((rf"(\d{{1,2}}){_ORDINAL}[\s./-]*({_MONTH_ANY})\.?[\s,./-]*(\d{{4}})", "dmy"),
                           (rf"({_MONTH_ANY})\.?\s*(\d{{1,2}}){_ORDINAL},?\s*(\d{{4}})", "mdy")):
        m = re.fullmatch(pattern, v, flags=re.IGNORECASE)
        if m:
            day, month, year = (m.group(1), m.group(2), m.group(3)) if order == "dmy" else (
                m.group(2), m.group(1), m.group(3))
            month_no = next(i for i, p in enumerate(_MONTHS, 1) if re.fullmatch(p, month, flags=re.IGNORECASE))
            found.add(_valid_date(int(year), month_no, int(day)))
    found.discard(None)
    return found


def _date_patterns(date: dt.date) -> list[str]:
    """How one date is written in reports: numeric in any order and separator, or with a month name."""
    y, yy = str(date.year), f"{date.year % 100:02d}"
    d = f"0?{date.day}" if date.day < 10 else str(date.day)
    m = f"0?{date.month}" if date.month < 10 else str(date.month)
    sep, year = r"\s*[-./]\s*|\s+", rf"(?:{y}|'?{yy})"
    month = _MONTHS[date.month - 1]
    numeric = [
        rf"{y}(?:{sep}){m}(?:{sep}){d}",
        rf"{d}(?:{sep}){m}(?:{sep}){year}",
        rf"{m}(?:{sep}){d}(?:{sep}){year}",
        f"{date:%Y%m%d}", f"{date:%d%m%Y}", f"{date:%m%d%Y}",
    ]
    named = [
        rf"{d}{_ORDINAL}[\s./-]*(?:of\s+)?{month}\.?[\s,./-]*{year}",
        rf"{month}\.?\s*{d}{_ORDINAL},?\s*{year}",
    ]
    return [rf"(?<!\d)(?:{p})(?!\d)" for p in numeric] + [rf"(?<!\d)(?:{named[0]})(?!\d)",
                                                          rf"{_NOT_ALNUM_BEFORE}(?:{named[1]})(?!\d)"]


def _bounded(pattern: str, first: str, last: str) -> str:
    """`pattern` as a whole word: not glued to a letter or digit on either side."""
    if _UNSPACED.search(first + last):
        return pattern
    before = r"(?<!\d)" if first.isdigit() else _NOT_ALNUM_BEFORE if first.isalnum() else ""
    after = r"(?!\d)" if last.isdigit() else _NOT_ALNUM_AFTER if last.isalnum() else ""
    return f"{before}(?:{pattern}){after}"


def _literal(text: str) -> str:
    return r"\s+".join(re.escape(w) for w in text.split())


def _name_parts(value: str) -> set[str]:
    """The words of a person's name: DICOM PN (family^given^middle^prefix^suffix, groups split by =)
    or free text in "Last, First" or "First Last" order. Initials (single letters) say too little."""
    if "^" in value or "=" in value:
        components = [c for group in value.split("=") for c in group.split("^")[:3]]  # no prefix/suffix
    else:
        components = re.split(r"[,;/]", value)
    parts = set()
    for component in components:
        for word in component.split():
            parts.add(word)
            parts.update(re.split(r"[-'’.@]+", word))
    return {p.strip(".") for p in parts if len(p.strip(".")) >= 2 and any(c.isalpha() for c in p)}


def _patterns(value: str) -> tuple[list[str], set[str]]:
    """(regex alternatives, name parts) for one identifier value."""
    value = unicodedata.normalize("NFC", value).strip()
    if len(value) < 2 or (value.isdigit() and len(value) < 3):  # "7" or "42" would wipe every measurement
        return [], set()
    alternatives = [_bounded(_literal(value), value[0], value[-1])]
    is_pn = "^" in value or "=" in value  # a DICOM person name, digits or not ("DOE^JOHN2")
    parts = _name_parts(value) if is_pn or not any(c.isdigit() for c in value) else set()
    if not any(c.isdigit() for c in value):
        return alternatives, parts
    chars = [c for c in value if c.isalnum()]
    if len(chars) >= 3:  # the same id with other separators, or none: "123-45-6789", "123 45 6789"
        alternatives.append(_bounded(_ID_SEP.join(re.escape(c) for c in chars), chars[0], chars[-1]))
    dates = _dates_of(value)
    for date in dates:
        alternatives += _date_patterns(date)
    if dates:  # a date's own digit runs ("1949") are not identifiers
        return alternatives, parts
    for run in re.findall(r"\d{4,}", value):  # the number of "MRN-55501234" also appears alone
        alternatives.append(_bounded(_ID_SEP.join(run), run[0], run[-1]))
    for segment in re.split(r"[,;\n]", value):  # "12 Baker Street, London": each line of an address
        segment = segment.strip()
        if len(segment) >= 3 and segment != value:
            alternatives.append(_bounded(_literal(segment), segment[0], segment[-1]))
    return alternatives, parts


@functools.lru_cache(maxsize=256)
def _compiled(values: tuple[str, ...]) -> re.Pattern | None:
    alternatives, parts = [], set()
    for value in values:
        alts, names = _patterns(value)
        alternatives += alts
        parts |= names
    if parts:
        word = "|".join(_bounded(re.escape(p), p[0], p[-1]) for p in sorted(parts, key=len, reverse=True))
        # A run of name words ("Wu, Li", "Li Wu", "WU^LI") is one redaction.
        alternatives.insert(0, rf"(?:{word})(?:[\s,.^=]+(?:{word}))*")
    if not alternatives:
        return None
    return re.compile("|".join(f"(?:{a})" for a in alternatives), flags=re.IGNORECASE)


def scrub(text: str | None, identifiers) -> str | None:
    """`text` with every identifier value (names, ids, dates) replaced by "[redacted]".

    Whole words only ("Ann" is removed, "Annular" stays); names in any order and case, DICOM PN
    included; dates in common numeric and month-name formats; ids with or without separators.
    """
    if not text:
        return text
    values = tuple(sorted({unicodedata.normalize("NFC", part).strip() for v in identifiers or () if v
                           for part in str(v).split("\\")}))  # DICOM multi-values are backslash-delimited
    pattern = _compiled(values)
    if pattern is None:
        return text
    return pattern.sub(REDACTED, unicodedata.normalize("NFC", text))
