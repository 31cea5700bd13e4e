"""Report text: where it comes from and which part of it is kept."""

from __future__ import annotations

import re
from pathlib import Path

from voxsearch.common.storage import ObjectPath, location

# "FINDINGS:" style labels at the start of a line.
_LABEL = re.compile(r"^[ \t]*([A-Za-z][A-Za-z /&-]{1,40}?)[ \t]*:[ \t]*", re.MULTILINE)
_KEEP = ("FINDINGS", "FINDING", "IMPRESSION", "CONCLUSION", "CONCLUSIONS")
REPORT_NAMES = ("report.txt", "text.txt")


def keep_findings(text: str | None) -> str | None:
    """The findings (+ impression) sections of a labelled report; unlabelled prose as is.

    Other sections (history, technique, comparison, signature) often carry names, dates and
    referrers, and say nothing about what the scan shows.
    """
    if text is None:
        return None
    text = text.strip()
    if not text:
        return None
    labels = [m for m in _LABEL.finditer(text) if m.group(1).strip().upper() in _KEEP or m.group(1).isupper()]
    if not any(m.group(1).strip().upper() in _KEEP for m in labels):
        return text
    kept = []
    for i, m in enumerate(labels):
        end = labels[i + 1].start() if i + 1 < len(labels) else len(text)
        name = m.group(1).strip().upper()
        body = text[m.end():end].strip()
        if name in _KEEP and body:
            kept.append(f"{name}: {body}")
    return "\n".join(kept) or None


def report_beside(volume_path: str | Path | ObjectPath) -> str | None:
    """Plain-text report stored next to a volume (<name>.txt, or report.txt/text.txt in its folder), in a
    local folder or beside an s3:// / gs:// object."""
    path = location(volume_path)
    stem = path.name
    for suffix in (".nii.gz", ".nii", ".npy", ".zip"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    folder = path if path.is_dir() else path.parent
    candidates = [path.parent / (stem + ".txt")] + [folder / n for n in REPORT_NAMES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_text(errors="replace")
    return None
