"""`voxsearch train ...`: training stages. `train clip` is here; other modules add stages through
`register_train(train_subparsers)` (e.g. the report model)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from voxsearch.commands._groups import extend_group

log = logging.getLogger(__name__)

EXAMPLE = """example (minutes on a laptop):
  voxsearch synth --n 300 --out archive && voxsearch ingest archive --out catalog
  voxsearch train clip --catalog catalog --out runs/clip --preset quick
then embed with:  voxsearch embed --catalog catalog --checkpoint runs/clip/model ..."""


def register(sub) -> None:
    p = sub.add_parser("train", help="train models (clip: image/report alignment on Ray Train)",
                       description="Training stages; each runs on Ray Train (local Ray or --ray-address).")
    stages = p.add_subparsers(dest="train_stage", metavar="STAGE")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    _register_clip(stages)
    _register_export(stages)
    extend_group(stages, "register_train", skip=__name__)


def _register_clip(stages) -> None:
    p = stages.add_parser(
        "clip", help="SigLIP-align the DCFormer image tower and the text tower on catalog (scan, report) pairs",
        description="Contrastive training with Ray Train TorchTrainer (DDP; gloo on CPU, NCCL on GPU), "
                    "evaluation each epoch (recall@1/5/10, finding precision@10), checkpoints that survive "
                    "a lost worker. Writes OUT/model (load_clip format), OUT/metrics.json|csv, OUT/curves.png.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", required=True, help="catalog directory (voxsearch ingest), or its s3:// / gs:// URI")
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--preset", default="default", choices=["quick", "default"],
                   help="quick: nano DCFormer at 32x64x64, minutes on CPU; default: small at 128x256x256")
    p.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (0: CPU with gloo)")
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="pairs per worker per micro-batch")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=float)
    p.add_argument("--text-lr", type=float, help="learning rate of the text tower (default: --lr)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--freeze-text", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the text backbone fixed (its projection still trains)")
    p.add_argument("--init", help="start from a project checkpoint dir (or its s3:// / gs:// URI) or a Med3DVLM "
                   "checkpoint file")
    p.add_argument("--init-text-dir", type=Path, help="ClinicalBERT directory for a Med3DVLM --init")
    p.add_argument("--vision-variant", choices=["nano", "naive", "tiny", "small", "base", "large"])
    p.add_argument("--embed-dim", type=int)
    p.add_argument("--image-size", type=int, nargs=3, metavar=("D", "H", "W"),
                   help="model input size; also the preprocessing spatial size")
    p.add_argument("--finding-loss-weight", type=float,
                   help="weight of the auxiliary finding-label loss (0: off; quick preset: 10)")
    p.add_argument("--finding-pos-weight-cap", type=float,
                   help="up-weight rare finding positives by negatives/positives, capped (1: plain BCE)")
    p.add_argument("--feature-finding-loss-weight", type=float,
                   help="weight of a second finding head on the tower's pooled features, labels plus organs "
                        "(0: off; it needs the finding loss)")
    p.add_argument("--group-same-findings", action=argparse.BooleanOptionalAction, default=None,
                   help="treat pairs whose studies show the same findings as non-negatives (default: on)")
    p.add_argument("--view-loss-weight", type=float,
                   help="weight of the two-view instance loss that tells one patient's scan from another's "
                        "(0: off, one view per study; quick preset: see README)")
    p.add_argument("--view-max-degrees", type=float, help="rigid rotation of the second view, up to this many degrees")
    p.add_argument("--view-max-shift", type=float, help="shift of the second view, up to this many voxels")
    p.add_argument("--input-filter", type=int,
                   help="box pre-filter size before the DCFormer stem (odd; 0: the published encoder)")
    p.add_argument("--eval-every", type=int, help="epochs between evaluations (default 1; the last always runs)")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-train-studies", type=int, help="use only the first N train studies")
    p.add_argument("--checkpoint-every", type=int, help="optimiser steps between mid-epoch checkpoints")
    p.add_argument("--allow-split-overlap", action="store_true",
                   help="evaluate even if splits share scans or patients (reported, not refused)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--ray-address", help="Ray cluster (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=run_clip)


def _register_export(stages) -> None:
    p = stages.add_parser(
        "export", help="copy a CLIP checkpoint, leaving out a frozen packaged text tower (a few MB)",
        description="Write SRC (a checkpoint directory) to --out. A model trained with the packaged MiniLM text "
                    "tower frozen is written without it (its weights come from the installed package), which "
                    "makes it small enough to ship; --with-text keeps the text tower.")
    p.add_argument("src", type=Path, help="checkpoint directory (e.g. RUN/model)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--with-text", action="store_true", help="keep the text tower's weights in the checkpoint")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from voxsearch.encoders import export_clip

    try:
        out = export_clip(args.src, args.out, packaged_text=not args.with_text)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    return 0


_SIMPLE = ("workers", "gpus_per_worker", "cpus_per_worker", "epochs", "batch_size", "grad_accum", "lr",
           "text_lr", "warmup_steps", "grad_clip", "freeze_text", "init", "init_text_dir", "seed",
           "max_train_studies", "checkpoint_every", "ray_address", "finding_loss_weight", "group_same_findings", "eval_every",
           "finding_pos_weight_cap", "feature_finding_loss_weight", "view_loss_weight", "view_max_degrees", "view_max_shift")


def build_config(args):
    import dataclasses

    from voxsearch.training.config import preset

    overrides = {k: getattr(args, k) for k in _SIMPLE if getattr(args, k) is not None}
    if args.allow_split_overlap:
        overrides["allow_split_overlap"] = True
    cfg = preset(args.preset, args.catalog, args.out, **overrides)
    model_changes = {}
    if args.vision_variant:
        model_changes["vision_variant"] = args.vision_variant
    if args.embed_dim:
        model_changes["embed_dim"] = args.embed_dim
    if args.input_filter is not None:
        model_changes["input_filter"] = args.input_filter
    if args.image_size:
        model_changes["image_size"] = tuple(args.image_size)
        cfg.preprocess = dataclasses.replace(cfg.preprocess, spatial_size=tuple(args.image_size))
    if model_changes:
        cfg.model = dataclasses.replace(cfg.model, **model_changes)
    return cfg


def run_clip(args) -> int:
    from voxsearch.training import SplitLeakageError, train_clip

    try:
        cfg = build_config(args)
        result = train_clip(cfg, resume=args.resume)
    except (FileNotFoundError, FileExistsError, ValueError, SplitLeakageError) as exc:
        log.error("%s", exc)
        return 1
    head = result.metrics["final"].get("headline", {})
    print(f"model: {result.checkpoint_dir}")
    print(f"optimiser steps: {result.metrics['optimizer_steps']}")
    print(json.dumps(head, indent=2))
    return 0
