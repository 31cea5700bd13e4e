"""Offline evaluation of a report model: generated reports and VQA answers on a held-out split.

Every report evaluation also scores the nearest-training-report baseline: each held-out scan gets the
report of the training scan whose vision-tower embedding (mean of the last stage's tokens, the model's own
eyes) is most similar. A report model that does not beat it has not learnt to read the scan.

The search server's own drafter (no report model: detect findings with a CLIP checkpoint's finding
head, then compose from the reports of the nearest training studies that state them) is scored the same
way, per finding and against the same baseline, by ``retrieval_drafts``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from voxsearch.encoders.finding_text import FindingMatcher
from voxsearch.reports.findings import finding_scores, paired_f1_bootstrap, truth_of
from voxsearch.reports.metrics import closed_vqa_accuracy, text_metrics
from voxsearch.reports.vqa import FindingVocabulary, VqaItem, generate_vqa, read_m3d_vqa_csv

log = logging.getLogger(__name__)


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


def retrieval_drafts(clip_checkpoint, train_rows, test_rows, neighbours: int = 5, workers: int = 1,
                     batch_size: int = 16) -> tuple[list[str], dict[str, list[str]]]:
    """What the search server drafts for each test study without a report model, from a CLIP checkpoint
    and the training rows as its index (as ``/api/v1/report`` with method=retrieval does):

    - "detect-retrieve-write": findings called by the finding head, then the draft from the nearest
      training studies whose reports state them (only when the checkpoint has a head);
    - "detected findings only": the head's calls as sentences, no retrieval (the detect step alone);
    - "retrieve-write": the draft from the nearest training studies by image embedding alone;
    - "nearest training report": the nearest training study's report as it is (the baseline in this
      embedding space).

    Returns the test series_ids in the order drafted, and per method the drafts' report sentences
    without their bracketed notes."""
    import torch

    from voxsearch.encoders import open_checkpoint
    from voxsearch.reports.drafting import Neighbour, compose_draft, detected_sentences, drafting_head

    checkpoint = open_checkpoint(clip_checkpoint)
    model = checkpoint.load_model(inference=True)
    head = drafting_head(checkpoint.finding_head())
    if head is None and checkpoint.config.finding_labels:
        log.warning("the finding head of %s calls no label reliably (not calibrated on held-out studies): "
                    "drafting without it, as the search server does", clip_checkpoint)
    train = _pairs(train_rows, checkpoint.preprocess, workers, "draft index")
    test = _pairs(test_rows, checkpoint.preprocess, workers, "draft queries")

    def embed(volumes):
        with model.inference():
            return np.concatenate([model.encode_image(torch.from_numpy(np.ascontiguousarray(volumes[sl], np.float32)))
                                   .float().numpy() for sl in _batches(len(volumes), batch_size)])

    index, queries = embed(train["volume"]), embed(test["volume"])
    sims = queries @ index.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, : neighbours * (4 if head is not None else 1)]
    ids, reports = [str(s) for s in train["series_id"]], [str(r) for r in train["report"]]
    out: dict[str, list[str]] = {"nearest training report": [], "retrieve-write": []}
    if head is not None:
        out.update({"detect-retrieve-write": [], "detected findings only": []})
    for q, nearest in enumerate(order):
        found = [Neighbour(ids[j], float(sims[q, j]), reports[j]) for j in nearest]
        out["nearest training report"].append(reports[nearest[0]])
        out["retrieve-write"].append(compose_draft(found, max_neighbours=neighbours).body)
        if head is not None:
            detected = head.describe(queries[q])
            out["detect-retrieve-write"].append(compose_draft(found, detected=detected, max_neighbours=neighbours).body)
            out["detected findings only"].append(detected_sentences(detected))
    return [str(s) for s in test["series_id"]], out


def _score_drafts(texts: dict[str, list[str]], references, truths, matcher, baseline) -> dict:
    """Each method's scores, with the paired bootstrap of its finding F1 against ``baseline`` texts."""
    return {method: {**_scores(references, drafts, truths, matcher),
                     "f1_vs_baseline": paired_f1_bootstrap(truths, drafts, baseline, matcher)}
            for method, drafts in texts.items()}


def evaluate_drafts(clip_checkpoint, catalog, split: str = "test", train_split: str = "train",
                    limit: int | None = None, neighbours: int = 5, workers: int = 2,
                    allow_split_overlap: bool = False, examples: int = 0) -> dict:
    """The search server's retrieval drafter (no report model) on ``split``, per finding and as text,
    each method against the nearest training report in the same CLIP embedding space."""
    from voxsearch.training.data import load_catalog, split_rows
    from voxsearch.training.integrity import check_split, require_clean

    if split == train_split:
        raise ValueError(f"the {split!r} split is the drafts' index: each study would draft from its own report")
    catalog = load_catalog(catalog)
    if "findings" not in catalog.column_names:
        raise ValueError("the catalog has no ground-truth 'findings' column: drafts are scored per finding against it")
    integrity = require_clean(check_split(catalog, split), allow_split_overlap)
    test_rows, train_rows = split_rows(catalog, split, limit), split_rows(catalog, train_split)
    if not test_rows.num_rows or not train_rows.num_rows:
        raise ValueError(f"drafts need studies with reports in both the {train_split!r} and {split!r} splits "
                         f"(found {train_rows.num_rows} and {test_rows.num_rows})")
    ids, texts = retrieval_drafts(clip_checkpoint, train_rows, test_rows, neighbours=neighbours, workers=workers)
    by_id = {r["series_id"]: r for r in test_rows.select(["series_id", "report", "findings"]).to_pylist()}
    rows = [by_id[i] for i in ids]
    vocab = FindingVocabulary.from_rows([{"findings": r["findings"]} for r in rows]
                                        + train_rows.select(["findings"]).to_pylist())
    matcher = FindingMatcher.from_vocabulary(vocab)
    truths = [truth_of(r) for r in rows]
    references = [str(r["report"]) for r in rows]
    result = {"split": split, "n": len(rows), "n_abnormal": sum(1 for t in truths if t),
              "train_studies": train_rows.num_rows, "neighbours": neighbours, "integrity": integrity.to_dict(),
              "checkpoint": str(clip_checkpoint), "baseline": "nearest training report",
              "methods": _score_drafts(texts, references, truths, matcher, texts["nearest training report"])}
    if examples:
        result["examples"] = [{"reference": references[i], **{m: t[i] for m, t in texts.items()}}
                              for i in range(min(examples, len(rows)))]
    return result


def evaluate_reports(model, catalog, split: str = "test", train_split: str = "train", limit: int | None = None,
                     max_new_tokens: int = 192, batch_size: int = 4, workers: int = 2,
                     allow_split_overlap: bool = False, examples: int = 0,
                     drafters: dict[str, object] | None = None) -> dict:
    """Generated reports vs references and vs the nearest-training-report baseline, on ``split``.
    ``drafters``: {name: CLIP checkpoint}; each also scores the server's retrieval drafts made with it
    (``retrieval_drafts``), under result["drafters"][name][method]."""
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
    if drafters:
        ids = [str(s) for s in test["series_id"]]
        result["drafters"] = {}
        for name, checkpoint in drafters.items():
            drafted, texts = retrieval_drafts(checkpoint, train_rows, test_rows, workers=workers)
            if drafted != ids:  # a study one preprocessing contract refused would shift every pairing
                raise ValueError(f"drafter {name}: its preprocessing kept {len(drafted)} test studies, the report "
                                 f"model's {len(ids)}; they must be the same studies")
            result["drafters"][name] = {"checkpoint": str(checkpoint),
                                        "methods": _score_drafts(texts, references, truths, matcher, baseline)}
            if examples:
                result["drafters"][name]["examples"] = [{"reference": references[i], **{m: t[i] for m, t in texts.items()}}
                                                        for i in range(min(examples, len(ids)))]
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
