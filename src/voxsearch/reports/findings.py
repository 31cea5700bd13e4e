"""Finding-level scoring of report text against ground-truth findings (the synthetic archive's labels).

Text is read by the shared extractor (voxsearch.encoders.finding_text): negated findings count as absent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from voxsearch.encoders.finding_text import FindingMatcher
from voxsearch.ingest.catalog import parse_findings


def truth_of(row) -> set[tuple[str, str | None]]:
    return {(str(f["type"]).replace("_", " "), (str(f["organ"]).replace("_", " ") if f.get("organ") else None))
            for f in parse_findings(row.get("findings"), row.get("series_id"))}


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "tp": tp, "fp": fp, "fn": fn}


def _study_counts(truths: Sequence[set], texts: Sequence[str], matcher: FindingMatcher) -> np.ndarray:
    """(tp, fp, fn) of each study's text against its ground truth, shape (studies, 3)."""
    if len(truths) != len(texts):
        raise ValueError(f"{len(truths)} ground-truth sets but {len(texts)} texts")
    counts = []
    for truth, text in zip(truths, texts):
        pred = matcher.extract(text)
        counts.append((len(pred & truth), len(pred - truth), len(truth - pred)))
    return np.array(counts, dtype=np.int64).reshape(-1, 3)


def _groups(truths: Sequence[set]) -> dict[str, np.ndarray]:
    return {"all": np.ones(len(truths), bool), "abnormal": np.array([bool(t) for t in truths], bool)}


def finding_scores(truths: Sequence[set], texts: Sequence[str], matcher: FindingMatcher) -> dict:
    """Micro precision/recall/F1 over all studies and over abnormal studies alone, plus how often a
    normal study's text asserts no finding at all."""
    counts = _study_counts(truths, texts, matcher)
    groups = _groups(truths)
    out = {g: {**_prf(*(int(v) for v in counts[keep].sum(axis=0))), "n": int(keep.sum())}
           for g, keep in groups.items()}
    # A normal study has no true finding, so every finding its text asserts is a false positive.
    normal = ~groups["abnormal"]
    out["normal_specificity"] = float((counts[normal, 1] == 0).mean()) if normal.any() else None
    return out


def _micro_f1(counts: np.ndarray) -> np.ndarray:
    """F1 from (..., 3) arrays of summed (tp, fp, fn); 0 where nothing was predicted or true."""
    tp, fp, fn = (counts[..., i].astype(float) for i in range(3))
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def paired_f1_bootstrap(truths: Sequence[set], texts_a: Sequence[str], texts_b: Sequence[str],
                        matcher: FindingMatcher, resamples: int = 2000, seed: int = 0) -> dict:
    """95% interval of F1(a) - F1(b) by resampling studies with replacement, the same studies for both.

    A few dozen held-out studies make a ratio of F1s look firmer than it is: the interval says whether
    the difference would survive another draw of test studies."""
    a, b = _study_counts(truths, texts_a, matcher), _study_counts(truths, texts_b, matcher)
    rng = np.random.default_rng(seed)
    out = {}
    for group, keep in _groups(truths).items():
        ga, gb = a[keep], b[keep]
        if not len(ga):
            continue
        idx = rng.integers(0, len(ga), size=(resamples, len(ga)))
        diff = _micro_f1(ga[idx].sum(axis=1)) - _micro_f1(gb[idx].sum(axis=1))
        lo, hi = np.percentile(diff, [2.5, 97.5])
        out[group] = {"f1_diff": float(_micro_f1(ga.sum(axis=0)) - _micro_f1(gb.sum(axis=0))),
                      "ci95": [float(lo), float(hi)], "p_a_not_better": float((diff <= 0).mean()),
                      "studies": int(len(ga)), "resamples": resamples}
    return out
