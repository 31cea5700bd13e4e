"""Finding search on freshly drawn phantom studies, in process: what `voxsearch demo` users type, scored.

Draws studies from the phantom generator with a seed no training run used, preprocesses them as the
embedding job does, embeds them with a checkpoint, and asks the demo's example queries through the
search path (ClipModel.encode_query). A hit counts when its ground truth carries the query's finding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Query text -> whether a study's ground-truth findings carry it.
DEMO_QUERIES: dict[str, Callable[[list[dict]], bool]] = {
    "liver metastases": lambda fs: any(f["type"] == "metastasis" and f["organ"] == "liver" for f in fs),
    "nodule in the right lung": lambda fs: any(f["type"] == "nodule" and f["organ"] == "lung"
                                               and f.get("side") in ("right", "bilateral") for f in fs),
    "brain hemorrhage": lambda fs: any(f["type"] == "hemorrhage" and f["organ"] == "brain" for f in fs),
}
# Query text -> the body part its organ lies in.
DEMO_BODY_PARTS = {"liver metastases": "abdomen", "nodule in the right lung": "chest", "brain hemorrhage": "head"}


@dataclass
class PhantomSet:
    inputs: np.ndarray  # (n, 1, D, H, W) model inputs
    findings: list[list[dict]]
    body_parts: list[str]


def draw_phantoms(n: int, seed: int, preprocess, size: str = "small") -> PhantomSet:
    from voxsearch.ingest import preprocess_volume, render_study
    from voxsearch.ingest.volume import HU, RAW, Volume

    inputs, findings, bodies = [], [], []
    for i in range(n):
        study = render_study(np.random.default_rng([seed, 4242, i]), size)
        volume = Volume(array=study.array, affine=study.affine, spacing=tuple(np.abs(np.diag(study.affine)[:3])),
                        modality=study.modality, units=HU if study.modality == "CT" else RAW)
        inputs.append(preprocess_volume(volume, preprocess, consume=True))
        findings.append(study.findings)
        bodies.append(study.body_part)
    return PhantomSet(np.stack(inputs), findings, bodies)


def query_precision(model, phantoms: PhantomSet, queries: Sequence[str] = tuple(DEMO_QUERIES), k: int = 5,
                    batch: int = 16) -> dict[str, dict]:
    """For each query: precision of the first k hits, how many studies carry the finding, and the ranks."""
    import torch

    with torch.inference_mode():
        img = np.concatenate([model.encode_image(torch.from_numpy(phantoms.inputs[s:s + batch])).float().numpy()
                              for s in range(0, len(phantoms.inputs), batch)])
        q = model.encode_query(list(queries)).float().numpy()
    out = {}
    for text, vec in zip(queries, q):
        carries = np.array([DEMO_QUERIES[text](f) for f in phantoms.findings])
        top = np.argsort(-(img @ vec), kind="stable")[:k]
        out[text] = {f"P@{k}": float(carries[top].mean()), "relevant": int(carries.sum()),
                     "chance": float(carries.mean()), "hits_carry": [bool(c) for c in carries[top]],
                     "hits_abnormal_in_body": [bool(phantoms.findings[i]) and phantoms.body_parts[i] == DEMO_BODY_PARTS.get(text)
                                               for i in top]}
    return out
