"""Report generation on the synthetic archive: fine-tuned LM + projector vs the nearest-training-report baseline.

Builds (or reuses) a phantom archive and catalog, trains stage 1 (projector) and stage 2 (LM + projector)
on Ray Train at a reduced volume size, then scores finding-level F1 (all held-out studies and abnormal
ones alone) and text metrics for the model and for the baseline, in the same process. The search
server's drafter without a report model (detect findings with a CLIP finding head, then retrieve and
write from the nearest training reports) is scored beside them, with the CLIP the vision tower started
from and with the packaged checkpoint (--drafter-clip to choose others, --no-drafters to skip).

  python bench/report.py --quick    # tiny random LM, minutes: a smoke run of the whole pipeline
  # the measured run in the README (embedded SmolLM2-135M, about 25 minutes on 2 cores), the vision tower
  # from the packaged CLIP (--clip-first instead trains a quick-preset CLIP on the train split first):
  python bench/report.py --work runs/bench-report --n 360 --split-shares 0.7 0.1 0.2 \
      --vision-init src/voxsearch/encoders/pretrained/phantom-nano \
      --train-vision --tasks report --epochs2 5 --batch-size 4 --extra-test 300
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "report.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random LM and a small archive")
    p.add_argument("--catalog", type=Path, help="reuse this catalog instead of synthesising one")
    p.add_argument("--n", type=int, default=200, help="synthetic studies")
    p.add_argument("--synth-size", default="tiny", choices=["tiny", "small", "full"])
    p.add_argument("--image-size", type=int, nargs=3, default=(32, 64, 64))
    p.add_argument("--vision-variant", default="nano")
    p.add_argument("--vision-init", type=Path, help="CLIP checkpoint directory for the vision tower")
    p.add_argument("--clip-first", action="store_true",
                   help="train a quick-preset CLIP on the train split first and start the vision tower from it")
    p.add_argument("--split-shares", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                   help="patient shares of the synthesised archive")
    p.add_argument("--train-vision", action="store_true",
                   help="stage 2 also trains the vision tower (a frozen weak tower leaves the LM only the prior)")
    p.add_argument("--epochs1", type=int, default=1)
    p.add_argument("--epochs2", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tasks", nargs="+", default=["report", "vqa"], choices=["report", "vqa"])
    p.add_argument("--vqa-per-study", type=int, default=2)
    p.add_argument("--max-answer-tokens", type=int, default=96)
    p.add_argument("--max-train-studies", type=int)
    p.add_argument("--limit-test", type=int, help="score only the first N test studies")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (1 avoids a 0.5 GB all-reduce per step)")
    p.add_argument("--extra-test", type=int, default=0, metavar="N",
                   help="also score N more held-out studies from another seed (narrows the interval)")
    p.add_argument("--model", type=Path, help="score this trained report model; skip both training stages")
    p.add_argument("--drafter-clip", nargs="+", metavar="NAME=CHECKPOINT",
                   help="CLIP checkpoints for the retrieval drafter rows (default: the vision init and the packaged model)")
    p.add_argument("--no-drafters", action="store_true", help="score the report model and the baseline only")
    p.add_argument("--work", type=Path, help="keep the archive, catalog and models here")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def build_catalog(args, work: Path) -> Path:
    from voxsearch.ingest import IngestConfig, SynthConfig, generate_archive, run_ingest

    catalog = work / "catalog"
    if catalog.exists():
        return catalog
    archive = generate_archive(SynthConfig(n=args.n, seed=11, out=work / "archive", size=args.synth_size,
                                           dicom_share=0.0, split_shares=tuple(args.split_shares), overwrite=True))
    # The catalog is set-up, not what is measured: ingest in-process, sparing actor start-ups on small CPUs.
    summary = run_ingest(IngestConfig(archive=archive, out=catalog, salt="bench-report", engine="local"))
    logging.info("ingest: %s", summary)
    return catalog


def with_extra_test(args, work: Path, catalog: Path):
    """The catalog's train rows plus N studies of a second seed, all held out (other patients, other
    scans: the split check still runs on the union)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from voxsearch.ingest import IngestConfig, SynthConfig, generate_archive, read_catalog, run_ingest

    extra = work / f"extra_catalog_{args.extra_test}"
    if not extra.exists():
        archive = generate_archive(SynthConfig(n=args.extra_test, seed=12, out=work / "extra_archive",
                                               size=args.synth_size, dicom_share=0.0, split_shares=(0.0, 0.0, 1.0),
                                               overwrite=True))
        run_ingest(IngestConfig(archive=archive, out=extra, salt="bench-report", engine="local"))
    base, more = read_catalog(catalog), read_catalog(extra)
    more = more.filter(pc.equal(more["split"], "test")).select(base.column_names).cast(base.schema)
    return pa.concat_tables([base.filter(pc.equal(base["split"], "train")), more])


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.n, args.epochs1, args.epochs2 = min(args.n, 80), min(args.epochs1, 1), max(args.epochs2, 6)
    from voxsearch.reports.model import load_report_model
    from voxsearch.common.runtime import RayConfig, init_ray
    from voxsearch.reports.evaluate import evaluate_reports

    init_ray(RayConfig())
    work = args.work or Path(tempfile.mkdtemp(prefix="voxsearch-bench-report-"))
    work.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.perf_counter()
    catalog = args.catalog or build_catalog(args, work)
    timings["catalog_s"] = time.perf_counter() - t0
    if args.clip_first and not args.vision_init and not args.model:
        from voxsearch.training import preset, train_clip

        if tuple(args.image_size) != (32, 64, 64) or args.vision_variant != "nano":
            raise SystemExit("--clip-first trains the quick preset (DCFormer-nano at 32x64x64); "
                             "use --vision-init for other sizes")
        t0 = time.perf_counter()
        clip_model = work / "clip" / "model"  # a finished run in --work is reused
        args.vision_init = clip_model if clip_model.is_dir() else train_clip(
            preset("quick", catalog, work / "clip")).checkpoint_dir
        timings["clip_s"] = time.perf_counter() - t0

    lm = None
    if args.model:
        saved = json.loads((args.model / "config.json").read_text())
        model_dir, s1_metrics = args.model, {"skipped": "--model"}
        lm, s2_metrics = saved["config"].get("lm"), saved.get("extra", {}).get("training")
    else:
        if args.quick:
            from voxsearch.training.data import load_catalog

            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny LM
            from tiny_lm_testlib import build_tiny_lm

            reports = [r for r in load_catalog(catalog).column("report").to_pylist() if r]
            lm = str(build_tiny_lm(work / "tiny_lm", reports))
        model_dir, s1_metrics, s2_metrics = train(args, work, catalog, lm, timings)

    model = load_report_model(model_dir)
    held_out = {"catalog test split": catalog}
    if args.extra_test:
        held_out[f"{args.extra_test} more studies (seed 12)"] = with_extra_test(args, work, catalog)
    drafters = drafter_checkpoints(args)
    results = {}
    for name, table in held_out.items():
        t0 = time.perf_counter()
        results[name] = evaluate_reports(model, table, split="test", limit=args.limit_test,
                                         max_new_tokens=args.max_answer_tokens, batch_size=8, workers=1, examples=3,
                                         drafters=drafters)
        timings[f"eval_s ({name})"] = time.perf_counter() - t0
        print_result(name, results[name])
    print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))

    payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "lm": lm or "SmolLM2-135M-Instruct (embedded GGUF, dequantised)",
               "stage1": s1_metrics, "stage2": s2_metrics, "timings_s": timings,
               "result": results["catalog test split"], "held_out": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2, default=str)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


def drafter_checkpoints(args) -> dict[str, str]:
    """{row name: CLIP checkpoint} for the retrieval drafter rows."""
    if args.no_drafters:
        return {}
    if args.drafter_clip:
        pairs = [item.partition("=") for item in args.drafter_clip]
        if any(not sep or not name or not path for name, sep, path in pairs):
            raise SystemExit("--drafter-clip takes NAME=CHECKPOINT items")
        return {name: path for name, _, path in pairs}
    from voxsearch.encoders import packaged_checkpoint

    packaged = Path(packaged_checkpoint()).resolve()
    out = {"vision init": str(args.vision_init)} if args.vision_init and Path(args.vision_init).resolve() != packaged else {}
    out["packaged model"] = str(packaged)
    return out


def train(args, work: Path, catalog: Path, lm: str | None, timings: dict):
    from voxsearch.reports.model import ReportModelConfig
    from voxsearch.reports.train import ReportTrainConfig, train_report

    model_cfg = ReportModelConfig(vision_variant=args.vision_variant, image_size=tuple(args.image_size), lm=lm,
                                  low_tokens=(12, 8), high_tokens=(8, 8), max_answer_tokens=args.max_answer_tokens)
    common = dict(catalog=catalog, batch_size=args.batch_size, workers=args.workers,
                  max_train_studies=args.max_train_studies, threads_per_worker=max(1, (os.cpu_count() or 2)
                                                                                   // args.workers))
    t0 = time.perf_counter()
    if args.epochs1 > 0:
        s1 = train_report(ReportTrainConfig(out=work / "stage1", stage=1, model=model_cfg,
                                            vision_init=args.vision_init, epochs=args.epochs1, tasks=("report",),
                                            **common))
        init, s1_metrics = s1.model_dir, s1.metrics
    else:
        # Stage 2 straight from a fresh projector (it trains in stage 2 as well): saves a pass on slow CPUs.
        from voxsearch.reports.model import build_report_model, save_report_model
        from voxsearch.ingest import PreprocessConfig

        fresh = build_report_model(model_cfg, preprocess=PreprocessConfig(spatial_size=tuple(args.image_size)).to_dict())
        init, s1_metrics = save_report_model(fresh, work / "init"), {"skipped": True}
    timings["stage1_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    s2 = train_report(ReportTrainConfig(out=work / "stage2", stage=2, init=init, epochs=args.epochs2,
                                        tasks=tuple(args.tasks), vqa_per_study=args.vqa_per_study,
                                        train_vision=args.train_vision,
                                        lm_lr=1e-4 if lm is None else 2e-3, lr=1e-3, **common))
    timings["stage2_s"] = time.perf_counter() - t0
    return s2.model_dir, s1_metrics, s2.metrics


def print_result(name: str, result: dict) -> None:
    print(f"\nheld out: {name}: {result['n']} studies ({result['n_abnormal']} abnormal); train studies: "
          f"{result['train_studies']}; split integrity clean: {result['integrity']['clean']}")
    print(f"{'':46}{'F1 all':>8}{'F1 abn':>8}{'P all':>7}{'R all':>7}{'spec':>6}"
          f"{'BLEU-1':>8}{'BLEU-4':>8}{'ROUGE-L':>8}{'METEOR':>8}")
    rows = [("report model", result["model"]), ("nearest training report", result["baseline_nearest_report"])]
    for drafter, d in (result.get("drafters") or {}).items():
        rows += [(f"{method} ({drafter})", s) for method, s in d["methods"].items()]
    for label, s in rows:
        f, t = s["findings"], s["text"]
        spec = "-" if f["normal_specificity"] is None else f"{f['normal_specificity']:.2f}"
        print(f"{label[:46]:46}{f['all']['f1']:8.3f}{f['abnormal']['f1']:8.3f}{f['all']['precision']:7.3f}"
              f"{f['all']['recall']:7.3f}{spec:>6}{t['bleu1']:8.3f}{t['bleu4']:8.3f}{t['rougeL']:8.3f}{t['meteor']:8.3f}")
    print("F1 difference against the nearest training report, 95% bootstrap CI (all / abnormal studies):")
    compared = [("report model", {g: r.get("bootstrap") for g, r in result["f1_vs_baseline"].items()})]
    compared += [(label, s["f1_vs_baseline"]) for label, s in rows[2:]]
    for label, boots in compared:
        cells = [f"{b['f1_diff']:+.3f} [{b['ci95'][0]:+.3f}, {b['ci95'][1]:+.3f}]" if b else "n/a"
                 for b in (boots.get("all"), boots.get("abnormal"))]
        print(f"  {label[:46]:46} {cells[0]:>26} {cells[1]:>26}")


if __name__ == "__main__":
    sys.exit(main())
