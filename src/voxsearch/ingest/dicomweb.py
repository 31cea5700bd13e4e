"""A PACS as an archive: QIDO-RS lists series, WADO-RS fetches them into a local de-identified mirror.

The mirror is an ordinary folder of DICOM series, so the folder reader (and everything after it) gives the
same tensor for a series whether it came from a PACS or a disk. Every instance is de-identified before it
touches the disk (DICOM PS3.15 Basic Profile, see `deidentify`); its UIDs are remapped as a function of the
catalog's salt, so a series keeps one identity across rounds and the mirror never holds an original UID.
Credentials come from the environment or a file, never from the command line or a URL, and are never logged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from dicognito.anonymizer import Anonymizer
from dicognito.datetimeanonymizer import DateTimeAnonymizer
from dicognito.element_anonymizer import ElementAnonymizer
from dicognito.randomizer import Randomizer
from dicognito.uianonymizer import UIAnonymizer
from pydicom.datadict import keyword_dict, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from voxsearch.common.durable import atomic_write_json, fsync_dir, fsync_tree
from voxsearch.ingest.deid import load_or_create_salt, salted_hash
from voxsearch.ingest.errors import IngestError

log = logging.getLogger(__name__)

ENV_TOKEN = "VOXSEARCH_DICOMWEB_TOKEN"
ENV_USER = "VOXSEARCH_DICOMWEB_USER"
ENV_PASSWORD = "VOXSEARCH_DICOMWEB_PASSWORD"
ENV_AUTH_FILE = "VOXSEARCH_DICOMWEB_AUTH_FILE"

# De-identification follows DICOM PS3.15's Basic Application Level Confidentiality Profile (Table E.1-1) with
# dicognito doing the replacing (UIDs, person names, IDs, dates; at every depth of every sequence) and
# _ProfileStripper removing what dicognito keeps and the profile does not. Burned-in text in the pixel
# data is NOT removed (no Clean Pixel Data Option): a scanner that burns a name into the image puts it in
# the mirror. BurnedInAnnotation is kept as the source set it.
#
# Every free-text value goes: descriptions, comments, protocol and station names, serial numbers, the
# institution, AE titles, ages. The profile removes nearly all of these one by one; removing them by VR
# also catches the ones a vendor or a newer edition of the standard adds.
_FREE_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "UR", "AE", "AS", "UN"})
# Pseudonymised by dicognito instead of removed: the same original gives the same pseudonym, so one
# patient keeps one PatientID and the catalog still groups (and splits) their studies together.
_PSEUDONYMISED = frozenset(keyword_dict[k] for k in ("PatientID", "AccessionNumber", "StudyID"))
# Not free text, but removed or emptied by the profile, where dicognito would keep or only shift them.
_REMOVED = frozenset(keyword_dict[k] for k in (
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientSize", "PatientWeight", "LastMenstrualDate",
    "PregnancyStatus", "SmokingStatus", "IconImageSequence", "OriginalAttributesSequence",
    "ModifiedAttributesSequence", "RequestAttributesSequence", "ReferencedPatientSequence",
    "ReferencedPatientAliasSequence", "ReferencedStudySequence", "ReferencedPerformedProcedureStepSequence",
    "DigitalSignaturesSequence", "MACParametersSequence", "EncryptedAttributesSequence", "DataSetTrailingPadding",
))
# dicognito's own range of shifts (2 months to 2 years back).
_MIN_SHIFT_HOURS, _MAX_SHIFT_HOURS = 62 * 24, 730 * 24
_QIDO_SERIES_FIELDS = ("0020000D", "0020000E", "00080060", "00201209", "00080020")


def is_dicomweb_url(source: str | os.PathLike) -> bool:
    return str(source).startswith(("http://", "https://"))


@dataclass
class DicomWebConfig:
    url: str
    # JSON file with {"token": ...} or {"username": ..., "password": ...}; else the environment.
    auth_file: Path | None = None
    modality: str | None = None
    study_date_from: str | None = None  # YYYYMMDD
    study_date_to: str | None = None
    timeout_s: float = 30.0
    retries: int = 4
    backoff_s: float = 0.5
    deadline_s: float = 300.0  # per series, all retries included
    # The catalog's salt (voxsearch.ingest.deid.load_or_create_salt), so that a mirrored series gets the
    # series_id the catalog gives it.
    salt: str = ""


def _seed(salt: str) -> str:
    return salted_hash(salt, "dicognito-seed", "", length=64)


def mirrored_uid(salt: str, uid: str) -> str:
    """The UID the mirror writes in place of `uid`: a function of the salt alone (the one dicognito applies
    inside `deidentify`), so the same source UID maps to the same new one in every round and process."""
    element = DataElement(keyword_dict["SeriesInstanceUID"], "UI", uid)
    UIAnonymizer(Randomizer(_seed(salt)))(Dataset(), element)
    return element.value


def _study_key(salt: str, study_uid: str) -> str:
    return salted_hash(salt, "study", mirrored_uid(salt, study_uid))


@dataclass(frozen=True)
class RemoteSeries:
    """One series as QIDO lists it. The UIDs stay in memory; only hashes of their mirrored UIDs are stored
    or logged."""

    study_uid: str
    series_uid: str
    modality: str | None
    instances: int | None
    salt: str

    @property
    def key(self) -> str:
        """The catalog's series_id of this series: ingest hashes the SeriesInstanceUID it reads from the
        mirrored files, which is the remapped one."""
        return salted_hash(self.salt, "series", mirrored_uid(self.salt, self.series_uid))

    @property
    def study_key(self) -> str:
        """The catalog's study_ref of this series' study."""
        return _study_key(self.salt, self.study_uid)


class PacsError(IngestError):
    """The PACS could not give a series: the message names the study by its hashed id only."""


def _credentials(config: DicomWebConfig) -> dict:
    path = config.auth_file or os.environ.get(ENV_AUTH_FILE)
    if path:
        try:
            creds = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise IngestError(f"DICOMweb credentials file {path}: unreadable ({type(exc).__name__})") from exc
        if not isinstance(creds, dict) or not ({"token"} <= creds.keys() or {"username", "password"} <= creds.keys()):
            raise IngestError(f"DICOMweb credentials file {path}: needs 'token' or 'username' and 'password'")
        return creds
    if os.environ.get(ENV_TOKEN):
        return {"token": os.environ[ENV_TOKEN]}
    if os.environ.get(ENV_USER):
        return {"username": os.environ[ENV_USER], "password": os.environ.get(ENV_PASSWORD, "")}
    return {}


def connect(config: DicomWebConfig):
    """A dicomweb-client bound to the PACS, with the session's credentials."""
    if not config.salt:
        raise ValueError("DicomWebConfig.salt must be the catalog's salt")
    import requests
    from dicomweb_client.api import DICOMwebClient

    parts = urlsplit(config.url)
    if parts.username or parts.password:
        raise IngestError(
            "DICOMweb URL carries credentials; put them in the environment "
            f"({ENV_USER}/{ENV_PASSWORD} or {ENV_TOKEN}) or a file ({ENV_AUTH_FILE})"
        )
    session = requests.Session()
    creds = _credentials(config)
    if "token" in creds:
        session.headers["Authorization"] = f"Bearer {creds['token']}"
    elif creds:
        session.auth = (creds["username"], creds["password"])
    client = DICOMwebClient(url=config.url.rstrip("/"), session=session, timeout=config.timeout_s)
    # One retry policy, ours (bounded by the deadline, errors named by hashed ids); the client's own
    # would wait minutes and logs raw study UIDs at INFO.
    client.set_http_retry_params(retry=False)
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
    return client


def _value(attrs: dict, tag: str):
    values = attrs.get(tag, {}).get("Value")
    return values[0] if values else None


def _retrying(config: DicomWebConfig, what: str, call):
    """Run `call` with exponential back-off on transport faults and 5xx answers, within the deadline."""
    import requests

    started = time.monotonic()
    delay = config.backoff_s
    for attempt in range(config.retries + 1):
        try:
            return call()
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status is not None and status < 500:
                raise PacsError(f"{what}: PACS refused the request (HTTP {status})") from None
            cause = f"HTTP {status}"
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            cause = type(exc).__name__
        if attempt == config.retries or time.monotonic() - started + delay > config.deadline_s:
            raise PacsError(f"{what}: PACS unavailable after {attempt + 1} attempts ({cause})") from None
        log.warning("%s: %s, retrying in %.1f s", what, cause, delay)
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def list_series(client, config: DicomWebConfig) -> list[RemoteSeries]:
    """Every series of the PACS that passes the configured filters (modality, study date range)."""
    filters = {}
    if config.study_date_from or config.study_date_to:
        filters["StudyDate"] = f"{config.study_date_from or ''}-{config.study_date_to or ''}"
    studies = _retrying(
        config, "listing studies", lambda: client.search_for_studies(search_filters=filters, get_remaining=True)
    )
    out = []
    for study in studies:
        study_uid = _value(study, "0020000D")
        series_filters = {"Modality": config.modality} if config.modality else {}
        listed = _retrying(
            config,
            f"study {_study_key(config.salt, study_uid)}",
            lambda: client.search_for_series(
                study_uid, fields=_QIDO_SERIES_FIELDS, search_filters=series_filters, get_remaining=True
            ),
        )
        for series in listed:
            count = _value(series, "00201209")
            out.append(
                RemoteSeries(
                    study_uid=study_uid,
                    series_uid=_value(series, "0020000E"),
                    modality=_value(series, "00080060"),
                    instances=int(count) if count is not None else None,
                    salt=config.salt,
                )
            )
    return out


class _ProfileStripper(ElementAnonymizer):
    """Removes, at any depth, what the profile removes and dicognito would keep (see _FREE_TEXT_VRS)."""

    def __call__(self, dataset, data_element) -> bool:
        tag = data_element.tag
        if (tag.is_private or tag in _REMOVED
                or (tag.group & 0xFF00) in (0x5000, 0x6000)  # curves and overlays
                or (data_element.VR in _FREE_TEXT_VRS and tag not in _PSEUDONYMISED)):
            del dataset[tag]
            return True
        return False

    def describe_actions(self):
        yield "Remove private elements, curves (50xx) and overlays (60xx)"
        yield f"Remove {', '.join(sorted(_FREE_TEXT_VRS))} elements but PatientID, AccessionNumber and StudyID"
        yield from (f"Remove {keyword_for_tag(tag)}" for tag in sorted(_REMOVED))


class _PatientDateShift(DateTimeAnonymizer):
    """dicognito's date shift with an offset of the patient's; a date it cannot parse cannot be shifted, so it
    goes (a malformed date must not keep a whole series out of the mirror)."""

    def __call__(self, dataset, data_element) -> bool:
        try:
            return super().__call__(dataset, data_element)
        except ValueError:
            del dataset[data_element.tag]
            return True


def _date_shift_hours(salt: str, ds) -> int:
    """One offset per patient, derived from the salt: every study of a patient moves by the same amount, in
    any round, so intervals between them survive."""
    pid, issuer = str(ds.get("PatientID") or ""), str(ds.get("IssuerOfPatientID") or "")
    patient = (f"{issuer}/{pid}" if issuer else pid) if pid else f"study:{ds.get('StudyInstanceUID', '')}"
    span = _MAX_SHIFT_HOURS - _MIN_SHIFT_HOURS
    return -(_MIN_SHIFT_HOURS + int(salted_hash(salt, "date-shift", patient), 16) % span)


def deidentify(ds, salt: str) -> None:
    """De-identify one instance in place to the Basic Profile with the Retain Longitudinal Temporal Information
    with Modified Dates option. Every replacement is a function of the salt and the original value, so a
    series fetched again writes the same UIDs and pseudonyms. Burned-in pixel text is not removed."""
    from pydicom.sr.codedict import codes  # 0.4 s to import: only where instances are written

    anonymizer = Anonymizer(seed=_seed(salt))
    anonymizer.add_element_handler(_PatientDateShift(_date_shift_hours(salt, ds)))
    # Added last, so it runs first: what goes is not worth pseudonymising.
    anonymizer.add_element_handler(_ProfileStripper())
    anonymizer.anonymize(ds)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = ["DICOGNITO", "BASIC PROFILE; DATES SHIFTED; PIXELS NOT CLEANED"]
    methods = []
    for code in (codes.DCM.BasicApplicationConfidentialityProfile,
                 codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
        methods.append(item)
    ds.DeidentificationMethodCodeSequence = methods


def fetch_series(client, series: RemoteSeries, dest: Path, config: DicomWebConfig) -> int:
    """Fetch a series into `dest` (replaced whole, atomically); returns the number of instances."""
    from pydicom.errors import InvalidDicomError

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    what = f"study {series.study_key} series {series.key}"

    def download() -> list:
        try:
            return list(client.iter_series(series.study_uid, series.series_uid))
        except (InvalidDicomError, EOFError, ValueError) as exc:
            raise PacsError(f"{what}: an instance is not valid DICOM ({type(exc).__name__})") from None

    datasets = _retrying(config, what, download)
    if not datasets:
        raise PacsError(f"{what}: PACS returned no instances")
    staging = Path(tempfile.mkdtemp(prefix=f".{series.key}.", dir=dest.parent))
    try:
        for i, ds in enumerate(datasets):
            try:
                deidentify(ds, config.salt)
            except Exception as exc:
                # Its message may quote a header value: name the failure by type only, and write nothing.
                raise PacsError(f"{what}: an instance could not be de-identified ({type(exc).__name__})") from None
            ds.save_as(staging / f"{i:05d}.dcm", enforce_file_format=True)
        fsync_tree(staging)
        old = dest.with_name(dest.name + ".old")
        if dest.exists():
            dest.rename(old)
        staging.rename(dest)
        fsync_dir(dest.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return len(datasets)


@dataclass
class MirrorResult:
    """One pass over the PACS: series ids (the catalog's) fetched, refetched, gone, and failures."""

    added: list[str]
    changed: list[str]
    gone: list[str]
    errors: list[tuple[str, str]]  # (hashed study id, reason)
    listed: int = 0


class Mirror:
    """A local, de-identified copy of the PACS' series: `series/<series_id>/` plus a state file.

    The state file records each series' instance count when it was fetched: a series is refetched when
    QIDO reports a different count, and a series QIDO no longer lists is gone. State is saved after
    every fetch, so a pass killed midway resumes where it stopped.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.series_dir = self.root / "series"
        self.state_path = self.root / "state.json"

    def state(self) -> dict[str, dict]:
        if not self.state_path.exists():
            return {}
        return json.loads(self.state_path.read_text())

    def _save(self, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # fsync before the rename: after a crash the old state or the new one, never an empty file.
        atomic_write_json(self.state_path, state, indent=1, sort_keys=True)

    def present(self) -> set[str]:
        if not self.series_dir.is_dir():
            return set()
        return {p.name for p in self.series_dir.iterdir()
                if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(".old")}

    def recover(self) -> None:
        """Undo what a pass killed inside fetch_series left: staging folders, and a series moved aside
        (`<key>.old`) whose replacement never landed, which goes back into place."""
        if not self.series_dir.is_dir():
            return
        for path in self.series_dir.iterdir():
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.endswith(".old"):
                live = path.with_name(path.name[: -len(".old")])
                if live.exists():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.rename(live)

    def pull(self, config: DicomWebConfig, progress: bool = True) -> MirrorResult:
        """Fetch what is new or changed in the PACS. Raises PacsError if the PACS cannot even be listed."""
        from tqdm import tqdm

        self.recover()
        client = connect(config)
        remote = {s.key: s for s in list_series(client, config)}
        state = self.state()
        on_disk = self.present()
        todo = [k for k, s in remote.items()
                if k not in state or k not in on_disk
                or (s.instances is not None and s.instances != state[k].get("instances"))]
        result = MirrorResult(added=[], changed=[], gone=sorted((set(state) | on_disk) - set(remote)),
                              errors=[], listed=len(remote))
        for key in tqdm(todo, desc="fetch", unit="series", disable=not progress):
            series = remote[key]
            try:
                count = fetch_series(client, series, self.series_dir / key, config)
            except PacsError as exc:
                log.error("%s", exc)
                result.errors.append((series.study_key, str(exc)))
                continue
            (result.changed if key in state else result.added).append(key)
            state[key] = {"instances": count, "study": series.study_key}
            self._save(state)
        return result

    def drop(self, keys) -> None:
        """Forget series the source deleted: their files first, then their state."""
        state = self.state()
        for key in keys:
            shutil.rmtree(self.series_dir / key, ignore_errors=True)
            state.pop(key, None)
        self._save(state)


def default_mirror_dir(catalog: Path) -> Path:
    """Where a catalog's de-identified PACS mirror lives unless told otherwise: beside it."""
    catalog = Path(catalog)
    return catalog.with_name(catalog.name + "-mirror")


def pull_for_catalog(config: DicomWebConfig, catalog: Path, mirror_dir: Path | None = None,
                     progress: bool = True) -> tuple[Mirror, MirrorResult]:
    """Fetch what the PACS has new or changed into the catalog's mirror. The catalog's salt de-identifies
    it (unless `config` names one), so mirrored series get the ids the catalog gives them."""
    if not config.salt:
        config = replace(config, salt=load_or_create_salt(Path(catalog)))
    mirror = Mirror(Path(mirror_dir) if mirror_dir else default_mirror_dir(catalog))
    return mirror, mirror.pull(config, progress=progress)
