"""Findings named in free text: which (type, organ) pairs a report or a search query asserts.

A finding is (type, organ). Text states it when one clause names the type and the organ (the organ
nearest to the type mention) and no negation cue governs the mention in that clause ("no", "without",
"negative for", ..., or "not seen"/"absent"/"ruled out" after it). One extractor serves the report
metrics, the training labels of reports without ground truth, and finding-aware search queries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace

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
    def from_vocabulary(cls, vocabulary, type_synonyms: dict | None = None,
                        organ_synonyms: dict | None = None) -> "FindingMatcher":
        """``vocabulary``: anything with ``types`` and ``organs`` lists."""
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


@lru_cache(maxsize=1)
def default_matcher() -> FindingMatcher:
    """A matcher for every type and organ this module has words for, compiled once per process (search
    queries and drafts call it per request)."""
    return FindingMatcher.from_vocabulary(SimpleNamespace(types=sorted(TYPE_SYNONYMS), organs=sorted(ORGAN_SYNONYMS)))
