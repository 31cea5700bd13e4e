"""Benchmark: contrastive training on the synthetic archive, judged by held-out retrieval.

Generates a seeded synthetic archive, ingests it, trains the CLIP model with Ray Train (2 workers),
and scores the test split (never seen in training) against two baselines run in this process: the
untrained model (same architecture and seed) and chance. Then measures training throughput
(samples/s per worker) at 1 and 2 workers on the same data.

    python bench/train_retrieval.py --quick      # minutes: a few hundred studies
    python bench/train_retrieval.py              # a few thousand studies, reduced volume size, < 1 h

Writes bench/results/train_retrieval.json and prints a table.
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

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results" / "train_retrieval.json"
MODES = {
    # studies, synth size, epochs, throughput-probe studies, (train, validation, test) patient shares.
    # Full: a fifth of the patients held out so that the test split reaches the protocol's N=500.
    "quick": dict(n=360, size="small", epochs=10, probe_studies=64, shares=(0.8, 0.1, 0.1)),
    "full": dict(n=3000, size="small", epochs=8, probe_studies=256, shares=(0.7, 0.1, 0.2)),
}


def build_catalog(work: Path, n: int, size: str, seed: int, shares: tuple) -> Path:
    from voxsearch.ingest import IngestConfig, SynthConfig, generate_archive, run_ingest

    archive = generate_archive(SynthConfig(n=n, seed=seed, out=work / "archive", size=size, dicom_share=0.1,
                                           split_shares=tuple(shares)))
    catalog = work / "catalog"
    summary = run_ingest(IngestConfig(archive=archive, out=catalog))
    logging.info("ingest: %s", summary)
    return catalog


def untrained_baseline(cfg, catalog: Path) -> dict:
    """The same architecture and seed, no training: what the towers give before alignment."""
    import torch

    from voxsearch.encoders import ClipModel
    from voxsearch.training.evaluate import evaluate_retrieval, headline

    torch.manual_seed(cfg.seed)
    model = ClipModel(cfg.model).eval()
    result = evaluate_retrieval(model, catalog, "test", cfg.preprocess, cfg.eval_ns,
                                workers=cfg.preprocess_workers)
    return headline(result)


def throughput(catalog: Path, work: Path, workers: int, studies: int, seed: int) -> float:
    from voxsearch.training import preset, train_clip

    cfg = preset("quick", catalog, work / f"probe_w{workers}-{os.getpid()}", workers=workers, epochs=1,
                 max_train_studies=studies, eval_ns=(16,), seed=seed)
    result = train_clip(cfg)
    epochs = [h for h in result.metrics["history"] if h["kind"] == "epoch"]
    return float(epochs[-1]["samples_per_s_per_worker"])


def ratio(a, b):
    return a / b if b else float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few hundred studies, minutes")
    parser.add_argument("--n", type=int, help="override the number of synthetic studies")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="keep archive/catalog/runs here (default: a temp dir)")
    parser.add_argument("--catalog", type=Path, help="reuse this ingested synthetic catalog (skips synth+ingest)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    mode = "quick" if args.quick else "full"
    spec = dict(MODES[mode])
    spec["n"] = args.n or spec["n"]
    spec["epochs"] = args.epochs or spec["epochs"]

    from voxsearch.runtime import init_ray
    from voxsearch.training import preset, train_clip

    init_ray()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="voxsearch-bench-train-")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    catalog = args.catalog or build_catalog(work, spec["n"], spec["size"], args.seed, spec["shares"])
    t_ingest = time.perf_counter() - t0

    cfg = preset("quick", catalog, work / f"run-{os.getpid()}", workers=2, epochs=spec["epochs"], seed=args.seed,
                 eval_ns=(100, 500))
    baseline = untrained_baseline(cfg, catalog)
    t0 = time.perf_counter()
    trained = train_clip(cfg)
    t_train = time.perf_counter() - t0
    final = trained.metrics["final"]["headline"]

    sps = {w: throughput(catalog, work, w, spec["probe_studies"], args.seed) for w in (1, 2)}

    result = {
        "mode": mode,
        "studies": None if args.catalog else spec["n"],
        "train_studies": trained.metrics["train_studies"],
        "test_pairs_N": final.get("eval_n"),
        "epochs": spec["epochs"],
        "split_shares": list(spec["shares"]),
        "optimizer_steps": trained.metrics["optimizer_steps"],
        "preset": "quick",
        "image_size": list(cfg.preprocess.spatial_size),
        "vision_variant": cfg.model.vision_variant,
        "trained": final,
        "untrained_baseline": baseline,
        "ratios": {
            "t2i_R@1_vs_chance": ratio(final["t2i_R@1"], final["chance_R@1"]),
            "t2i_R@10_vs_chance": ratio(final["t2i_R@10"], final["chance_R@10"]),
            "P@10_vs_chance": ratio(final.get("P@10", 0.0), final.get("chance_P@10", 0.0)),
            "t2i_R@10_vs_untrained": ratio(final["t2i_R@10"], baseline["t2i_R@10"]),
            "samples_per_s_per_worker_2w_vs_1w": ratio(sps[2], sps[1]),
        },
        "samples_per_s_per_worker": {"1": sps[1], "2": sps[2]},
        "seconds": {"synth_and_ingest": t_ingest, "train_and_eval": t_train},
        "integrity": trained.metrics["final"]["integrity"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    os.replace(tmp_out, args.out)

    rows = [
        ("text->image R@1", final["t2i_R@1"], baseline["t2i_R@1"], final["chance_R@1"]),
        ("text->image R@10", final["t2i_R@10"], baseline["t2i_R@10"], final["chance_R@10"]),
        ("image->text R@1", final["i2t_R@1"], baseline["i2t_R@1"], final["chance_R@1"]),
        ("image->text R@10", final["i2t_R@10"], baseline["i2t_R@10"], final["chance_R@10"]),
        ("finding P@10", final.get("P@10", float("nan")), baseline.get("P@10", float("nan")),
         final.get("chance_P@10", float("nan"))),
    ]
    print(f"\ntrain_retrieval ({mode}): {result['train_studies']} train studies, test N={result['test_pairs_N']}, "
          f"{result['optimizer_steps']} steps, image {tuple(cfg.preprocess.spatial_size)}, "
          f"DCFormer {cfg.model.vision_variant}")
    print(f"{'metric':<18} {'trained':>8} {'untrained':>10} {'chance':>8} {'x chance':>9}")
    for name, t, u, c in rows:
        print(f"{name:<18} {t:8.3f} {u:10.3f} {c:8.3f} {ratio(t, c):9.1f}")
    print(f"samples/s per worker: 1 worker {sps[1]:.2f}, 2 workers {sps[2]:.2f} "
          f"(ratio {result['ratios']['samples_per_s_per_worker_2w_vs_1w']:.2f})")
    print(f"seconds: synth+ingest {t_ingest:.0f}, train+eval {t_train:.0f}; JSON: {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
