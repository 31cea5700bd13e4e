"""Leakage checks run before every evaluation: no scan and no patient may sit in two splits."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pyarrow as pa


class SplitLeakageError(ValueError):
    """The held-out split shares scans or patients with another split, so its scores would lie."""


@dataclass
class SplitIntegrity:
    split: str
    rows: int
    duplicate_scans: int = 0  # rows of `split` whose content hash also appears in another split
    shared_patients: int = 0  # patients of `split` who also have studies in another split
    examples: list[str] = field(default_factory=list)  # a few offending hashes (never patient keys)

    @property
    def clean(self) -> bool:
        return self.duplicate_scans == 0 and self.shared_patients == 0

    def to_dict(self) -> dict:
        return {**asdict(self), "clean": self.clean}


def check_split(catalog: pa.Table, split: str) -> SplitIntegrity:
    """Count content-hash duplicates and patient overlap between `split` and every other split."""
    cols = catalog.column_names
    splits = catalog.column("split").to_pylist()
    inside = [i for i, s in enumerate(splits) if s == split]
    outside = [i for i, s in enumerate(splits) if s != split]
    report = SplitIntegrity(split=split, rows=len(inside))
    if "content_sha256" in cols:
        hashes = catalog.column("content_sha256").to_pylist()
        other = {hashes[i] for i in outside if hashes[i]}
        dupes = [hashes[i] for i in inside if hashes[i] and hashes[i] in other]
        report.duplicate_scans = len(dupes)
        report.examples = sorted(set(dupes))[:5]
    if "patient_key" in cols:
        patients = catalog.column("patient_key").to_pylist()
        other_p = {patients[i] for i in outside if patients[i]}
        report.shared_patients = len({patients[i] for i in inside if patients[i] and patients[i] in other_p})
    return report


def require_clean(report: SplitIntegrity, allow_overlap: bool = False) -> SplitIntegrity:
    """Refuse a leaking split unless the caller explicitly accepts it (the report still says so)."""
    if not report.clean and not allow_overlap:
        raise SplitLeakageError(
            f"split {report.split!r} leaks: {report.duplicate_scans} scan(s) with the same content hash "
            f"and {report.shared_patients} patient(s) also appear in other splits (e.g. sha256 "
            f"{', '.join(h[:12] for h in report.examples) or '-'}); re-split the catalog by patient, or "
            f"pass allow_split_overlap / --allow-split-overlap to score it anyway"
        )
    return report
