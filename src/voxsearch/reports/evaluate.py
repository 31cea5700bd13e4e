"""Offline evaluation of a report model: generated reports and VQA answers on a held-out split.

Every report evaluation also scores the nearest-training-report baseline: each held-out scan gets the
report of the training scan whose vision-tower embedding (mean of the last stage's tokens, the model's own
eyes) is most similar. A report model that does not beat it has not learnt to read the scan.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from voxsearch.encoders.finding_text import FindingMatcher
from voxsearch.reports.findings import finding_scores, paired_f1_bootstrap, truth_of
from voxsearch.reports.metrics import closed_vqa_accuracy, text_metrics
from voxsearch.reports.vqa import FindingVocabulary, VqaItem, generate_vqa, read_m3d_vqa_csv


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def image_features(model, volumes: np.ndarray, batch_size: int = 4) -> np.ndarray:
    """L2-normalised mean of the last vision stage's tokens, (n, C)."""
    import torch

    out = []
    with torch.no_grad():
        for sl in _batches(len(volumes), batch_size):
            stages = model.vision_stages(torch.from_numpy(volumes[sl].astype(np.float32)))
            out.append(stages[-1].mean(dim=1).cpu().numpy())
    feats = np.concatenate(out).astype(np.float32)
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


def nearest_reports(train_features: np.ndarray, train_reports: Sequence[str], query_features: np.ndarray
                    ) -> list[str]:
    """The report of the most similar training scan (cosine) for every query scan."""
    nearest = (query_features @ train_features.T).argmax(axis=1)
    return [str(train_reports[i]) for i in nearest]


def generate_texts(model, volumes: np.ndarray, prompts: Sequence[str | None], max_new_tokens: int,
                   batch_size: int = 4, desc: str = "generating") -> list[str]:
    import torch
    from tqdm import tqdm

    texts: list[str] = []
    for sl in tqdm(list(_batches(len(prompts), batch_size)), desc=desc, unit="batch", leave=False):
        images = torch.from_numpy(volumes[sl].astype(np.float32))
        texts += model.generate_batch(images, list(prompts[sl]), max_new_tokens=max_new_tokens)
    return texts


def _pairs(rows, preprocess: dict, workers: int, label: str) -> dict:
    from voxsearch.training.data import collect_pairs, preprocessed_dataset

    return collect_pairs(preprocessed_dataset(rows, preprocess, workers=workers, label=label))


def _scores(references, texts, truths, matcher) -> dict:
    abnormal = [i for i, t in enumerate(truths) if t]
    out = {"text": text_metrics(references, texts), "findings": finding_scores(truths, texts, matcher)}
    if abnormal:
        out["text_abnormal"] = text_metrics([references[i] for i in abnormal], [texts[i] for i in abnormal])
    return out


def evaluate_reports(model, catalog, split: str = "test", train_split: str = "train", limit: int | None = None,
                     max_new_tokens: int = 192, batch_size: int = 4, workers: int = 2,
                     allow_split_overlap: bool = False, examples: int = 0) -> dict:
    """Generated reports vs references and vs the nearest-training-report baseline, on ``split``."""
    from voxsearch.training.data import load_catalog, split_rows
    from voxsearch.training.integrity import check_split, require_clean

    catalog = load_catalog(catalog)
    integrity = require_clean(check_split(catalog, split), allow_split_overlap)
    test_rows = split_rows(catalog, split, limit)
    train_rows = split_rows(catalog, train_split)
    test = _pairs(test_rows, model.preprocess, workers, split)
    train = _pairs(train_rows, model.preprocess, workers, train_split)
    vocab = FindingVocabulary.from_rows([{"findings": f} for f in list(train["findings"]) + list(test["findings"])])
    matcher = FindingMatcher.from_vocabulary(vocab)
    truths = [truth_of({"findings": f}) for f in test["findings"]]
    references = [str(r) for r in test["report"]]

    baseline = nearest_reports(image_features(model, train["volume"], batch_size), train["report"],
                               image_features(model, test["volume"], batch_size))
    generated = generate_texts(model, test["volume"], [None] * len(references), max_new_tokens, batch_size,
                               desc=f"reports ({split})")
    result = {
        "split": split,
        "n": len(references),
        "n_abnormal": sum(1 for t in truths if t),
        "train_studies": len(train["report"]),
        "integrity": integrity.to_dict(),
        "decoding": {"strategy": "greedy", "max_new_tokens": max_new_tokens},
        "model": _scores(references, generated, truths, matcher),
        "baseline_nearest_report": _scores(references, baseline, truths, matcher),
    }
    m, b = result["model"]["findings"], result["baseline_nearest_report"]["findings"]
    result["f1_vs_baseline"] = {
        g: {"model": m[g]["f1"], "baseline": b[g]["f1"],
            "ratio": (m[g]["f1"] / b[g]["f1"]) if b[g]["f1"] else None}
        for g in ("all", "abnormal")
    }
    for g, interval in paired_f1_bootstrap(truths, generated, baseline, matcher).items():
        result["f1_vs_baseline"][g]["bootstrap"] = interval
    if examples:
        result["examples"] = [{"reference": references[i], "generated": generated[i], "baseline": baseline[i]}
                              for i in range(min(examples, len(references)))]
    return result


def _answer_match(answer: str, prediction: str) -> bool:
    return answer.strip().lower() in (prediction or "").lower()


def score_vqa(items: Sequence[VqaItem], predictions: Sequence[str]) -> dict:
    closed = [{"question_type": it.question_type, "answer_choice": it.answer_choice, "options": it.options,
               "prediction": p} for it, p in zip(items, predictions) if it.closed]
    open_by_type: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for it, p in zip(items, predictions):
        if not it.closed:
            open_by_type[it.question_type].append((it.answer, p))
    open_scores = {}
    for qtype, pairs in sorted(open_by_type.items()):
        refs, preds = [a for a, _ in pairs], [p for _, p in pairs]
        open_scores[qtype] = {**text_metrics(refs, preds),
                              "answer_contained": sum(map(_answer_match, refs, preds)) / len(pairs)}
    return {"closed": closed_vqa_accuracy(closed), "open": open_scores, "n_items": len(items)}


def evaluate_vqa(model, catalog=None, split: str = "test", m3d_csv: str | Path | None = None,
                 m3d_image_root: str | Path | None = None, limit: int | None = None, max_new_tokens: int = 32,
                 batch_size: int = 8, workers: int = 2, allow_split_overlap: bool = False) -> dict:
    """Closed accuracy per question type and open-answer text metrics, on questions generated from the
    catalog's ground truth (``split``) or read from an M3D-VQA CSV."""
    if m3d_csv:
        from voxsearch.ingest import PreprocessConfig, preprocess_path

        items = read_m3d_vqa_csv(m3d_csv, m3d_image_root)
        if limit:
            items = items[:limit]
        pre = PreprocessConfig.from_dict(model.preprocess)
        cache: dict[str, np.ndarray] = {}
        for it in items:
            if it.image not in cache:
                cache[it.image] = preprocess_path(it.image, pre)
        volumes = np.stack([cache[it.image] for it in items])
        source = {"m3d_csv": str(m3d_csv)}
    else:
        from voxsearch.training.data import load_catalog, split_rows
        from voxsearch.training.integrity import check_split, require_clean

        if catalog is None:
            raise ValueError("evaluate_vqa needs a catalog or an M3D-VQA CSV")
        catalog = load_catalog(catalog)
        integrity = require_clean(check_split(catalog, split), allow_split_overlap)
        rows = split_rows(catalog, split, limit)
        test = _pairs(rows, model.preprocess, workers, split)
        train_rows = split_rows(catalog, "train")
        vocab = FindingVocabulary.from_rows(train_rows.select(["findings"]).to_pylist()
                                            if "findings" in train_rows.column_names else [])
        study_rows = [{"series_id": s, "findings": f} for s, f in zip(test["series_id"], test["findings"])]
        items = generate_vqa(study_rows, vocab, seed=1)
        index = {str(s): i for i, s in enumerate(test["series_id"])}
        volumes = np.stack([test["volume"][index[it.image]] for it in items]) if items else np.zeros((0,))
        source = {"split": split, "integrity": integrity.to_dict()}
    if not items:
        raise ValueError("no VQA items to evaluate")
    predictions = generate_texts(model, volumes, [it.prompt for it in items], max_new_tokens, batch_size,
                                 desc="VQA")
    return {**source, **score_vqa(items, predictions),
            "decoding": {"strategy": "greedy", "max_new_tokens": max_new_tokens}}
