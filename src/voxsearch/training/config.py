"""What a contrastive training run is: one typed config with its defaults, and named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxsearch.common.storage import ObjectPath, location
from voxsearch.encoders import ClipConfig, TextTowerConfig
from voxsearch.ingest import PreprocessConfig


@dataclass
class ClipTrainConfig:
    catalog: Path | ObjectPath
    out: Path
    # Ray Train scaling: one DDP rank per worker; gloo on CPU, NCCL when workers hold GPUs.
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    model: ClipConfig = field(default_factory=ClipConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    epochs: int = 10
    # Per worker, per micro-batch; the optimiser sees batch_size * grad_accum * workers pairs per step.
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    text_lr: float | None = None  # None: same as lr (a lower one protects a pretrained text tower)
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    freeze_text: bool = False  # freezes the text backbone only; its projection always trains
    # None: from scratch (vision random, text tower pretrained); a directory: a project checkpoint
    # (load_clip), also as an s3:// or gs:// URI; a file: a published Med3DVLM DCFormer_SigLIP checkpoint
    # (needs init_text_dir).
    init: Path | ObjectPath | None = None
    init_text_dir: Path | None = None
    seed: int = 0
    augment: bool = True
    # Auxiliary multi-label finding loss on the image embedding (0: off). Labels: the catalog's ground
    # truth where present, otherwise findings extracted from the report (negation-aware).
    finding_loss_weight: float = 0.0
    finding_min_count: int = 5  # a (type, organ) label needs this many training studies
    # Up-weight each label's rare positives by negatives/positives, capped here (1: plain BCE). Measured on
    # the phantom bench, a cap of 10 did worse than plain BCE (README, training benchmark).
    finding_pos_weight_cap: float = 1.0
    # The same labels plus "any finding in this organ", predicted from the tower's pooled features by a
    # second head (ClipConfig.feature_finding_head; 0: no such head). A training signal for lesions too
    # small for the embedding head to learn; search still reads the embedding.
    feature_finding_loss_weight: float = 0.0
    # Pairs whose studies show the same findings (same modality, body part, findings) are no negatives.
    group_same_findings: bool = True
    # Instance discrimination (training/view_loss.py): each study is seen twice per step, augmented
    # independently (the augmentation above), and the two views must find each other among the batch
    # (0: off, one view per study). Both views also take the text and finding losses, so a step costs
    # about twice the image-tower work. The second view can also turn by up to view_max_degrees and move
    # by up to view_max_shift voxels (trilinear); on the phantom bench, 4 degrees found rescans less often
    # than the augmentation's integer shifts alone (0.83 against 0.92) and cost steps per second.
    view_loss_weight: float = 0.0
    view_temperature: float = 0.1
    view_max_degrees: float = 0.0
    view_max_shift: float = 0.0
    # Evaluation (Med3DVLM protocol): first N pairs of the held-out split, N as many of these as exist.
    eval_ns: tuple[int, ...] = (100, 500, 1000, 2000)
    eval_split: str = "validation"  # per-epoch evaluation; the final one always uses "test"
    eval_every: int = 1  # epochs between evaluations on eval_split (the last epoch always evaluates)
    eval_batch_size: int = 16
    allow_split_overlap: bool = False  # evaluations refuse a catalog whose splits share scans/patients
    checkpoint_every: int = 0  # optimiser steps between mid-epoch checkpoints; 0: at epoch ends only
    max_failures: int = 2
    preprocess_workers: int = 2  # Ray Data actors decoding + preprocessing the catalog once
    max_train_studies: int | None = None
    ray_address: str | None = None
    # Recovery tests only: {"rank": r, "step": s, "marker": path} makes rank r exit hard once at step s.
    crash_once: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.catalog = location(self.catalog)  # a folder, or an s3:// / gs:// catalog
        self.out = Path(self.out)
        # Absolute here, on the driver: the training workers open them from their own working folders.
        if self.init is not None:
            self.init = location(self.init)
            if isinstance(self.init, Path):
                self.init = self.init.resolve()
        if self.init_text_dir is not None:
            self.init_text_dir = Path(self.init_text_dir).resolve()
        for name in ("workers", "epochs", "batch_size", "grad_accum", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClipTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.view_loss_weight < 0 or self.view_temperature <= 0:
            raise ValueError("ClipTrainConfig.view_loss_weight must be >= 0 and view_temperature > 0, got "
                             f"{self.view_loss_weight} and {self.view_temperature}")
        if self.finding_loss_weight < 0:
            raise ValueError(f"ClipTrainConfig.finding_loss_weight must be >= 0, got {self.finding_loss_weight}")
        if self.feature_finding_loss_weight < 0 or (self.feature_finding_loss_weight and not self.finding_loss_weight):
            raise ValueError("ClipTrainConfig.feature_finding_loss_weight must be >= 0 and needs the finding loss "
                             f"(finding_loss_weight > 0), got {self.feature_finding_loss_weight}")
        if self.lr <= 0:
            raise ValueError(f"ClipTrainConfig.lr must be > 0, got {self.lr}")
        self.eval_ns = tuple(int(n) for n in self.eval_ns)

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def summary(self) -> dict[str, Any]:
        """JSON-able description of the run, stored beside the weights."""

        def plain(value: Any) -> Any:
            if isinstance(value, ObjectPath):
                return value.uri  # never its query string, which may hold keys
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return {k: v for k, v in plain(self).items() if k != "crash_once"}


def _quick(catalog: Path, out: Path, **overrides: Any) -> ClipTrainConfig:
    # Minutes on a 2-core laptop: the smallest DCFormer on small volumes, a frozen pretrained text
    # tower (no backward through BERT), short reports, and a high learning rate with short warm-up.
    # SigLIP's bias init of -10 suits batches of thousands (log-odds of a positive pair); with a
    # global batch of ~32 it would pin every logit below 0 for the few hundred steps a quick run has.
    # One worker with both cores: on a 2-core machine two DDP ranks of one thread each process fewer
    # samples per second than one rank with two threads. The box pre-filter lets the stride-4 stem see
    # every voxel of a small input; the finding loss teaches the embedding what the report's findings are;
    # the two-view loss keeps one patient's scan apart from another's (without it, studies with the same
    # findings collapse together and a rescan is not found). Two views per study double the image work
    # of a step, so 40 epochs keep a run near half an hour on 2 cores.
    size = (32, 64, 64)
    base: dict[str, Any] = dict(
        model=ClipConfig(
            vision_variant="nano",
            embed_dim=128,
            text=TextTowerConfig(max_length=64),
            loss_mode="siglip",
            init_bias=-4.0,
            image_size=size,
            input_filter=3,
        ),
        preprocess=PreprocessConfig(spatial_size=size),
        workers=1,
        cpus_per_worker=2.0,
        epochs=40,
        batch_size=32,
        lr=2e-3,
        weight_decay=0.05,
        warmup_steps=50,
        freeze_text=True,
        finding_loss_weight=10.0,
        feature_finding_loss_weight=10.0,
        view_loss_weight=1.0,
        eval_ns=(100, 500),
    )
    base.update(overrides)
    return ClipTrainConfig(catalog=catalog, out=out, **base)


def _default(catalog: Path, out: Path, **overrides: Any) -> ClipTrainConfig:
    # Med3DVLM's recipe at its input size: DCFormer-small at 128x256x256, batch 32 per step,
    # lr 1e-4 for the image tower, a gentler rate for the pretrained text tower.
    size = (128, 256, 256)
    base: dict[str, Any] = dict(
        model=ClipConfig(vision_variant="small", embed_dim=768, loss_mode="siglip", image_size=size),
        preprocess=PreprocessConfig(spatial_size=size),
        epochs=50,
        batch_size=4,
        grad_accum=4,
        lr=1e-4,
        text_lr=1e-5,
        warmup_steps=200,
        checkpoint_every=500,
    )
    base.update(overrides)
    return ClipTrainConfig(catalog=catalog, out=out, **base)


PRESETS = {"quick": _quick, "default": _default}


def preset(name: str, catalog: Path | ObjectPath | str, out: Path | str, **overrides: Any) -> ClipTrainConfig:
    """A named starting point (`quick`: minutes on CPU; `default`: the real recipe) plus overrides."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return factory(location(catalog), Path(out), **overrides)
