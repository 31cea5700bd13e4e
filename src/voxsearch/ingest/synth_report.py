"""Free-text radiology reports for phantom studies, worded differently every time.

The same findings are written with synonyms, several size and count styles, shuffled sentence
order and negations for the organs that are normal, so a model must learn meaning, not strings.
Nothing here sees a patient or study identifier.
"""

from __future__ import annotations

import numpy as np

TYPE_WORDS = {
    "hemorrhage": ["hemorrhage", "haemorrhage", "intraparenchymal bleed", "hyperdense hematoma"],
    "infarct": ["infarct", "area of infarction", "ischemic lesion", "hypodense infarct"],
    "mass": ["mass", "space-occupying lesion", "solid mass", "enhancing mass"],
    "metastasis": ["metastasis", "metastatic deposit", "secondary deposit", "metastatic lesion"],
    "nodule": ["nodule", "pulmonary nodule", "nodular opacity", "solid nodule"],
    "cyst": ["cyst", "simple cyst", "cystic lesion", "fluid-density cyst"],
    "stone": ["stone", "calculus", "calcified stone", "nephrolith"],
}
PLURAL = {"hemorrhage": "hemorrhages", "infarct": "infarcts", "mass": "masses", "metastasis": "metastases",
          "nodule": "nodules", "cyst": "cysts", "stone": "stones"}
ORGAN_WORDS = {
    "brain": ["hemisphere", "cerebral hemisphere"],
    "lung": ["lung", "lung"],
    "liver": ["liver", "hepatic parenchyma"],
    "spleen": ["spleen", "splenic parenchyma"],
    "kidney": ["kidney", "renal parenchyma"],
}
SIDE_WORDS = {"left": ["left", "left-sided"], "right": ["right", "right-sided"]}
NEGATIONS = {
    "brain": ["No intracranial hemorrhage, mass or infarct.", "The brain parenchyma is unremarkable.",
              "No focal brain lesion is seen.", "Normal gray-white matter differentiation without focal abnormality."],
    "lung": ["The lungs are clear.", "No pulmonary nodule or mass.", "No focal lung lesion.",
             "Lungs are clear without nodules."],
    "liver": ["No focal liver lesion.", "The liver is unremarkable.", "Normal hepatic parenchyma without focal lesion."],
    "spleen": ["The spleen is normal.", "No splenic lesion.", "Spleen unremarkable."],
    "kidney": ["The kidneys are unremarkable.", "No renal mass, cyst or stone.", "Both kidneys appear normal."],
}
COUNT_WORDS = {2: ["two", "2"], 3: ["three", "3", "multiple"], 4: ["four", "multiple", "several"]}
NORMAL_IMPRESSIONS = ["No acute abnormality.", "Normal study.", "Unremarkable examination.",
                      "No significant abnormality detected."]
BODY_WORDS = {"head": ["head", "brain"], "chest": ["chest", "thorax"], "abdomen": ["abdomen", "abdomen and pelvis"]}
ORGANS_OF = {"head": ["brain"], "chest": ["lung"], "abdomen": ["liver", "spleen", "kidney"]}


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _size(rng, mm: int) -> str:
    style = int(rng.integers(3))
    if style == 0:
        return f"{mm} mm"
    if style == 1:
        return f"{mm / 10:.1f} cm"
    return f"{mm}mm"


def _location(rng, finding) -> str:
    organ_word = _pick(rng, ORGAN_WORDS[finding["organ"]])
    side = finding["side"]
    if side == "bilateral":
        plural = {"lung": "both lungs", "kidney": "both kidneys", "brain": "both cerebral hemispheres"}[finding["organ"]]
        return _pick(rng, [plural, f"the {organ_word}s bilaterally"])
    if side:
        return f"the {_pick(rng, SIDE_WORDS[side])} {organ_word}"
    return f"the {organ_word}"


def _a(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _finding_sentence(rng, finding) -> str:
    kind, count = finding["type"], finding["count"]
    where = _location(rng, finding)
    size = _size(rng, finding["size_mm"])
    if count == 1:
        noun = _pick(rng, TYPE_WORDS[kind])
        templates = [
            f"A {size} {noun} is seen in {where}.",
            f"There is {_a(noun)} in {where} measuring {size}.",
            f"{where[0].upper() + where[1:]} contains {_a(noun)} of {size}.",
            f"{noun[0].upper() + noun[1:]} in {where}, measuring up to {size}.",
        ]
    else:
        noun = PLURAL[kind]
        n = _pick(rng, COUNT_WORDS[count])
        templates = [
            f"There are {n} {noun} in {where}, the largest measuring {size}.",
            f"{n[0].upper() + n[1:]} {noun} are present in {where} (largest {size}).",
            f"{where[0].upper() + where[1:]} shows {n} {noun}, up to {size}.",
        ]
    return _pick(rng, templates)


def _technique(rng, modality: str, body_part: str, phase: str) -> str:
    body = _pick(rng, BODY_WORDS[body_part])
    if modality == "CT":
        if phase == "non-contrast":
            return _pick(rng, [f"Non-contrast CT of the {body}.", f"CT {body} without intravenous contrast."])
        return _pick(rng, [f"CT of the {body} in the {phase} phase.", f"Contrast-enhanced CT {body}, {phase} phase."])
    return _pick(rng, [f"MRI of the {body}, T1-weighted, {phase}.", f"T1-weighted MR {body} ({phase})."])


def write_report(rng: np.random.Generator, modality: str, body_part: str, phase: str, findings: list[dict]) -> str:
    sentences = [_finding_sentence(rng, f) for f in findings]
    affected = {f["organ"] for f in findings}
    negatives = [_pick(rng, NEGATIONS[o]) for o in ORGANS_OF[body_part] if o not in affected]
    body = sentences + negatives
    order = rng.permutation(len(body))
    findings_text = " ".join(body[i] for i in order)
    if findings:
        impression = _finding_sentence(rng, findings[int(rng.integers(len(findings)))])
    else:
        impression = _pick(rng, NORMAL_IMPRESSIONS)
    parts = []
    if rng.random() < 0.6:
        parts.append(f"TECHNIQUE: {_technique(rng, modality, body_part, phase)}")
    parts.append(f"FINDINGS: {findings_text}")
    if rng.random() < 0.7:
        parts.append(f"IMPRESSION: {impression}")
    if rng.random() < 0.25:  # some archives store unlabelled prose
        return " ".join(p.split(": ", 1)[1] for p in parts)
    return "\n".join(parts)
