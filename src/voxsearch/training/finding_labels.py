"""Finding labels for training: what each study shows, as a multi-hot vector over a fixed vocabulary.

A label is a (type, organ) pair written "type|organ" ("metastasis|liver"). A study's labels come from
the catalog's ground-truth `findings` where the archive has them ("[]" is a normal study), otherwise
from its report by the same negation-aware extractor the report metrics use, so training works on
real archives that only have reports.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from voxsearch.encoders.finding_text import FindingMatcher, default_matcher
from voxsearch.ingest.catalog import parse_findings


def label_name(kind: str, organ: str) -> str:
    return f"{kind}|{organ}"


def _truth(value) -> list[dict] | None:
    """Ground-truth findings of a catalog cell, or None when the archive gave none for this study (an
    empty cell, or one that is not a findings list): "[]" is a normal study, a missing cell is unknown."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        found = parse_findings(value)
    except ValueError:
        return None
    return [f for f in found if f.get("organ")]


class FindingExtractor:
    """Study -> set of (type, organ, side or None): ground truth where present, else the report."""

    def __init__(self, matcher: FindingMatcher | None = None):
        self.matcher = matcher or default_matcher()

    def findings(self, row: Mapping) -> set[tuple[str, str, str | None]]:
        truth = _truth(row.get("findings"))
        if truth is not None:
            return {(str(f["type"]), str(f["organ"]), (str(f["side"]) if f.get("side") else None)) for f in truth}
        return {(kind, organ, None) for kind, organ in self.matcher.extract(str(row.get("report") or ""))
                if organ is not None}


class FindingLabeler:
    """Multi-hot labels and same-findings group ids over a fixed label vocabulary."""

    def __init__(self, labels: Sequence[str], extractor: FindingExtractor | None = None):
        self.labels = tuple(labels)
        self.index = {name: i for i, name in enumerate(self.labels)}
        self.extractor = extractor or FindingExtractor()

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping], min_count: int = 5) -> "FindingLabeler":
        """The vocabulary: every (type, organ) seen in at least ``min_count`` of ``rows``."""
        extractor = FindingExtractor()
        counts = Counter(label_name(k, o) for row in rows for k, o in {(k, o) for k, o, _ in extractor.findings(row)})
        return cls(sorted(name for name, c in counts.items() if c >= min_count), extractor)

    def vector(self, row: Mapping) -> np.ndarray:
        out = np.zeros(len(self.labels), dtype=np.float32)
        for kind, organ, _side in self.extractor.findings(row):
            i = self.index.get(label_name(kind, organ))
            if i is not None:
                out[i] = 1.0
        return out

    def group_key(self, row: Mapping) -> str:
        """Studies with equal keys show the same thing: modality, body part and findings with sides."""
        found = sorted((k, o, s or "") for k, o, s in self.extractor.findings(row))
        return json.dumps([str(row.get("modality") or ""), str(row.get("body_part") or ""), found])


    def group_id(self, row: Mapping) -> int:
        """A stable hash of group_key: equal on every rank and in every run (the loss compares ids across
        ranks, so a per-rank counter would not do)."""
        digest = hashlib.blake2b(self.group_key(row).encode(), digest_size=7).digest()
        return int.from_bytes(digest, "big")
