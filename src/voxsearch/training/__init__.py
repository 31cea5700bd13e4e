"""voxsearch.training: contrastive (SigLIP) training of the CLIP model on Ray Train, and its evaluation.

Names resolve lazily so importing the package does not pull in torch, Ray or MONAI.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ClipTrainConfig": "config",
    "PRESETS": "config",
    "preset": "config",
    "TrainResult": "trainer",
    "train_clip": "trainer",
    "evaluate_retrieval": "evaluate",
    "SplitLeakageError": "integrity",
    "check_split": "integrity",
    "truncate_report": "text",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'voxsearch.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
