"""Turn one work item (a file or a DICOM container) into catalog rows and error records.

Runs inside Ray Data actors (or in-process for the local engine). Every failure becomes a
record naming the input and the stage. Reports, kept manifest columns and messages are scrubbed
of every identifier known for the study: the manifest row's (sealed by the driver) and the
DICOM headers'.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import zipfile
from pathlib import Path

from voxsearch.common.hashing import content_sha256, sha256_files
from voxsearch.common.storage import location
from voxsearch.ingest.catalog import CATALOG_SCHEMA_VERSION, now_utc
from voxsearch.ingest.deid import IdentifierSeal, salted_hash, scrub
from voxsearch.ingest.errors import IngestError
from voxsearch.ingest.reports import keep_findings, report_beside

log = logging.getLogger(__name__)


def _date(value) -> dt.date | None:
    if not value:
        return None
    text = str(value).strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d", "%d.%m.%Y", "%Y/%m/%d"):
        try:
            return dt.datetime.strptime(text[:10] if "-" in text or "/" in text else text, fmt).date()
        except ValueError:
            continue
    return None


def _bool(value):
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text in ("true", "1", "yes") else False if text in ("false", "0", "no") else None


def _float(value):
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def auto_split(patient_key: str, shares=(0.8, 0.1, 0.1)) -> str:
    """Deterministic split by patient, for archives that do not give one."""
    u = int(patient_key[:8], 16) / 0xFFFFFFFF
    return "train" if u < shares[0] else "validation" if u < shares[0] + shares[1] else "test"


class ItemProcessor:
    def __init__(self, salt: str, known_hashes=(), max_voxels: int | None = None, preprocess: dict | None = None,
                 run_id: str = "", identifier_key: str | None = None):
        self.salt = salt
        self.seal = IdentifierSeal(identifier_key)
        self.known = set(known_hashes)
        self.max_voxels = max_voxels
        self.preprocess = preprocess
        self.run_id = run_id
        self._pp_config = None

    def _check_preprocess(self, volume, row) -> None:
        """Run the default pipeline once so volumes that cannot be preprocessed fail at ingest."""
        if self.preprocess is None:
            return
        from voxsearch.ingest.preprocess import PreprocessConfig, preprocess_volume, row_window

        if self._pp_config is None:
            self._pp_config = PreprocessConfig.from_dict(self.preprocess)
        preprocess_volume(volume, self._pp_config, window=row_window(row), name=row["source_path"], consume=True)

    def __call__(self, item: dict) -> list[dict]:
        """Results: {"kind": "row"|"skip"|"error"|"warning", ...}."""
        source = location(item["source_path"])
        ids = self.seal.open(item.get("sealed_identifiers"))
        try:
            if item["source_format"] == "dicom":
                return self._dicom(item, source, ids)
            return self._single(item, source, ids)
        except Exception as exc:  # a bug or an unforeseen format problem: record it, keep going
            log.warning("unexpected failure on %s: %s", source, type(exc).__name__)
            return [_error(source, "read", scrub(f"{type(exc).__name__}: {exc}", ids))]

    def _single(self, item: dict, source, ids: list[str]) -> list[dict]:
        from voxsearch.ingest.readers import local_file, read_volume_path

        meta = item["meta"]
        try:
            with local_file(source) as local:  # an object is fetched once, then hashed and read
                digest = sha256_files([local])
                if digest in self.known:
                    return [{"kind": "skip", "path": str(source), "file_sha256": digest}]
                volume = read_volume_path(local, modality=meta.get("modality"), max_voxels=self.max_voxels,
                                          fmt=item["source_format"])
        except IngestError as exc:
            return [_error(source, exc.stage, scrub(str(exc), ids))]
        rel_key = str(source)
        study_ref = meta.get("study_ref") or salted_hash(self.salt, "study", rel_key)
        row = self._row(item, source, None, digest, volume, study_ref, salted_hash(self.salt, "series", rel_key))
        return self._finish(row, volume, item, identifiers=ids)

    def _dicom(self, item: dict, source: Path, row_ids: list[str]) -> list[dict]:
        from voxsearch.ingest.dicom_reader import read_dicom, scan_series

        try:
            series, bad = scan_series(source)
        except IngestError as exc:
            return [_error(source, exc.stage, scrub(str(exc), row_ids))]
        results = [_error(source, "read", scrub(f"{name}: {reason}", row_ids)) for name, reason in bad]
        if not series and not bad:
            results.append(_error(source, "read", scrub(f"{source}: no DICOM series found", row_ids)))
        elif not series:
            results.append(_error(source, "read", scrub(f"{source}: no readable DICOM series ({len(bad)} bad files)",
                                                        row_ids)))
        for info in series:
            ids = row_ids + [v for v in info.identifiers.values() if v]
            try:
                if source.is_dir():
                    digest = sha256_files([source / n for n in info.files])
                else:
                    with zipfile.ZipFile(source) as zf:
                        digest = sha256_files(info.files, open_file=zf.open)
                if digest in self.known:
                    results.append({"kind": "skip", "path": str(source), "file_sha256": digest})
                    continue
                volume = read_dicom(source, files=info.files, max_voxels=self.max_voxels)
            except IngestError as exc:
                results.append(_error(source, exc.stage, scrub(str(exc), ids)))
                continue
            except Exception as exc:
                results.append(_error(source, "read", scrub(f"{type(exc).__name__}: {exc}", ids)))
                continue
            item_patient = item.get("patient_key")
            pid = info.identifiers.get("PatientID")
            if not item_patient and pid:
                issuer = info.identifiers.get("IssuerOfPatientID") or ""
                item = {**item, "patient_key": salted_hash(self.salt, "patient", pid if not issuer else f"{issuer}/{pid}")}
            meta = dict(item["meta"])
            if meta.get("study_date") is None:
                meta["study_date"] = info.study_date
            if meta.get("body_part") is None and info.body_part:
                meta["body_part"] = info.body_part.lower()
            item = {**item, "meta": meta}
            study_ref = meta.get("study_ref") or salted_hash(self.salt, "study", info.study_uid)
            row = self._row(item, source, info.files, digest, volume, study_ref,
                            salted_hash(self.salt, "series", info.series_uid))
            results.extend(self._finish(row, volume, item, identifiers=ids))
        return results

    def _row(self, item, source, files, digest, volume, study_ref, series_id) -> dict:
        meta = item["meta"]
        findings = meta.get("findings")
        abnormal = _bool(meta.get("abnormal"))
        if abnormal is None and findings is not None:
            try:
                abnormal = bool(json.loads(findings))
            except ValueError:
                abnormal = None
        patient_key = item.get("patient_key") or salted_hash(self.salt, "patient-of-study", study_ref)
        body_part = meta.get("body_part")
        row = {
            "study_id": study_ref,
            "series_id": series_id,
            "patient_key": patient_key,
            "source_path": str(source),
            "source_format": item["source_format"],
            "source_files": list(files) if files is not None else None,
            "file_sha256": digest,
            # Before _finish: its preprocessing check may reuse the volume's array in place.
            "content_sha256": content_sha256(volume.array, volume.spacing),
            "modality": volume.modality,
            "body_part": str(body_part).lower() if body_part else None,
            "shape": [int(v) for v in volume.array.shape],
            "spacing": [round(float(v), 6) for v in volume.spacing],
            "orientation": volume.source_orientation,
            "intensity_units": volume.units,
            "window_center": _float(meta.get("window_center")),
            "window_width": _float(meta.get("window_width")),
            "report": None,
            "split": meta.get("split") or auto_split(patient_key),
            "findings": findings,
            "abnormal": abnormal,
            "study_date": _date(meta.get("study_date")),
            "schema_version": CATALOG_SCHEMA_VERSION,
            "ingested_at": now_utc(),
            "run_id": self.run_id,
        }
        row.update(item.get("extras") or {})
        return row

    def _finish(self, row: dict, volume, item: dict, identifiers) -> list[dict]:
        source = row["source_path"]
        try:
            self._check_preprocess(volume, row)
        except IngestError as exc:
            return [_error(source, exc.stage, scrub(str(exc), identifiers))]
        results = []
        for column in item.get("extras") or {}:
            row[column] = scrub(row[column], identifiers)
        raw_report = item["meta"].get("report")
        if raw_report is None:
            raw_report = report_beside(source)
        report = scrub(keep_findings(raw_report), identifiers)
        if report is None:
            results.append({"kind": "warning", "path": source, "stage": "report",
                            "reason": scrub(f"{source}: no report (manifest column empty, no text file beside it)",
                                            identifiers)})
        row["report"] = report
        results.append({"kind": "row", "row": row})
        return results


def _error(path, stage: str, reason: str) -> dict:
    return {"kind": "error", "path": str(path), "stage": stage, "reason": reason}
