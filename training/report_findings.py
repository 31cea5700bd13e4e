"""Finding-level scoring of report text against ground-truth findings (the synthetic archive's labels).

A finding is (type, organ). A report states it when one clause names the type and the organ (the organ
nearest to the type mention) and no negation cue governs the mention in that clause ("no", "without",
"negative for", ..., or "not seen"/"absent"/"ruled out" after it). Negated findings count as absent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from voxsearch.training.report_vqa import FindingVocabulary, parse_findings

_CLAUSE = re.compile(r"[.;:!?\n]+|,\s*(?:but|however|whereas)\b|\bbut\b|\bhowever\b")
_PRE_NEGATION = re.compile(
    r"\b(no|not|without|negative for|free of|absence of|absent|neither|nor|resolved|ruled out for)\b")
_POST_NEGATION = re.compile(r"\b(not (?:seen|identified|present|detected|visualized|visualised)|absent|ruled out|"
                            r"excluded|resolved)\b")


# Common radiology wordings of finding types and organs (irregular plurals, adjectives, British spelling).
TYPE_SYNONYMS = {
    "hemorrhage": ["haemorrhage", "bleed", "hematoma", "haematoma"],
    "infarct": ["infarction", "ischemic lesion", "ischaemic lesion"],
    "mass": ["space-occupying lesion"],
    "metastasis": ["metastases", "metastatic", "secondary deposit"],
    "nodule": ["nodular opacity"],
    "cyst": ["cystic lesion"],
    "stone": ["calculus", "calculi", "nephrolith"],
}
ORGAN_SYNONYMS = {
    "brain": ["hemisphere", "cerebral", "intracranial"],
    "lung": ["pulmonary"],
    "liver": ["hepatic"],
    "spleen": ["splenic"],
    "kidney": ["renal"],
}


def _surface(forms: list[str]) -> re.Pattern:
    alternatives = []
    for form in forms:
        words = [re.escape(w) for w in form.lower().replace("_", " ").split()]
        alternatives.append(r"[\s-]+".join(words))
    # Regular plurals of the last word ("nodules", "masses", "cysts").
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")(?:s|es)?\b")


@dataclass
class FindingMatcher:
    types: dict[str, re.Pattern]
    organs: dict[str, re.Pattern]

    @classmethod
    def from_vocabulary(cls, vocabulary: FindingVocabulary, type_synonyms: dict | None = None,
                        organ_synonyms: dict | None = None) -> "FindingMatcher":
        ts = TYPE_SYNONYMS if type_synonyms is None else type_synonyms
        os_ = ORGAN_SYNONYMS if organ_synonyms is None else organ_synonyms
        return cls({t: _surface([t, *ts.get(t, [])]) for t in vocabulary.types},
                   {o: _surface([o, *os_.get(o, [])]) for o in vocabulary.organs})

    def extract(self, text: str) -> set[tuple[str, str | None]]:
        """Asserted (type, organ) pairs in ``text``; organ None when its clause names no organ."""
        found: set[tuple[str, str | None]] = set()
        for clause in _CLAUSE.split((text or "").lower()):
            organ_hits = [(m.start(), o) for o, pat in self.organs.items() for m in pat.finditer(clause)]
            for kind, pat in self.types.items():
                for m in pat.finditer(clause):
                    if _PRE_NEGATION.search(clause[: m.start()]) or _POST_NEGATION.search(clause[m.end():]):
                        continue
                    organ = min(organ_hits, key=lambda h: abs(h[0] - m.start()))[1] if organ_hits else None
                    found.add((kind, organ))
        return found


def truth_of(row) -> set[tuple[str, str | None]]:
    return {(str(f["type"]).replace("_", " "), (str(f["organ"]).replace("_", " ") if f.get("organ") else None))
            for f in parse_findings(row)}


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
