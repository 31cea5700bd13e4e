"""Find what to ingest in an archive: manifest rows, M3D_Cap.json entries, or a folder walk.

Produces plain JSON-able work items (one per file or DICOM container). Manifest identifier
columns are hashed here, in the driver; their values stay in the item's "identifiers" only so
reports and messages can be scrubbed of them (run_ingest seals them before any worker sees them).
Catalog columns are an allow-list: other manifest columns go in only when named with
--keep-column (never an identifier column), and scrubbed.

An archive in object storage (s3://, gs://) is walked for its NIfTI, .npy and DICOM-zip objects; a
manifest, M3D_Cap.json or loose DICOM files there are refused, not skipped, so nothing they describe is
silently lost.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from voxsearch.common.storage import ObjectPath, is_uri, location
from voxsearch.ingest.catalog import SCHEMA
from voxsearch.ingest.deid import column_key, is_identifier_column, is_patient_column, salted_hash, scrub

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("manifest.csv", "manifest.parquet")
M3D_NAME = "M3D_Cap.json"
KNOWN_COLUMNS = {"path", "report", "split", "findings", "abnormal", "modality", "body_part", "study_date",
                 "study_id", "window_center", "window_width"}
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "validation", "valid": "validation",
                 "validation": "validation", "test": "test", "testing": "test"}


@dataclass
class Discovery:
    items: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # {"path", "stage", "reason"}


def _clean(value):
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _read_manifest(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        # csv keeps every cell as text: ids like 00123 must keep their leading zeros.
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    if rows and "path" not in rows[0]:
        raise ValueError(f"{path}: manifest needs a 'path' column (has {sorted(rows[0])})")
    return rows


def keep_columns(names) -> frozenset[str]:
    """--keep-column names as catalog column names; identifier and catalog columns are refused."""
    kept = set()
    for name in names or ():
        key = column_key(name)
        if not key:
            raise ValueError(f"--keep-column {name!r}: not a column name")
        if is_identifier_column(name):
            raise ValueError(f"--keep-column {name!r}: identifies a person (DICOM PS3.15) and is never copied "
                             "into the catalog; it is only used to scrub reports")
        if key in KNOWN_COLUMNS or key in SCHEMA.names:
            raise ValueError(f"--keep-column {name!r}: already a catalog column")
        kept.add(key)
    return frozenset(kept)


def _item(source: Path, fmt: str, entry: dict, salt: str, keep: frozenset = frozenset()) -> dict:
    meta, extras, identifiers = {}, {}, []
    patient_value = None
    for key, value in entry.items():
        value = _clean(value)
        if is_identifier_column(key):
            if value is not None:
                identifiers.append(str(value))
                if patient_value is None and is_patient_column(key):
                    patient_value = str(value)
            continue
        name = column_key(key)
        if str(key).strip().startswith("_") or name == "path":
            continue
        if name in KNOWN_COLUMNS:
            meta[name] = value
        elif name in keep and value is not None:
            extras[name] = str(value)
    # Scrubbed here already, so what travels to the workers holds no identifier the driver knows of.
    if meta.get("report") is not None:
        meta["report"] = scrub(str(meta["report"]), identifiers)
    extras = {k: scrub(v, identifiers) for k, v in extras.items()}
    if meta.get("split") is not None:
        split = SPLIT_ALIASES.get(str(meta["split"]).strip().lower())
        meta["split"] = split
    if meta.get("study_id") is not None:
        meta["study_ref"] = salted_hash(salt, "study", str(meta.pop("study_id")))
    else:
        meta.pop("study_id", None)
    return {
        "source_path": str(source),
        "source_format": fmt,
        "meta": meta,
        "extras": extras,
        "patient_key": salted_hash(salt, "patient", patient_value) if patient_value else None,
        "identifiers": identifiers,
    }


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(".zip") or path.is_dir():
        return "dicom"
    return None


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        return head[128:132] == b"DICM"
    except OSError:
        return False


def _m3d_items(json_path: Path, salt: str, out: Discovery) -> None:
    try:
        cap = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        out.errors.append({"path": str(json_path), "stage": "discover", "reason": f"unreadable M3D manifest: {exc}"})
        return
    root = json_path.parent
    for split_name, entries in cap.items():
        split = SPLIT_ALIASES.get(split_name.lower())
        for entry in entries if isinstance(entries, list) else []:
            image = root / str(entry.get("image", ""))
            report = None
            text = entry.get("text")
            if text:
                text_path = root / str(text)
                report = text_path.read_text(errors="replace") if text_path.is_file() else (
                    None if str(text).endswith(".txt") else str(text))
            fmt = _format_of(image)
            if not image.exists() or fmt is None:
                out.errors.append({"path": str(image), "stage": "discover", "reason": "listed in M3D_Cap.json but missing or unsupported"})
                continue
            out.items.append(_item(image, fmt, {"split": split, "report": report}, salt))


def _report_columns(manifest: Path, rows: list[dict], keep: frozenset) -> None:
    """Say once which manifest columns stay out of the catalog (names only, never values)."""
    columns = list(rows[0]) if rows else []
    present = {column_key(c) for c in columns}
    dropped = [c for c in columns if not is_identifier_column(c) and not str(c).strip().startswith("_")
               and column_key(c) not in KNOWN_COLUMNS | keep | {"path"}]
    if dropped:
        log.info("%s: columns not copied into the catalog (name one with --keep-column to keep it): %s",
                 manifest.name, ", ".join(dropped))
    for name in sorted(keep - present):
        log.warning("%s: --keep-column %s: the manifest has no such column", manifest.name, name)


_OBJECT_FORMATS = {".nii": "nifti", ".nii.gz": "nifti", ".npy": "npy", ".zip": "dicom"}


def _object_format(name: str) -> str | None:
    return next((fmt for suffix, fmt in _OBJECT_FORMATS.items() if name.lower().endswith(suffix)), None)


def _discover_objects(archive: ObjectPath, salt: str, manifest) -> Discovery:
    out = Discovery()
    if manifest is not None:
        raise ValueError(f"archive {archive}: a manifest is read with a local archive only")
    if archive.is_file():
        if _object_format(archive.name) is None:
            raise ValueError(f"{archive}: unsupported object type (expected .nii, .nii.gz, .npy or a DICOM .zip)")
        out.items.append(_item(archive, _object_format(archive.name), {}, salt))
        return out
    objects = archive.rglob_files()
    if not objects:
        raise FileNotFoundError(f"archive {archive} holds no objects")
    for obj in objects:
        parts = obj.path[len(archive.path) + 1:].split("/")
        if any(part.startswith(".") for part in parts):
            continue  # work in progress, as in a local walk
        if obj.name in (*MANIFEST_NAMES, M3D_NAME) or obj.name.lower().endswith(".dcm"):
            raise ValueError(f"{obj}: manifests, M3D_Cap.json and loose DICOM files are read from local archives "
                             "only; in object storage keep NIfTI, .npy or one .zip per DICOM series")
        if _object_format(obj.name):
            out.items.append(_item(obj, _object_format(obj.name), {}, salt))
    return out


def discover(archive: Path | ObjectPath | str, salt: str, manifest: Path | None = None,
             keep: frozenset = frozenset()) -> Discovery:
    if is_uri(archive):
        return _discover_objects(location(archive), salt, manifest)
    archive = Path(archive).resolve()
    out = Discovery()
    if not archive.exists():
        raise FileNotFoundError(f"archive {archive} does not exist")
    if archive.is_file() and _format_of(archive) is not None:
        out.items.append(_item(archive, _format_of(archive), {}, salt))
        return out
    manifest = manifest or next((archive / n for n in MANIFEST_NAMES if (archive / n).is_file()), None)
    if manifest is not None:
        entries = _read_manifest(Path(manifest))
        _report_columns(Path(manifest), entries, keep)
        for entry in entries:
            rel = _clean(entry.get("path"))
            source = (Path(manifest).parent / str(rel)).resolve() if rel else None
            if source is None or not source.exists():
                out.errors.append({"path": str(source or manifest), "stage": "discover", "reason": "manifest path does not exist"})
                continue
            fmt = _format_of(source)
            if fmt is None:
                out.errors.append({"path": str(source), "stage": "discover", "reason": "unsupported file type"})
                continue
            out.items.append(_item(source, fmt, entry, salt, keep))
        for cap in sorted(archive.rglob(M3D_NAME)):
            _m3d_items(cap, salt, out)
    else:
        _walk(archive, salt, out)
    seen, unique = set(), []
    for item in out.items:  # manifest first, then M3D: the first description of a path wins
        if item["source_path"] not in seen:
            seen.add(item["source_path"])
            unique.append(item)
    out.items = unique
    return out


def _files(archive: Path) -> list[Path]:
    """Every file under the archive, following symlinked folders (archives are often assembled from
    links to mounted shares) but visiting each real folder once, so a link loop ends. Dot-names are
    work in progress (a mirror's staging folder, a temp file), never a study."""
    found, visited = [], set()
    for root, dirs, files in os.walk(archive, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / f for f in files if not f.startswith(".")]
    return sorted(found)


def _walk(archive: Path, salt: str, out: Discovery) -> None:
    dicom_dirs = set()
    files = _files(archive)
    for cap in (p for p in files if p.name == M3D_NAME):
        _m3d_items(cap, salt, out)
    for path in files:
        if not path.is_file():
            continue
        name = path.name.lower()
        if name.endswith((".nii", ".nii.gz", ".npy", ".zip")):
            out.items.append(_item(path, _format_of(path), {}, salt))
        elif _is_dicom_file(path):
            dicom_dirs.add(path.parent)
    for folder in sorted(dicom_dirs):
        out.items.append(_item(folder, "dicom", {}, salt))
