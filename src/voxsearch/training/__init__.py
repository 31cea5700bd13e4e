"""voxsearch.training: contrastive (SigLIP) training of the CLIP model on Ray Train, and its evaluation.

Names resolve lazily so importing the package does not pull in torch, Ray or MONAI.
"""

from __future__ import annotations

from voxsearch.common.lazy import lazy_exports

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


__getattr__ = lazy_exports(__name__, globals(), _EXPORTS)
