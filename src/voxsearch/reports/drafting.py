"""Retrieval-based report drafts: what the nearest indexed training studies' reports agree on.

Used when no report model is configured. The draft is built from sentences of real reports of the most
similar training studies, ranked by how much similarity-weighted support each sentence has among them,
in the order the closest report uses. It says so in its first line: it is not generated from the image.

Detect, then retrieve, then write: when the model's finding head reads findings off the scan, the
neighbours whose reports state exactly those findings are preferred over merely similar-looking ones,
and the draft lists what was detected, with probabilities.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass
class Neighbour:
    series_id: str
    score: float
    report: str


@dataclass
class Draft:
    text: str
    method: str
    sources: list[dict] = field(default_factory=list)
    body: str = ""  # the report sentences alone, without the bracketed notes (what scoring reads)


def _key(sentence: str) -> str:
    return re.sub(r"[^a-z0-9 ]+", "", " ".join(sentence.lower().split()))


def split_sentences(report: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(report or "") if s and len(s.strip()) > 2]


def retrieval_header(n: int) -> str:
    return (f"[Retrieval-based draft: composed from the reports of the {n} most similar indexed training "
            "studies, not generated from this scan by a report model. Review before use.]")


def _agreement(report: str, detected: set[str], matcher) -> float:
    """Jaccard overlap of the findings a report states ("type|organ") with the detected ones."""
    stated = {f"{kind}|{organ}" for kind, organ in matcher.extract(report) if organ}
    union = stated | detected
    return len(stated & detected) / len(union) if union else 1.0


def compose_draft(neighbours: list[Neighbour], max_sentences: int = 8, detected: list[dict] | None = None,
                  max_neighbours: int | None = None) -> Draft:
    """Sentences with the most weighted support among neighbours, ordered as the nearest report orders them.

    ``detected``: the finding head's reading of the scan ([{"finding", "label", "probability"}], may be
    empty = nothing detected); neighbours are then re-ranked by how well their reports agree with it. Pass
    None for a head with no reliable label (FindingHead.reliable_labels): its silence would make every
    draft normal."""
    usable = [n for n in neighbours if n.report and n.report.strip()]
    if detected is not None and usable:
        from voxsearch.encoders.finding_text import default_matcher

        matcher = default_matcher()
        labels = {d["label"] for d in detected}
        usable.sort(key=lambda n: -_agreement(n.report, labels, matcher))  # stable: similarity breaks ties
    if max_neighbours is not None:
        usable = usable[:max_neighbours]
    if not usable:
        return Draft(
            text="[No draft: none of the most similar indexed training studies has a report.]",
            method="retrieval",
            sources=[{"series_id": n.series_id, "score": round(n.score, 4)} for n in neighbours],
        )
    # Rank weights keep the nearest study dominant even when scores are nearly tied.
    weights = [max(n.score, 0.0) + 1.0 / (rank + 1) for rank, n in enumerate(usable)]
    support: dict[str, float] = {}
    first_text: dict[str, str] = {}
    order: dict[str, tuple[int, int]] = {}
    for rank, (n, w) in enumerate(zip(usable, weights)):
        seen = set()
        for pos, sentence in enumerate(split_sentences(n.report)):
            key = _key(sentence)
            if not key or key in seen:
                continue
            seen.add(key)
            support[key] = support.get(key, 0.0) + w
            first_text.setdefault(key, sentence)
            order.setdefault(key, (rank, pos))
    total = sum(weights)
    # A sentence enters the draft if the nearest report has it or a weighted majority of others agree.
    chosen = [k for k in support if order[k][0] == 0 or support[k] >= 0.5 * total]
    chosen.sort(key=lambda k: -support[k])
    chosen = sorted(chosen[:max_sentences], key=lambda k: order[k])
    body = " ".join(first_text[k] for k in chosen)
    header = retrieval_header(len(usable))
    if detected is not None:
        seen = ", ".join(f"{d['finding']} ({d['probability']:.0%})" for d in detected) or "none"
        header += f"\n[Findings the model detects in this scan: {seen}.]"
    return Draft(
        text=f"{header}\n{body}",
        method="retrieval",
        sources=[{"series_id": n.series_id, "score": round(n.score, 4)} for n in usable],
        body=body,
    )


def drafting_head(head):
    """The finding head drafts may start from: None when none of its labels was calibrated to be trusted
    (FindingHead.reliable_labels), since such a head calls nothing and its silence would make every
    draft normal."""
    return head if head is not None and head.reliable_labels else None


def detected_sentences(detected: list[dict]) -> str:
    """The finding head's calls alone, written as report sentences (the "detect" step without retrieval)."""
    if not detected:
        return "No focal abnormality is detected."
    return " ".join(f"{d['finding'][0].upper()}{d['finding'][1:]}." for d in detected)
