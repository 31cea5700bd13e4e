"""`train_clip`: the driver side of a training run on Ray Train (local Ray or a cluster)."""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxsearch.common.durable import replace_dir
from voxsearch.training.config import ClipTrainConfig

log = logging.getLogger(__name__)

RUN_NAME = "clip"


@dataclass
class TrainResult:
    checkpoint_dir: Path  # loadable with voxsearch.encoders.load_clip; extra["preprocess"] is set
    metrics: dict[str, Any] = field(default_factory=dict)


def _steps_per_epoch(n_train: int, cfg: ClipTrainConfig) -> int:
    # Studies go to ranks round-robin (shares differ by one at most) and each rank drops its last
    # partial micro-batch; every rank therefore takes the same number of steps.
    steps = (n_train // cfg.workers) // (cfg.batch_size * cfg.grad_accum)
    if steps < 1:
        raise ValueError(
            f"{n_train} training studies are too few for {cfg.workers} worker(s) x batch {cfg.batch_size} "
            f"x grad_accum {cfg.grad_accum}; lower --batch-size or --workers"
        )
    return steps


def _publish(src: Path, dest: Path) -> None:
    """Copy a directory into place atomically: readers never see a half-written model."""
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    shutil.copytree(src, tmp)
    replace_dir(tmp, dest)


def train_clip(cfg: ClipTrainConfig, resume: bool = False) -> TrainResult:
    """Train the CLIP model on the catalog's train split with Ray Train; evaluate; publish the model.

    Writes under cfg.out: `model/` (the final checkpoint, load_clip format), `metrics.json`,
    `metrics.csv`, `curves.png`, and `ray/` (Ray Train's run state and rolling checkpoints).
    A killed worker is replaced and the run continues from the last checkpoint; `resume=True`
    continues an earlier run of the same --out that stopped (the driver died).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from voxsearch.common.runtime import RayConfig, init_ray
    import pyarrow as pa

    from voxsearch.training.data import load_catalog, preprocessed_dataset, split_dataset, split_rows
    from voxsearch.training.integrity import check_split, require_clean
    from voxsearch.training.loop import MODEL_DIR, train_loop
    from voxsearch.training.shard_cache import assign_ranks
    from voxsearch.training.metrics_log import write_metrics

    out = cfg.out
    run_dir = out / "ray" / RUN_NAME
    if run_dir.exists() and not resume:
        raise FileExistsError(f"{out} already holds a training run; pass resume (--resume) to continue it "
                              "or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    init_ray(RayConfig(address=cfg.ray_address))

    table = load_catalog(cfg.catalog)
    splits = set(table.column("split").to_pylist())
    eval_split = cfg.eval_split if cfg.eval_split in splits else "test"
    integrity = {s: require_clean(check_split(table, s), cfg.allow_split_overlap).to_dict()
                 for s in sorted({eval_split, "test"})}
    train_rows = split_rows(table, "train", limit=cfg.max_train_studies)
    held_out = sorted({eval_split, "test"})
    parts = [train_rows] + [split_rows(table, s, limit=max(cfg.eval_ns)) for s in held_out]
    preprocess = cfg.preprocess.to_dict()
    log.info("preprocessing %s studies (Ray Data, %d actors)",
             ", ".join(f"{p.num_rows} {s}" for p, s in zip(parts, ["train"] + held_out)), cfg.preprocess_workers)
    # One pass (one actor pool) over all splits: starting a pool costs more than a small split.
    everything = preprocessed_dataset(pa.concat_tables(parts), preprocess, cfg.preprocess_workers,
                                      label="+".join(["train"] + held_out))
    train_ds = split_dataset(everything, "train")
    held = {s: split_dataset(everything, s) for s in held_out}
    for split, ds in held.items():
        if ds.count() == 0:
            raise ValueError(f"no {split} study could be preprocessed; nothing to evaluate on")
    eval_ds, test_ds = held[eval_split], held["test"]
    train_ids = [str(s) for s in train_ds.select_columns(["series_id"]).to_pandas()["series_id"]]
    n_train = len(train_ids)
    steps_per_epoch = _steps_per_epoch(n_train, cfg)
    if cfg.finding_loss_weight > 0:
        _set_finding_labels(cfg, train_rows)

    extra = {
        "preprocess": preprocess,
        "preprocess_id": cfg.preprocess.id,
        "trained_on": {"train_studies": n_train, "catalog_rows": table.num_rows},
        "train_config": cfg.summary(),
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "steps_per_epoch": steps_per_epoch, "extra": extra,
                           "owner": assign_ranks(train_ids, cfg.workers)},
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str((out / "ray").resolve()),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": train_ds, "eval": eval_ds},
        # Not split by Ray: each rank reads the set once and keeps the studies the driver assigned it,
        # so the same seed gives the same run (Ray's streaming split varies the order between runs).
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    log.info("training: %d studies, %d workers, %d steps/epoch x %d epochs", n_train, cfg.workers,
             steps_per_epoch, cfg.epochs)
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")

    import torch

    with result.checkpoint.as_directory() as directory:
        directory = Path(directory)
        state = torch.load(directory / "train_state.pt", map_location="cpu", weights_only=False)
        model_dir = out / MODEL_DIR
        _publish(directory / MODEL_DIR, model_dir)

    history = state["history"]
    _calibrate_finding_head(cfg, model_dir, eval_ds, eval_split)
    final = _final_evaluation(cfg, model_dir, table, test_ds)
    metrics = {
        "optimizer_steps": int(state["step"]),
        "expected_steps": steps_per_epoch * cfg.epochs,
        "steps_per_epoch": steps_per_epoch,
        "train_studies": n_train,
        "eval_split": eval_split,
        "integrity": integrity,
        "history": history,
        "final": final,
        "resumed_from_steps": sorted({h["resumed_from_step"] for h in history if "resumed_from_step" in h}),
    }
    write_metrics(out, metrics)
    log.info("model written to %s; metrics in %s", model_dir, out / "metrics.json")
    return TrainResult(checkpoint_dir=model_dir, metrics=metrics)


def _set_finding_labels(cfg: ClipTrainConfig, train_rows) -> None:
    """The finding-loss vocabulary, fixed on the driver so every rank and the checkpoint agree."""
    import dataclasses

    from voxsearch.training.finding_labels import FindingLabeler

    labeler = FindingLabeler.from_rows(train_rows.select(
        [c for c in ("findings", "report") if c in train_rows.column_names]).to_pylist(), cfg.finding_min_count)
    if not labeler.labels:
        log.warning("no finding occurs in %d training studies (ground truth or report text): "
                    "training without the finding loss", cfg.finding_min_count)
        cfg.finding_loss_weight = 0.0
        cfg.feature_finding_loss_weight = 0.0
        return
    log.info("finding loss over %d labels: %s", len(labeler.labels), ", ".join(labeler.labels))
    cfg.model = dataclasses.replace(cfg.model, finding_labels=labeler.labels,
                                    feature_finding_head=cfg.feature_finding_loss_weight > 0)


def _calibrate_finding_head(cfg: ClipTrainConfig, model_dir: Path, eval_ds, split: str) -> None:
    """Calibrate the finding head on the evaluation split (not the test split)."""
    from voxsearch.training.evaluate import embed_pairs

    def embed(model):
        return embed_pairs(model, eval_ds.iter_batches(batch_size=cfg.eval_batch_size, batch_format="numpy"))

    calibrate_checkpoint(model_dir, embed, split)


def calibrate_checkpoint(model_dir: Path, embed, split: str) -> None:
    """Store in the checkpoint, from held-out studies (``embed(model)`` -> embed_pairs output): per-label
    call thresholds of the finding head, and the weight with which search queries lean on it."""
    from voxsearch.encoders import load_clip, read_clip_meta, save_clip
    from voxsearch.training.evaluate import finding_thresholds, query_finding_weight

    model = load_clip(model_dir)
    if model.finding_head is None:
        return
    emb = embed(model)
    thresholds = finding_thresholds(model, emb)
    extra = dict(read_clip_meta(model_dir).get("extra") or {})
    extra.update({"finding_thresholds": thresholds, "finding_thresholds_from": f"{split} split, "
                  f"{len(emb['img'])} studies, lowest with precision >= 0.6 per label"})
    chosen = query_finding_weight(model, emb)
    if chosen is not None:
        model.config.query_finding_weight, scores = chosen
        extra["query_finding_weight_from"] = {"split": split, "studies": int(len(emb["img"])),
                                              "finding_P@10_by_weight": scores}
        log.info("query finding weight %g (finding P@10 on the %s split by weight: %s)",
                 model.config.query_finding_weight, split, scores)
    save_clip(model, model_dir, extra=extra)
    log.info("finding thresholds: %s", dict(zip(model.config.finding_labels, thresholds)))


def _final_evaluation(cfg: ClipTrainConfig, model_dir: Path, table, test_ds) -> dict[str, Any]:
    """Score the published model on the test split, loaded the way embedding and serving load it."""
    from voxsearch.encoders import load_clip
    from voxsearch.training.evaluate import embed_pairs, headline, score_embeddings
    from voxsearch.training.integrity import check_split

    model = load_clip(model_dir)
    emb = embed_pairs(model, test_ds.iter_batches(batch_size=cfg.eval_batch_size, batch_format="numpy"))
    result = score_embeddings(model, emb, cfg.eval_ns)
    result.update({"split": "test", "integrity": check_split(table, "test").to_dict(),
                   "preprocess_id": cfg.preprocess.id})
    result["headline"] = headline(result)
    log.info("final test evaluation: %s", json.dumps(result["headline"]))
    return result
