"""Report-model training on Ray Train (TorchTrainer; DDP over gloo on CPU, NCCL on GPU).

Stage 1 aligns: the projector and the new image-token embeddings learn, the vision tower and the LM stay
frozen. Stage 2 instructs: the LM (full, or LoRA adapters) and the projector learn, the vision tower
optionally too, on report writing and VQA. Volumes are preprocessed once by Ray Data and shipped to the
workers through the object store; with a frozen tower each worker computes a volume's stage maps once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from voxsearch.common.durable import replace_dir
from voxsearch.reports.model import LoraSettings, ReportModelConfig
from voxsearch.training.schedule import warmup_cosine

log = logging.getLogger(__name__)

TASKS = ("report", "vqa")


@dataclass
class ReportTrainConfig:
    catalog: str | Path
    out: str | Path  # the trained model directory (load_report_model format)
    stage: int = 1
    # Stage 2: the stage-1 model directory. Stage 1: None (fresh) or a report model to continue.
    init: str | Path | None = None
    model: ReportModelConfig = field(default_factory=ReportModelConfig)
    # Stage 1 only: a voxsearch CLIP checkpoint directory, or a Med3DVLM DCFormer file (random if None).
    # A CLIP checkpoint also sets the model's vision variant, input filter and image size to its own.
    vision_init: str | Path | None = None
    preprocess: dict | None = None  # PreprocessConfig dict; default: the CLIP checkpoint's, else model size
    tasks: tuple[str, ...] = TASKS
    vqa_per_study: int | None = None  # cap on generated VQA items per study (None: all, ~10)
    m3d_vqa_csv: str | Path | None = None
    m3d_image_root: str | Path | None = None
    epochs: int = 3
    batch_size: int = 4  # per worker
    lr: float | None = None  # projector (and new embeddings); default 1e-3 in stage 1, 2e-4 in stage 2
    lm_lr: float = 5e-5  # stage 2
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    train_vision: bool = False  # stage 2
    lora: LoraSettings | None = None  # stage 2: adapters instead of full fine-tuning
    workers: int = 2
    gpus_per_worker: float = 0.0
    threads_per_worker: int | None = None
    max_train_studies: int | None = None
    seed: int = 0
    ray_address: str | None = None

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.stage == 2 and not self.init:
            raise ValueError("stage 2 starts from a stage-1 model: pass init=<stage-1 model directory>")
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")

    @property
    def projector_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.stage == 1 else 2e-4)


@dataclass
class ReportTrainResult:
    model_dir: Path
    metrics: dict


@dataclass
class _VisionInit:
    tower: object  # DCFormer
    variant: str
    # A CLIP checkpoint's image size and preprocessing contract; None for a bare Med3DVLM tower file.
    image_size: tuple[int, int, int] | None = None
    preprocess: dict | None = None


def _vision_from(path) -> _VisionInit:
    """The vision tower from a CLIP checkpoint dir (with the size and preprocessing it was trained at)
    or from a Med3DVLM DCFormer file."""
    from voxsearch.encoders import load_med3dvlm_dcformer, open_checkpoint

    path = Path(path)
    if path.is_dir():
        checkpoint = open_checkpoint(path)
        return _VisionInit(checkpoint.load_model().vision, checkpoint.config.vision_variant,
                           checkpoint.image_size, checkpoint.preprocess)
    if path.is_file():
        return _VisionInit(load_med3dvlm_dcformer(path, "small"), "small")
    raise FileNotFoundError(f"vision init {path} is neither a CLIP checkpoint directory nor a checkpoint file")


def _initial_model(cfg: ReportTrainConfig, work: Path) -> tuple[Path, dict]:
    """The directory workers start from, and the preprocessing the model expects."""
    from voxsearch.ingest import PreprocessConfig
    from voxsearch.reports.model import build_report_model, read_report_meta, save_report_model

    if cfg.init:
        meta = read_report_meta(cfg.init)
        return Path(cfg.init), meta["preprocess"]
    model_cfg = cfg.model
    vision, preprocess = None, cfg.preprocess
    if cfg.vision_init:
        init = _vision_from(cfg.vision_init)
        vision = init.tower
        model_cfg = dataclasses.replace(model_cfg, vision_variant=init.variant,
                                        vision_input_filter=getattr(vision, "input_filter", 0))
        if init.image_size is not None:
            # Like the variant, the size the tower was trained at comes with it, and so does its preprocessing.
            model_cfg = dataclasses.replace(model_cfg, image_size=init.image_size)
            if preprocess is None:
                preprocess = PreprocessConfig.from_dict(init.preprocess).to_dict()
    if preprocess is None:
        preprocess = PreprocessConfig(spatial_size=tuple(model_cfg.image_size)).to_dict()
    model = build_report_model(model_cfg, vision=vision, preprocess=preprocess, seed=cfg.seed)
    return save_report_model(model, work / "init", extra={"stage": 0}), preprocess


def build_samples(series_ids, reports, findings, tasks, seed: int, vocab_rows, vqa_per_study: int | None = None
                  ) -> list[tuple[int, str | None, str]]:
    """(volume index, prompt or None for the report prompt, target text) training samples."""
    from voxsearch.reports.vqa import FindingVocabulary, generate_vqa

    samples: list[tuple[int, str | None, str]] = []
    if "report" in tasks:
        samples += [(i, None, str(r)) for i, r in enumerate(reports) if r]
    if "vqa" in tasks:
        index = {str(s): i for i, s in enumerate(series_ids)}
        rows = [{"series_id": s, "findings": f} for s, f in zip(series_ids, findings)]
        vocab = FindingVocabulary.from_rows(vocab_rows)
        items = generate_vqa(rows, vocab, seed=seed)
        if vqa_per_study is not None:
            rng = random.Random(seed)
            rng.shuffle(items)
            per_study: dict[str, list] = {}
            for it in items:
                per_study.setdefault(it.image, []).append(it)
            items = [it for group in per_study.values() for it in group[:vqa_per_study]]
        samples += [(index[it.image], it.prompt, it.target) for it in items]
    return samples


def _m3d_samples(cfg: ReportTrainConfig, preprocess: dict, offset: int) -> tuple[list, list[np.ndarray]]:
    from voxsearch.ingest import IngestError, PreprocessConfig, preprocess_path
    from voxsearch.reports.vqa import read_m3d_vqa_csv

    pre = PreprocessConfig.from_dict(preprocess)
    items = read_m3d_vqa_csv(cfg.m3d_vqa_csv, cfg.m3d_image_root)
    volumes: list[np.ndarray] = []
    index: dict[str, int] = {}
    samples = []
    for it in items:
        if it.image not in index:
            try:
                volumes.append(preprocess_path(it.image, pre).astype(np.float16))
            except (IngestError, FileNotFoundError) as exc:
                log.warning("M3D-VQA image skipped: %s", exc)
                index[it.image] = -1
                continue
            index[it.image] = offset + len(volumes) - 1
        if index[it.image] >= 0:
            samples.append((index[it.image], it.prompt, it.target))
    return samples, volumes


def _train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import torch
    from ray.train import Checkpoint

    from voxsearch.reports.model import load_report_model, save_report_model, wrap_lora

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"] + rank)
    stage = config["stage"]
    model = load_report_model(config["init"])
    if stage == 2 and config["lora"]:
        model.config.lora = LoraSettings(**config["lora"])
        model.lm = wrap_lora(model.lm, model.config.lora)
    model.set_trainable(projector=True, lm=stage == 2, vision=stage == 2 and config["train_vision"],
                        new_embeddings=stage == 1)
    model.train()
    trainable = model.trainable_parameters()
    projector_ids = {id(p) for p in model.projector.parameters()}
    groups = [{"params": [p for p in trainable if id(p) in projector_ids], "lr": config["projector_lr"]}]
    rest = [p for p in trainable if id(p) not in projector_ids]
    if rest:
        groups.append({"params": rest, "lr": config["lm_lr"] if stage == 2 else config["projector_lr"]})
    optimizer = torch.optim.AdamW(groups, weight_decay=config["weight_decay"])
    net = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    device = model.device

    volumes = ray.get(config["volumes"])
    samples = config["samples"]
    per_rank = len(samples) // world  # equal step counts keep DDP ranks in lockstep
    bs = config["batch_size"]
    steps_per_epoch = math.ceil(per_rank / bs)
    total = steps_per_epoch * config["epochs"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, config["warmup_steps"], min_ratio=0.1))
    frozen_vision = not any(p.requires_grad for p in model.vision.parameters())
    stage_cache: dict[int, list[torch.Tensor]] = {}

    def stages_of(indices: list[int]) -> list[torch.Tensor]:
        missing = [i for i in dict.fromkeys(indices) if i not in stage_cache]
        if missing:
            images = torch.from_numpy(np.stack([volumes[i] for i in missing]).astype(np.float32))
            maps = model.vision_stages(images)
            for k, i in enumerate(missing):
                stage_cache[i] = [m[k:k + 1, ...].detach() for m in maps[-2:]]
        return [torch.cat([stage_cache[i][s] for i in indices]) for s in range(2)]

    history = []
    step = 0
    for epoch in range(config["epochs"]):
        order = list(range(len(samples)))
        random.Random(config["seed"] * 1000 + epoch).shuffle(order)
        mine = order[rank::world][:per_rank]
        loss_sum, count = 0.0, 0
        for b in range(0, per_rank, bs):
            batch = [samples[i] for i in mine[b:b + bs]]
            vol_idx = [s[0] for s in batch]
            text = model.collate([s[1] for s in batch], [s[2] for s in batch])
            if frozen_vision:
                out = net(None, text["input_ids"].to(device), text["attention_mask"].to(device),
                          text["labels"].to(device), stages=stages_of(vol_idx))
            else:
                images = torch.from_numpy(np.stack([volumes[i] for i in vol_idx]).astype(np.float32))
                out = net(images.to(device), text["input_ids"].to(device), text["attention_mask"].to(device),
                          text["labels"].to(device))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if config["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(trainable, config["grad_clip"])
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += float(out.loss.detach())
            count += 1
        mean = torch.tensor([loss_sum, count], dtype=torch.float64)
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(mean)
        epoch_loss = float(mean[0] / max(mean[1], 1))
        history.append(epoch_loss)
        metrics = {"epoch": epoch + 1, "loss": epoch_loss, "steps": step, "history": list(history)}
        if epoch + 1 < config["epochs"]:
            ray.train.report(metrics)
            continue
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_report_model(model, Path(tmp) / "model", extra={"stage": stage})
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(Path(tmp) / "model")))
        else:
            ray.train.report(metrics)


def train_report(cfg: ReportTrainConfig) -> ReportTrainResult:
    """Train one stage and write the model to ``cfg.out`` (atomically); returns its path and metrics."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from voxsearch.common.runtime import RayConfig, init_ray
    from voxsearch.training.data import collect_pairs, load_catalog, preprocessed_dataset, split_rows
    from voxsearch.training.integrity import check_split

    out = Path(cfg.out)
    catalog = load_catalog(cfg.catalog)
    integrity = {s: check_split(catalog, s).to_dict() for s in ("validation", "test")}
    rows = split_rows(catalog, "train", cfg.max_train_studies)
    init_ray(RayConfig(address=cfg.ray_address))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    try:
        init_dir, preprocess = _initial_model(cfg, work)
        pairs = collect_pairs(preprocessed_dataset(rows, preprocess, workers=max(1, cfg.workers), label="train"))
        samples = build_samples(pairs["series_id"], pairs["report"], pairs["findings"], cfg.tasks, cfg.seed,
                                rows.select([c for c in ("series_id", "findings") if c in rows.column_names])
                                .to_pylist(), cfg.vqa_per_study)
        volumes = list(pairs["volume"])
        if cfg.m3d_vqa_csv:
            extra_samples, extra_volumes = _m3d_samples(cfg, preprocess, len(volumes))
            samples += extra_samples
            volumes += extra_volumes
        if len(samples) < cfg.workers:
            raise ValueError(f"only {len(samples)} training samples for {cfg.workers} workers")
        import ray

        threads = cfg.threads_per_worker or max(1, (os.cpu_count() or 2) // max(1, cfg.workers))
        loop_config = {
            "init": str(init_dir), "stage": cfg.stage, "samples": samples, "volumes": ray.put(volumes),
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "projector_lr": cfg.projector_lr,
            "lm_lr": cfg.lm_lr, "weight_decay": cfg.weight_decay, "warmup_steps": cfg.warmup_steps,
            "grad_clip": cfg.grad_clip, "train_vision": cfg.train_vision, "seed": cfg.seed, "threads": threads,
            "lora": dataclasses.asdict(cfg.lora) if cfg.lora else None,
        }
        log.info("stage %d: %d samples from %d studies on %d worker(s)", cfg.stage, len(samples), len(volumes),
                 cfg.workers)
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                         resources_per_worker={"CPU": 1, "GPU": cfg.gpus_per_worker}
                                         if cfg.gpus_per_worker > 0 else {"CPU": 1}),
            run_config=RunConfig(storage_path=str(work / "ray"), name=f"report-stage{cfg.stage}"),
        )
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"report training stage {cfg.stage} failed: {result.error}") from result.error
        if result.checkpoint is None:
            raise RuntimeError("report training finished without a checkpoint")
        metrics = {k: v for k, v in (result.metrics or {}).items() if k in ("epoch", "loss", "steps", "history")}
        metrics.update({"stage": cfg.stage, "samples": len(samples), "studies": len(volumes),
                        "split_integrity": integrity})
        staged = work / "final"
        shutil.copytree(result.checkpoint.path, staged)
        meta_path = staged / "config.json"
        meta = json.loads(meta_path.read_text())
        meta["extra"] = {"training": metrics, "preprocess_id": _preprocess_id(preprocess)}
        meta_path.write_text(json.dumps(meta, indent=2))
        replace_dir(staged, out)
        return ReportTrainResult(out, metrics)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _preprocess_id(preprocess: dict) -> str:
    from voxsearch.ingest import PreprocessConfig

    return PreprocessConfig.from_dict(preprocess).id
