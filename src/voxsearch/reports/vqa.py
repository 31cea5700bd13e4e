"""VQA items: generated from the synthetic archive's ground-truth findings, or read from M3D-VQA CSV files.

Closed questions follow M3D-VQA: the question is followed by "Choices: A. .. B. .. C. .. D. .." and the
answer reads "X. text". Open questions are answered in free text.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from voxsearch.ingest.catalog import parse_findings

LETTERS = "ABCD"
# M3D-VQA numbers its question types 1-5 in this order.
M3D_TYPES = {"1": "plane", "2": "phase", "3": "organ", "4": "abnormality", "5": "location"}
M3D_COLUMNS = ("Image Path", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
               "Answer", "Answer Choice")


@dataclass
class VqaItem:
    image: str  # a catalog series_id, or an image path for M3D-VQA items
    question_type: str
    question: str
    answer: str
    closed: bool = False
    options: dict[str, str] = field(default_factory=dict)
    answer_choice: str | None = None

    @property
    def prompt(self) -> str:
        if not self.closed:
            return self.question
        choices = " ".join(f"{k}. {v}" for k, v in self.options.items())
        return f"{self.question} Choices: {choices}"

    @property
    def target(self) -> str:
        return f"{self.answer_choice}. {self.answer}" if self.closed else self.answer


def _words(value) -> str:
    return str(value).replace("_", " ").strip()


@dataclass
class FindingVocabulary:
    types: list[str]
    organs: list[str]
    sides: list[str]
    phases: list[str]

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping]) -> "FindingVocabulary":
        types, organs, sides, phases = set(), set(), set(), set()
        for row in rows:
            for f in parse_findings(row.get("findings"), row.get("series_id")):
                types.add(_words(f["type"]))
                if f.get("organ"):
                    organs.add(_words(f["organ"]))
                if f.get("side"):
                    sides.add(_words(f["side"]))
                if f.get("phase"):
                    phases.add(_words(f["phase"]))
        return cls(sorted(types), sorted(organs), sorted(sides), sorted(phases))


def _closed(item: VqaItem, pool: Sequence[str], rng: random.Random) -> VqaItem | None:
    """The closed twin of an open item: the answer plus up to three distractors from ``pool``."""
    distractors = [p for p in dict.fromkeys(pool) if p != item.answer]
    rng.shuffle(distractors)
    options = [item.answer] + distractors[:3]
    if len(options) < 2:
        return None
    rng.shuffle(options)
    letters = LETTERS[: len(options)]
    answer_choice = letters[options.index(item.answer)]
    return VqaItem(item.image, item.question_type, item.question, item.answer, True,
                   dict(zip(letters, options)), answer_choice)


def generate_vqa(rows: Iterable[Mapping], vocabulary: FindingVocabulary, seed: int = 0,
                 max_findings_per_study: int = 2) -> list[VqaItem]:
    """Open and closed questions per study from its findings: presence, organ, abnormality, location,
    size and contrast phase (the types M3D-VQA asks about, plus presence and size)."""
    rng = random.Random(seed)
    items: list[VqaItem] = []
    for row in rows:
        sid = str(row["series_id"])
        findings = parse_findings(row.get("findings"), sid)
        opened: list[tuple[VqaItem, Sequence[str]]] = [
            (VqaItem(sid, "presence", "Is there any abnormality in this scan?", "yes" if findings else "no"),
             ["yes", "no"]),
        ]
        for f in findings[:max_findings_per_study]:
            kind, organ = _words(f["type"]), _words(f.get("organ") or "")
            if organ:
                opened.append((VqaItem(sid, "organ", f"Which organ shows the {kind}?", organ), vocabulary.organs))
                opened.append((VqaItem(sid, "abnormality", f"What abnormality is seen in the {organ}?", kind),
                               vocabulary.types))
            if f.get("side"):
                opened.append((VqaItem(sid, "location", f"On which side is the {kind}?", _words(f["side"])),
                               vocabulary.sides))
            if f.get("size_mm"):
                size = round(float(f["size_mm"]))
                sizes = [f"{s} mm" for s in (size, max(1, size // 2), size * 2, size * 3)]
                opened.append((VqaItem(sid, "size", f"What is the largest diameter of the {kind}?", f"{size} mm"),
                               sizes))
        phases = [_words(f["phase"]) for f in findings if f.get("phase")]
        if phases:
            opened.append((VqaItem(sid, "phase", "In which contrast phase was this scan acquired?", phases[0]),
                           vocabulary.phases))
        for item, pool in opened:
            items.append(item)
            closed = _closed(item, pool, rng)
            if closed is not None:
                items.append(closed)
    return items


def read_m3d_vqa_csv(path: str | Path, image_root: str | Path | None = None) -> list[VqaItem]:
    """M3D-VQA rows -> one closed and one open item each; image paths resolved against ``image_root``."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    items: list[VqaItem] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in M3D_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} is not an M3D-VQA CSV: missing columns {missing}")
        for line, rec in enumerate(reader, start=2):
            letter = (rec["Answer Choice"] or "").strip().upper()
            options = {k: (rec[f"Choice {k}"] or "").strip() for k in LETTERS}
            if letter not in options:
                raise ValueError(f"{path}:{line}: Answer Choice {rec['Answer Choice']!r} is not one of A-D")
            qtype = str(rec["Question Type"]).strip()
            qtype = M3D_TYPES.get(qtype, qtype.lower())
            image = str(root / rec["Image Path"])
            answer = (rec["Answer"] or "").strip()
            items.append(VqaItem(image, qtype, rec["Question"].strip(), answer, True, options, letter))
            items.append(VqaItem(image, qtype, rec["Question"].strip(), answer))
    return items
