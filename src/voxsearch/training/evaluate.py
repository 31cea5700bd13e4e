"""Retrieval evaluation of a CLIP model on a catalog split (Med3DVLM protocol + finding queries)."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

from voxsearch.training.integrity import check_split, require_clean
from voxsearch.ingest.catalog import parse_findings
from voxsearch.training.metrics import finding_precision, finding_queries, protocol_recall

log = logging.getLogger(__name__)

DEFAULT_NS = (100, 500, 1000, 2000)


def _autocast(device):
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def embed_pairs(model, batches: Iterable[dict[str, np.ndarray]], device=None) -> dict[str, np.ndarray]:
    """Image and report embeddings of (volume, report) batches, sorted by series_id.

    Sorting makes "the first N pairs" the same set whatever order Ray Data delivered the blocks in.
    """
    import torch

    from voxsearch.training.text import token_counter, truncate_report

    device = device or next(model.parameters()).device
    # Reports are cut by sentence exactly as in training, so evaluation sees the same captions.
    count_tokens, budget = token_counter(model.text), model.text.config.max_length
    was_training = model.training
    model.eval()
    ids, imgs, txts, findings, report_texts = [], [], [], [], []
    with torch.inference_mode(), _autocast(device):
        for batch in batches:
            if len(batch["series_id"]) == 0:
                continue
            volume = torch.as_tensor(np.asarray(batch["volume"], dtype=np.float32), device=device)
            imgs.append(model.encode_image(volume).float().cpu().numpy())
            reports = [truncate_report(str(r), count_tokens, budget) for r in batch["report"]]
            txts.append(model.encode_text(reports).float().cpu().numpy())
            ids.extend(str(s) for s in batch["series_id"])
            findings.extend(batch["findings"])
            report_texts.extend(str(r) for r in batch["report"])
    model.train(was_training)
    if not ids:
        raise ValueError("no pairs to embed")
    order = np.argsort(np.array(ids), kind="stable")
    return {"series_id": np.array(ids)[order], "img": np.concatenate(imgs)[order],
            "txt": np.concatenate(txts)[order], "findings": np.array(findings, dtype=object)[order],
            "report": np.array(report_texts, dtype=object)[order]}


def score_embeddings(model, emb: dict[str, np.ndarray], ns: Sequence[int] = DEFAULT_NS,
                     k: int = 10) -> dict[str, Any]:
    """Recall@1/5/10 both ways at each N, on all pairs and on abnormal studies alone, plus finding P@k."""
    import torch

    findings = [parse_findings(f) for f in emb["findings"]]
    result: dict[str, Any] = {"pairs": int(len(emb["img"])), "recall": protocol_recall(emb["img"], emb["txt"], ns)}
    abnormal = np.array([bool(f) for f in findings])
    if abnormal.any() and not abnormal.all():
        result["recall_abnormal"] = protocol_recall(emb["img"][abnormal], emb["txt"][abnormal], ns)
    queries = finding_queries(findings)
    if queries:
        texts = [q.text() for q in queries]
        was_training = model.training
        model.eval()  # a training run calls this between steps: no dropout in the query embeddings
        with torch.inference_mode():
            q_emb = model.encode_text(texts).float().cpu().numpy()
            search_emb = model.encode_query(texts).float().cpu().numpy()
        model.train(was_training)
        # "findings": the query embedding the search uses (with the finding head's directions where the
        # model has one); "findings_text_only": the plain text embedding.
        result["findings_text_only"] = finding_precision(emb["img"], q_emb, queries, findings, k=k)
        result["findings"] = finding_precision(emb["img"], search_emb, queries, findings, k=k)
    return result


def finding_thresholds(model, emb: dict[str, np.ndarray], min_precision: float = 0.6) -> list[float] | None:
    """Per-label decision thresholds of the finding head: the lowest at which the label's calls on these
    (held-out) studies are right at least ``min_precision`` of the time, so a finding shown on a study is
    usually there. The head is trained on rare labels and under-confident: a fixed 0.5 would hide most
    true findings. A label that never reaches the precision (or has no positive here) gets
    UNRELIABLE_THRESHOLD (0.95); a head with no label below it is left out of drafting."""
    import torch

    from voxsearch.encoders.checkpoint import UNRELIABLE_THRESHOLD
    from voxsearch.training.finding_labels import FindingLabeler

    labels = tuple(model.config.finding_labels)
    if not labels or len(emb["img"]) == 0:
        return None
    labeler = FindingLabeler(labels)
    y = np.stack([labeler.vector({"findings": f, "report": r}) for f, r in zip(emb["findings"], emb["report"])]) > 0
    with torch.inference_mode():
        probs = model.predict_findings(torch.from_numpy(np.asarray(emb["img"], np.float32))).float().numpy()
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2)
    out = []
    for j in range(len(labels)):
        pred = probs[:, j][None, :] >= grid[:, None]
        called = pred.sum(1)
        precision = (pred & y[:, j]).sum(1) / np.maximum(called, 1)
        ok = np.flatnonzero((precision >= min_precision) & (called >= 2))
        out.append(float(grid[ok[0]]) if len(ok) else UNRELIABLE_THRESHOLD)
    return out


QUERY_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0)


def query_finding_weight(model, emb: dict[str, np.ndarray], k: int = 10,
                         candidates: Sequence[float] = QUERY_WEIGHTS) -> tuple[float, dict[str, float]] | None:
    """The ``encode_query`` finding weight with the best finding precision@k on these (held-out)
    studies, the smallest of equals, and the precision at each candidate; None without a finding head or
    without finding queries here. A model whose text embedding ranks findings well needs little of the
    head, one whose head ranks them better needs more, so this is chosen per checkpoint."""
    import torch

    if model.finding_head is None or len(emb["img"]) == 0:
        return None
    findings = [parse_findings(f) for f in emb["findings"]]
    queries = finding_queries(findings)
    if not queries:
        return None
    texts = [q.text() for q in queries]
    was_training = model.training
    model.eval()
    scores = {}
    with torch.inference_mode():
        for weight in candidates:
            q_emb = model.encode_query(texts, finding_weight=weight).float().cpu().numpy()
            scores[f"{weight:g}"] = finding_precision(emb["img"], q_emb, queries, findings, k=k)[f"P@{k}"]
    model.train(was_training)
    best = max(candidates, key=lambda w: (round(scores[f"{w:g}"], 9), -w))
    return float(best), scores


def headline(result: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for logs and plots: text->image R@1/R@10 at the largest N, finding P@10."""
    out: dict[str, float] = {}
    recall = result.get("recall") or {}
    if recall:
        n = max(recall, key=int)
        scores = recall[n]
        out.update({"eval_n": int(n), "t2i_R@1": scores["t2i_R@1"], "t2i_R@10": scores["t2i_R@10"],
                    "i2t_R@1": scores["i2t_R@1"], "i2t_R@10": scores["i2t_R@10"],
                    "chance_R@1": scores["chance_R@1"], "chance_R@10": scores["chance_R@10"]})
    if "findings" in result:
        for key, value in result["findings"].items():
            if key.startswith(("P@", "chance_P@")):
                out[key] = value
    for key, value in (result.get("findings_text_only") or {}).items():
        if key.startswith("P@"):
            out[f"{key}_text_only"] = value
    return out


def _model_and_preprocess(model, preprocess):
    """(ClipModel, PreprocessConfig): a checkpoint directory brings its own contract; a model in memory
    is preprocessed at its image size unless told otherwise."""
    from voxsearch.common.storage import ObjectPath, location
    from voxsearch.encoders import open_checkpoint
    from voxsearch.ingest import PreprocessConfig

    if isinstance(model, (str, Path, ObjectPath)):
        # A folder, or an s3:// / gs:// URI: open_checkpoint reads the latter from the checkpoint cache.
        directory = location(model)
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {directory}")
        checkpoint = open_checkpoint(directory)
        if preprocess is None:
            preprocess = checkpoint.preprocess
        model = checkpoint.load_model()
    if preprocess is None:
        preprocess = PreprocessConfig(spatial_size=tuple(model.config.image_size))
    if isinstance(preprocess, dict):
        preprocess = PreprocessConfig.from_dict(preprocess)
    return model, preprocess


def evaluate_retrieval(model, catalog: Path | str | pa.Table, split: str = "test", preprocess=None,
                       ns: Sequence[int] = DEFAULT_NS, allow_split_overlap: bool = False,
                       workers: int = 2, batch_size: int = 16, k: int = 10) -> dict[str, Any]:
    """Score `model` (a ClipModel or a checkpoint directory) on the first N pairs of `split`. The checkpoint
    and the catalog may be s3:// or gs:// URIs (so may the volumes the catalog's rows point at).

    Refuses (SplitLeakageError) when the split shares scans or patients with another split, unless
    allow_split_overlap; the integrity report is part of the result either way. Needs Ray (it
    preprocesses through Ray Data); call voxsearch.common.runtime.init_ray first on a cluster.
    """
    from voxsearch.common.runtime import init_ray
    from voxsearch.training.data import load_catalog, preprocessed_dataset, split_rows

    model, preprocess = _model_and_preprocess(model, preprocess)
    table = load_catalog(catalog)
    integrity = require_clean(check_split(table, split), allow_split_overlap)
    rows = split_rows(table, split, limit=max(ns) if ns else None)
    init_ray()
    ds = preprocessed_dataset(rows, preprocess.to_dict(), workers=workers, label=split)
    emb = embed_pairs(model, ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
    result = score_embeddings(model, emb, ns, k=k)
    result.update({"split": split, "integrity": integrity.to_dict(), "preprocess_id": preprocess.id})
    return result
