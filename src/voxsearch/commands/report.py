"""`voxsearch report SCAN`: draft a report for one scan; plus `train report` and `eval report|vqa` stages."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_ENV = "VOXSEARCH_REPORT_MODEL"


def default_model_dir() -> Path | str:
    """$VOXSEARCH_REPORT_MODEL (a folder, or an s3:// or gs:// URI kept as given), else the model
    `voxsearch train report` writes by default."""
    if os.environ.get(MODEL_ENV):
        from voxsearch.common.storage import is_uri

        value = os.environ[MODEL_ENV]
        return value if is_uri(value) else Path(value)
    from voxsearch.common.cache import cache_root

    return cache_root() / "models" / "report"


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="draft a radiology report for one scan (report model; no download)",
        description="Generates a report for SCAN (NIfTI file, .npy, or a folder/zip holding one DICOM series) "
                    "with a trained report model, printing the text as it is decoded (greedy).\n"
                    "example: voxsearch report scan.nii.gz --model runs/report-stage2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scan", type=Path)
    p.add_argument("--model", help=f"report model directory or s3:// / gs:// URI (default: ${MODEL_ENV} or "
                                   "~/.cache/voxsearch/models/report)")
    p.add_argument("--prompt", help="question or instruction instead of the default report prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--modality", choices=["CT", "MR"], help="override the detected modality")
    p.set_defaults(func=run_report)


def _load_model(path: str | Path | None):
    """The report model at `path` (a folder or an s3:// / gs:// URI, fetched once per machine into the
    checkpoint cache), else at the default."""
    from voxsearch.common.storage import is_uri
    from voxsearch.reports.model import load_report_model

    path = path or default_model_dir()
    if is_uri(path):
        return load_report_model(path)  # errors name the URI
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no report model at {path}; train one with `voxsearch train report --stage 1 ...` then "
            f"`--stage 2`, and pass --model DIR or set {MODEL_ENV}")
    return load_report_model(path)


def run_report(args) -> int:
    import torch

    from voxsearch.ingest import IngestError, PreprocessConfig, preprocess_path

    try:
        model = _load_model(args.model)
        volume = preprocess_path(args.scan, PreprocessConfig.from_dict(model.preprocess), modality=args.modality)
    except (OSError, ValueError, IngestError) as exc:
        log.error("%s", exc)
        return 1
    image = torch.from_numpy(volume)[None]
    for piece in model.generate_stream(image, args.prompt, max_new_tokens=args.max_new_tokens):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# ---- train report -------------------------------------------------------------------------------

def register_train(stages) -> None:
    p = stages.add_parser(
        "report", help="train the report model (stage 1: projector; stage 2: LM + projector) on Ray Train",
        description="Stage 1 trains the MLP-Mixer projector and the new image-token embeddings with the vision "
                    "tower and LM frozen; stage 2 fine-tunes the LM (full or --lora) and the projector on report "
                    "writing and VQA generated from the catalog's ground-truth findings (and M3D-VQA CSVs).",
        epilog="example (CPU, embedded SmolLM2-135M; the vision tower, its input size and preprocessing come "
               "from the CLIP checkpoint):\n"
               "  voxsearch train report --stage 1 --catalog catalog --out runs/report1 --vision-init runs/clip/model\n"
               "  voxsearch train report --stage 2 --catalog catalog --init runs/report1 --out runs/report2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=[1, 2], required=True)
    p.add_argument("--catalog", required=True, help="catalog folder or s3:// / gs:// URI")
    p.add_argument("--out", type=Path, help="model directory to write (default: the `voxsearch report` default)")
    p.add_argument("--init", type=Path, help="stage 2: the stage-1 model directory")
    p.add_argument("--lm", type=Path, help="stage 1: local Hugging Face causal LM directory (default: SmolLM2)")
    p.add_argument("--vision-init", type=Path, help="stage 1: CLIP checkpoint dir or Med3DVLM DCFormer file")
    p.add_argument("--vision-variant", default=None, help="stage 1 without --vision-init (default small)")
    p.add_argument("--image-size", type=int, nargs=3, metavar=("D", "H", "W"),
                   help="stage 1: model input size (default: a CLIP --vision-init's, else 128 256 256)")
    p.add_argument("--visual-tokens", type=int, nargs=2, metavar=("LOW", "HIGH"),
                   help="stage 1: visual tokens per stream (default 128 128, as published)")
    p.add_argument("--tasks", nargs="+", choices=["report", "vqa"], default=["report", "vqa"])
    p.add_argument("--m3d-vqa-csv", type=Path)
    p.add_argument("--m3d-image-root", type=Path)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, help="projector learning rate")
    p.add_argument("--lm-lr", type=float, default=5e-5)
    p.add_argument("--lora", type=int, metavar="RANK", help="stage 2: LoRA adapters of this rank (needs peft)")
    p.add_argument("--train-vision", action="store_true", help="stage 2: also fine-tune the vision tower")
    p.add_argument("--placeholder-offset", type=int, choices=[0, 1], default=0,
                   help="1 reproduces the published off-by-one scatter (for its merged weights)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--max-train-studies", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray-address")
    p.set_defaults(func=run_train)


def build_train_config(args):
    import dataclasses

    from voxsearch.reports.model import LoraSettings, ReportModelConfig
    from voxsearch.reports.train import ReportTrainConfig

    model = ReportModelConfig(lm=str(args.lm) if args.lm else None, placeholder_offset=args.placeholder_offset)
    if args.vision_variant:
        model = dataclasses.replace(model, vision_variant=args.vision_variant)
    if args.image_size:
        _check_vision_init_size(args.vision_init, tuple(args.image_size))
        model = dataclasses.replace(model, image_size=tuple(args.image_size))
    if args.visual_tokens:
        low, high = args.visual_tokens
        model = dataclasses.replace(model, low_tokens=(max(low, high) * 3 // 2, low), high_tokens=(high, high))
    out = args.out or default_model_dir()
    from voxsearch.common.storage import is_uri, location

    if is_uri(out):  # the default may come from $VOXSEARCH_REPORT_MODEL
        raise ValueError(f"report training writes its model to a local or shared folder, not {location(out)}; "
                         "upload the folder afterwards")
    return ReportTrainConfig(
        catalog=args.catalog, out=out, stage=args.stage, init=args.init, model=model,
        vision_init=args.vision_init, tasks=tuple(args.tasks), m3d_vqa_csv=args.m3d_vqa_csv,
        m3d_image_root=args.m3d_image_root, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        lm_lr=args.lm_lr, lora=LoraSettings(r=args.lora, alpha=2 * args.lora) if args.lora else None,
        train_vision=args.train_vision, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        max_train_studies=args.max_train_studies, seed=args.seed, ray_address=args.ray_address)


def _check_vision_init_size(vision_init: Path | None, size: tuple[int, ...]) -> None:
    """A CLIP --vision-init brings the size its tower was trained at: another --image-size is refused."""
    if not vision_init or not vision_init.is_dir():
        return
    from voxsearch.encoders import open_checkpoint

    trained = open_checkpoint(vision_init).image_size
    if size != trained:
        raise ValueError(f"--image-size {size} differs from {trained}, the size the --vision-init {vision_init} "
                         "tower was trained at; leave --image-size out to use it")


def run_train(args) -> int:
    from voxsearch.training.integrity import SplitLeakageError
    from voxsearch.reports.train import train_report

    try:
        result = train_report(build_train_config(args))
    except (FileNotFoundError, ValueError, SplitLeakageError, RuntimeError) as exc:
        log.error("%s", exc)
        return 1
    print(f"model: {result.model_dir}")
    print(json.dumps({k: v for k, v in result.metrics.items() if k != "split_integrity"}, indent=2))
    return 0


# ---- eval report / eval vqa ---------------------------------------------------------------------

def register_eval(stages) -> None:
    p = stages.add_parser(
        "report", help="report generation: BLEU, ROUGE, METEOR, finding F1 vs the nearest-training-report baseline",
        description="Generates reports (greedy) for a held-out split and scores them; also scores the baseline "
                    "that copies the report of the nearest training scan. Refuses splits that share scans or "
                    "patients.\nexample: voxsearch eval report --model runs/report2 --catalog catalog --json r.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_eval(p)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--examples", type=int, default=0, help="include N (reference, generated, baseline) triples")
    p.set_defaults(func=run_eval_report)

    d = stages.add_parser(
        "drafts", help="the search server's retrieval drafts (no report model): finding F1 vs the nearest report",
        description="Drafts a report for each held-out study as the search server does without a report model "
                    "(findings called by the CLIP checkpoint's finding head, then sentences from the reports of "
                    "the nearest training studies that state them), and scores it per finding and as text "
                    "beside: the detected findings alone, the draft without detection, and the nearest training "
                    "report. Refuses splits that share scans or patients.\n"
                    "example: voxsearch eval drafts --catalog catalog --checkpoint runs/clip/model --json d.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--checkpoint", help="CLIP checkpoint directory or s3:// / gs:// URI (default: the packaged model)")
    d.add_argument("--catalog", help="catalog folder or s3:// / gs:// URI")
    d.add_argument("--split", default="test")
    d.add_argument("--limit", type=int, help="first N studies of the split")
    d.add_argument("--neighbours", type=int, default=5, help="training studies a draft is composed from")
    d.add_argument("--workers", type=int, default=2, help="Ray Data preprocessing actors")
    d.add_argument("--allow-split-overlap", action="store_true")
    d.add_argument("--examples", type=int, default=0, help="include N studies' drafts in the JSON")
    d.add_argument("--json", type=Path, help="write the full result here")
    d.add_argument("--ray-address")
    d.set_defaults(func=run_eval_drafts)

    q = stages.add_parser(
        "vqa", help="VQA: closed accuracy per question type, open-answer text metrics",
        description="Questions come from the catalog's ground-truth findings (held-out split) or an M3D-VQA CSV.\n"
                    "example: voxsearch eval vqa --model runs/report2 --catalog catalog",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_eval(q)
    q.add_argument("--m3d-vqa-csv", type=Path, help="score these M3D-VQA questions instead of generated ones")
    q.add_argument("--m3d-image-root", type=Path)
    q.add_argument("--max-new-tokens", type=int, default=32)
    q.set_defaults(func=run_eval_vqa)


def _common_eval(p) -> None:
    p.add_argument("--model", help="report model directory or s3:// / gs:// URI (default: as `voxsearch report`)")
    p.add_argument("--catalog", help="catalog folder or s3:// / gs:// URI")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, help="first N studies of the split")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="Ray Data preprocessing actors")
    p.add_argument("--allow-split-overlap", action="store_true")
    p.add_argument("--json", type=Path, help="write the full result here")
    p.add_argument("--ray-address")


def _write_json(path: Path | None, result: dict) -> None:
    if not path:
        return
    from voxsearch.common.durable import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)


def format_report_result(r: dict) -> str:
    lines = [f"{r['split']}: {r['n']} studies ({r['n_abnormal']} abnormal), greedy decoding",
             f"{'':24}{'BLEU-1':>8}{'BLEU-4':>8}{'ROUGE-1':>8}{'ROUGE-L':>8}{'METEOR':>8}{'F1':>7}{'F1 abn':>8}"]
    for name, key in (("report model", "model"), ("nearest training report", "baseline_nearest_report")):
        t, f = r[key]["text"], r[key]["findings"]
        lines.append(f"{name:24}{t['bleu1']:8.3f}{t['bleu4']:8.3f}{t['rouge1']:8.3f}{t['rougeL']:8.3f}"
                     f"{t['meteor']:8.3f}{f['all']['f1']:7.3f}{f['abnormal']['f1']:8.3f}")
    v = r["f1_vs_baseline"]
    verdict = "beats" if v["all"]["model"] > v["all"]["baseline"] else "does NOT beat"
    lines.append(f"finding F1 {v['all']['model']:.3f} vs baseline {v['all']['baseline']:.3f} (abnormal only "
                 f"{v['abnormal']['model']:.3f} vs {v['abnormal']['baseline']:.3f}): the model {verdict} "
                 f"the nearest-training-report baseline")
    return "\n".join(lines)


def _evaluate(args, what: str, evaluate, format_result) -> int:
    """Run ``evaluate()`` (which loads and starts what it needs), print and save its result; 1 on bad input."""
    from voxsearch.training.integrity import SplitLeakageError

    if not args.catalog:
        log.error("eval %s needs --catalog", what)
        return 1
    try:
        result = evaluate()
    except (OSError, ValueError, SplitLeakageError) as exc:
        log.error("%s", exc)
        return 1
    print(format_result(result))
    _write_json(args.json, result)
    return 0


def run_eval_report(args) -> int:
    from voxsearch.common.runtime import RayConfig, init_ray
    from voxsearch.reports.evaluate import evaluate_reports

    def evaluate():
        model = _load_model(args.model)
        init_ray(RayConfig(address=args.ray_address))
        return evaluate_reports(model, args.catalog, split=args.split, limit=args.limit,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                workers=args.workers, allow_split_overlap=args.allow_split_overlap,
                                examples=args.examples)

    return _evaluate(args, "report", evaluate, format_report_result)


def format_drafts_result(r: dict) -> str:
    lines = [f"{r['split']}: {r['n']} studies ({r['n_abnormal']} abnormal), drafts from {r['neighbours']} of "
             f"{r['train_studies']} training studies",
             f"{'':28}{'F1':>7}{'F1 abn':>8}{'P':>7}{'R':>7}{'spec':>6}{'ROUGE-L':>8}  F1 - nearest report [95% CI]"]
    for method, s in r["methods"].items():
        f, boot = s["findings"], s["f1_vs_baseline"].get("all")
        spec = "-" if f["normal_specificity"] is None else f"{f['normal_specificity']:.2f}"
        gap = "" if method == r["baseline"] or not boot else \
            f"  {boot['f1_diff']:+.3f} [{boot['ci95'][0]:+.3f}, {boot['ci95'][1]:+.3f}]"
        lines.append(f"{method:28}{f['all']['f1']:7.3f}{f['abnormal']['f1']:8.3f}{f['all']['precision']:7.3f}"
                     f"{f['all']['recall']:7.3f}{spec:>6}{s['text']['rougeL']:8.3f}{gap}")
    return "\n".join(lines)


def run_eval_drafts(args) -> int:
    from voxsearch.common.runtime import RayConfig, init_ray
    from voxsearch.encoders import packaged_checkpoint
    from voxsearch.reports.evaluate import evaluate_drafts

    if args.neighbours < 1:
        log.error("--neighbours must be at least 1")
        return 1

    def evaluate():
        checkpoint = args.checkpoint or packaged_checkpoint()
        init_ray(RayConfig(address=args.ray_address))
        return evaluate_drafts(checkpoint, args.catalog, split=args.split, limit=args.limit,
                               neighbours=args.neighbours, workers=args.workers,
                               allow_split_overlap=args.allow_split_overlap, examples=args.examples)

    return _evaluate(args, "drafts", evaluate, format_drafts_result)


def run_eval_vqa(args) -> int:
    from voxsearch.common.runtime import RayConfig, init_ray
    from voxsearch.training.integrity import SplitLeakageError
    from voxsearch.reports.evaluate import evaluate_vqa

    if not args.catalog and not args.m3d_vqa_csv:
        log.error("eval vqa needs --catalog or --m3d-vqa-csv")
        return 1
    try:
        model = _load_model(args.model)
        if args.catalog:
            init_ray(RayConfig(address=args.ray_address))
        result = evaluate_vqa(model, args.catalog, split=args.split, m3d_csv=args.m3d_vqa_csv,
                              m3d_image_root=args.m3d_image_root, limit=args.limit,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, workers=args.workers,
                              allow_split_overlap=args.allow_split_overlap)
    except (OSError, ValueError, SplitLeakageError) as exc:
        log.error("%s", exc)
        return 1
    c = result["closed"]
    print(f"closed VQA accuracy {c['accuracy']:.3f} over {c['n']} questions")
    for qtype, s in c["per_type"].items():
        print(f"  {qtype:12} {s['accuracy']:.3f}  (n={s['n']})")
    for qtype, s in result["open"].items():
        print(f"open {qtype:12} BLEU-1 {s['bleu1']:.3f} ROUGE-L {s['rougeL']:.3f} METEOR {s['meteor']:.3f} "
              f"answer contained {s['answer_contained']:.3f} (n={s['n']})")
    _write_json(args.json, result)
    return 0
