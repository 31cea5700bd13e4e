"""What of a catalog row may leave the server: an allow-list, so a new catalog column is private by default.

Patient keys, source paths (folder names often hold patient names), content hashes and full dates never
leave; the study date is reduced to its year.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from typing import Any, Mapping

PUBLIC_FIELDS = ("series_id", "study_id", "modality", "body_part", "split", "abnormal", "orientation",
                 "source_format")
# Filters the API accepts, with the type each value must have.
FILTER_FIELDS = {"modality": str, "body_part": str, "split": str, "abnormal": bool}
SERIES_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def valid_series_id(value: str) -> bool:
    return bool(SERIES_ID.match(value or ""))


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def study_year(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.year
    match = re.match(r"^(\d{4})", str(value))
    return int(match.group(1)) if match else None


def public_metadata(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in PUBLIC_FIELDS:
        if name in row and row[name] is not None:
            out[name] = _plain(row[name])
    for name in ("shape", "spacing"):
        if row.get(name) is not None:
            out[name] = [round(float(v), 4) if name == "spacing" else int(v) for v in _plain(row[name])]
    year = study_year(row.get("study_date"))
    if year is not None:
        out["study_year"] = year
    findings = row.get("findings")
    if isinstance(findings, str) and findings:
        try:
            out["findings"] = json.loads(findings)
        except ValueError:
            pass
    elif isinstance(findings, list):
        out["findings"] = _plain(findings)
    return out


def excerpt(report: str | None, limit: int) -> str | None:
    """The start of a report, cut at a word boundary."""
    if not report:
        return None
    text = " ".join(report.split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > limit // 2 else limit].rstrip(",;:") + "…"


def normalise_filters(filters: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check API filters against the allow-list; values may be a scalar or a list of scalars."""
    if not filters:
        return {}
    out = {}
    for key, value in filters.items():
        if value is None or value == "" or value == []:
            continue
        if key not in FILTER_FIELDS:
            raise ValueError(f"unknown filter '{key}'; allowed: {', '.join(FILTER_FIELDS)}")
        kind = FILTER_FIELDS[key]
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, kind):
                raise ValueError(f"filter '{key}' takes {kind.__name__} values, got {v!r}")
        out[key] = values if isinstance(value, list) else value
    return out
