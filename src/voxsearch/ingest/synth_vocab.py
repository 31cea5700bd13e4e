"""The findings vocabulary of the phantom archive and how each finding looks on CT and MR.

Lesion contrasts are deliberately strong (>= ~70 HU against the host organ on CT) and sizes
start at 10-12 mm so findings survive resizing to small model inputs such as (32, 64, 64).
"""

from __future__ import annotations

import numpy as np

BODY_PARTS = ("head", "chest", "abdomen")
CT_PHASES = {
    "head": ("non-contrast", "non-contrast", "post-contrast"),
    "chest": ("non-contrast", "arterial"),
    "abdomen": ("non-contrast", "arterial", "portal venous"),
}
MR_PHASES = ("pre-contrast", "post-contrast")

# organ -> (side, paired?)
ORGANS = {
    "head": {"brain": True},
    "chest": {"lung": True},
    "abdomen": {"liver": False, "spleen": False, "kidney": True},
}

# (organ) -> {lesion type: (min mm, max mm, max count)}
LESIONS = {
    "brain": {"hemorrhage": (15, 40, 1), "infarct": (20, 45, 1), "mass": (20, 45, 1), "metastasis": (12, 25, 3)},
    "lung": {"nodule": (12, 28, 3), "mass": (30, 60, 1)},
    "liver": {"cyst": (12, 45, 3), "metastasis": (12, 35, 4), "mass": (25, 60, 1)},
    "spleen": {"cyst": (12, 35, 2)},
    "kidney": {"cyst": (12, 40, 2), "stone": (10, 18, 2), "mass": (20, 45, 1)},
}

# CT: lesion HU = host HU + delta, or an absolute value when the lesion has its own density.
CT_LESION_DELTA = {"hemorrhage": 60, "infarct": -35, "mass": 90, "metastasis": -75, "nodule": None, "cyst": None, "stone": None}
CT_LESION_ABSOLUTE = {"nodule": 40.0, "cyst": 5.0, "stone": 700.0}
# A solid lesion in aerated lung is soft tissue, not "lung plus a little": host + delta would give
# about -760 HU, which every soft-tissue window maps to black, i.e. an invisible mass.
CT_LESION_ABSOLUTE_IN_ORGAN = {("lung", "mass"): 45.0}
# MR (T1-like, arbitrary units): bright or dark against the host organ.
MR_LESION_DELTA = {"hemorrhage": 300, "infarct": -220, "mass": 260, "metastasis": -230, "nodule": 250, "cyst": -260, "stone": -300}

ABNORMAL_SHARE = 0.7


def sample_findings(rng: np.random.Generator, body_part: str, phase: str) -> list[dict]:
    """Ground-truth findings for one study; an empty list is a normal study."""
    if rng.random() > ABNORMAL_SHARE:
        return []
    organs = list(ORGANS[body_part])
    n_groups = 1 if rng.random() < 0.75 or len(organs) == 1 else 2
    chosen = rng.choice(organs, size=min(n_groups, len(organs)), replace=False)
    findings = []
    for organ in chosen:
        kind = str(rng.choice(sorted(LESIONS[organ])))
        lo, hi, max_count = LESIONS[organ][kind]
        count = int(rng.integers(1, max_count + 1))
        if ORGANS[body_part][organ]:
            side = "bilateral" if count >= 2 and rng.random() < 0.3 else str(rng.choice(["left", "right"]))
        else:
            side = None
        findings.append({
            "type": kind, "organ": str(organ), "side": side,
            "size_mm": int(rng.integers(lo, hi + 1)), "count": count, "phase": phase,
        })
    return findings
