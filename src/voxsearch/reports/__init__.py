"""voxsearch.reports: report drafting (vision tower + projector + causal LM, or the nearest reports of
retrieval), its two training stages on Ray Train, and its evaluation per finding against baselines.

Names resolve lazily so importing the package does not pull in torch, transformers or Ray.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ReportModelConfig": "model",
    "LoraSettings": "model",
    "build_report_model": "model",
    "load_report_model": "model",
    "save_report_model": "model",
    "ReportTrainConfig": "train",
    "train_report": "train",
    "evaluate_reports": "evaluate",
    "evaluate_vqa": "evaluate",
    "Neighbour": "drafting",
    "compose_draft": "drafting",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'voxsearch.reports' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
