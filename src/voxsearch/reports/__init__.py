"""voxsearch.reports: report drafting (vision tower + projector + causal LM, or the nearest reports of
retrieval), its two training stages on Ray Train, and its evaluation per finding against baselines.

Names resolve lazily so importing the package does not pull in torch, transformers or Ray.
"""

from __future__ import annotations

from voxsearch.common.lazy import lazy_exports

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


__getattr__ = lazy_exports(__name__, globals(), _EXPORTS)
