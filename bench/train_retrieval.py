"""Benchmark: contrastive training on the synthetic archive, judged by held-out retrieval.

Generates a seeded synthetic archive, ingests it, trains the CLIP model with Ray Train (quick preset),
and scores the test split (patients never seen in training) beside baselines computed in this process:
chance, the untrained model (same architecture and seed), and an oracle ladder of retrievers that know
only the body part; + normal/abnormal; + which organ carries a finding; + the finding set, each ranking
at random inside what it knows. Also: collapse (mean cosine between image embeddings of different
studies of one body part), similar-case search by scan (does the nearest other study show the same
findings?), the rescan probe (bench/rescan.py), one run per --runs pair of loss weights (finding:view,
0 = that loss off), and training throughput
(samples/s per worker) at 1 and 2 workers.

    python bench/train_retrieval.py --quick      # minutes: a few hundred studies
    python bench/train_retrieval.py              # 3,000 studies (N=500 held out), ~30 min of training per weight

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

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results" / "train_retrieval.json"
# (finding loss weight, view loss weight) per run; the first is the headline.
DEFAULT_RUNS = [(10.0, 1.0), (10.0, 0.0), (0.0, 1.0)]
MODES = {
    # studies, synth size, epochs, throughput-probe studies, (train, validation, test) patient shares.
    # Full: a fifth of the patients held out so that the test split reaches the protocol's N=500.
    "quick": dict(n=360, size="small", epochs=10, probe_studies=64, shares=(0.8, 0.1, 0.1)),
    "full": dict(n=3000, size="small", epochs=40, probe_studies=256, shares=(0.7, 0.1, 0.2)),
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

    cfg = preset("quick", catalog, work / f"probe_w{workers}-{os.getpid()}", workers=workers,
                 cpus_per_worker=2.0 / workers, epochs=1, max_train_studies=studies, eval_ns=(16,), seed=seed)
    result = train_clip(cfg)
    epochs = [h for h in result.metrics["history"] if h["kind"] == "epoch"]
    return float(epochs[-1]["samples_per_s_per_worker"])


def ratio(a, b):
    return a / b if b else float("inf")


def _key(row: dict, level: str):
    from voxsearch.ingest.catalog import parse_findings

    found = parse_findings(row["findings"])
    body = row["body_part"]
    if level == "body":
        return body
    if level == "abnormal":
        return body, bool(found)
    if level == "organ":
        return body, tuple(sorted({f["organ"] for f in found}))
    return body, tuple(sorted({(f["type"], f["organ"]) for f in found}))


ORGAN_BODY = {"brain": "head", "lung": "chest", "liver": "abdomen", "spleen": "abdomen", "kidney": "abdomen"}
LADDER = (("body part", "body"), ("+ abnormal", "abnormal"), ("+ organ", "organ"), ("+ finding set", "set"))


def oracle_ladder(rows: list[dict], k: int = 10) -> dict:
    """Expected t2i R@1/R@10 and finding P@10 of retrievers that know one key and rank at random inside it."""
    from voxsearch.ingest.catalog import parse_findings
    from voxsearch.training.metrics import finding_queries

    findings = [parse_findings(r["findings"]) for r in rows]
    queries = finding_queries(findings)
    n = len(rows)
    out = {}
    for name, level in LADDER:
        keys = [_key(r, level) for r in rows]
        sizes = {key: keys.count(key) for key in set(keys)}
        r1 = float(np.mean([1.0 / sizes[key] for key in keys]))
        r10 = float(np.mean([min(10, sizes[key]) / sizes[key] for key in keys]))
        precisions = []
        for q in queries:
            relevant = np.array([any(q.matches(f) for f in study) for study in findings])

            def wanted(row, study):
                body_ok = row["body_part"] == ORGAN_BODY.get(q.organ, row["body_part"])
                if level == "body":
                    return body_ok
                if level == "abnormal":
                    return body_ok and bool(study)
                if level == "organ":
                    return body_ok and any(f["organ"] == q.organ for f in study)
                return any(q.matches(f) for f in study)

            group = np.array([wanted(r, f) for r, f in zip(rows, findings)])
            g = int(group.sum())
            rel_in, rel_out = int((relevant & group).sum()), int((relevant & ~group).sum())
            if g >= k:
                precisions.append(rel_in / g)
            else:
                precisions.append((rel_in + (k - g) * rel_out / max(1, n - g)) / k)
        out[name] = {"t2i_R@1": r1, "t2i_R@10": r10, f"P@{k}": float(np.mean(precisions))}
    return out


def embedding_stats(model_dir: Path, catalog: Path, rows: list[dict], workers: int) -> dict:
    """Collapse and similar-case search on the test split's image embeddings."""
    from voxsearch.training.data import preprocessed_dataset
    from voxsearch.training.evaluate import _model_and_preprocess, embed_pairs
    from voxsearch.ingest.catalog import parse_findings
    import pyarrow as pa

    model, pp = _model_and_preprocess(model_dir, None)
    ds = preprocessed_dataset(pa.Table.from_pylist(rows), pp.to_dict(), workers=workers, label="test")
    emb = embed_pairs(model, ds.iter_batches(batch_size=16, batch_format="numpy"))
    by_id = {r["series_id"]: r for r in rows}
    body = np.array([by_id[s]["body_part"] for s in emb["series_id"]])
    sets = [frozenset((f["type"], f["organ"]) for f in parse_findings(by_id[s]["findings"])) for s in emb["series_id"]]
    img = emb["img"].astype(np.float64)
    sims = img @ img.T
    off = ~np.eye(len(img), dtype=bool)
    same_body = (body[:, None] == body[None, :]) & off
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.argmax(axis=1)
    same_first = np.array([sets[i] == sets[j] for i, j in enumerate(nearest)])
    abnormal = np.array([bool(x) for x in sets])
    # What a retriever that knows only the body part would get: the chance that a random other study of
    # the same body part has the same finding set.
    base = np.array([np.mean([sets[j] == sets[i] for j in np.flatnonzero(same_body[i])]) for i in range(len(sets))])
    return {"mean_cos_same_body": float((img @ img.T)[same_body].mean()),
            "mean_cos_other_body": float((img @ img.T)[(~same_body) & off].mean()),
            "scan_search_same_findings_first": float(same_first.mean()),
            "scan_search_same_findings_first_abnormal": float(same_first[abnormal].mean()),
            "body_part_oracle_same_findings_first": float(base.mean()),
            "body_part_oracle_same_findings_first_abnormal": float(base[abnormal].mean())}


def parse_run(text: str) -> tuple[float, float]:
    """'F:V' -> (finding loss weight, view loss weight)."""
    try:
        finding, view = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a run is FINDING_WEIGHT:VIEW_WEIGHT, e.g. 10:1; got {text!r}") from None
    return finding, view


def run_name(weights: tuple[float, float]) -> str:
    return f"finding {weights[0]:g}, view {weights[1]:g}"


def train_one(catalog: Path, work: Path, weights: tuple[float, float], spec: dict, seed: int,
              reuse: Path | None) -> dict:
    from voxsearch.training import preset, train_clip

    out = reuse or work / f"run-f{weights[0]:g}-v{weights[1]:g}-{os.getpid()}"
    cfg = preset("quick", catalog, out, epochs=spec["epochs"], seed=seed, eval_ns=(100, 500),
                 finding_loss_weight=weights[0], view_loss_weight=weights[1],
                 eval_every=max(1, spec["epochs"] // 6))
    t0 = time.perf_counter()
    if reuse is not None:
        from voxsearch.training import evaluate_retrieval
        from voxsearch.training.evaluate import headline

        metrics = json.loads((reuse / "metrics.json").read_text())
        seconds = None
        # Scored as the checkpoint is now (it may have been calibrated after its run), on this catalog.
        final = headline(evaluate_retrieval(out / "model", catalog, "test", ns=(100, 500)))
    else:
        metrics = train_clip(cfg).metrics
        seconds = time.perf_counter() - t0
        final = metrics["final"]["headline"]
    epochs = [h for h in metrics["history"] if h["kind"] == "epoch"]
    return {"cfg": cfg, "model_dir": out / "model", "metrics": metrics, "final": final,
            "train_seconds": seconds, "samples_per_s": epochs[-1]["samples_per_s_per_worker"] if epochs else None,
            "steps": metrics["optimizer_steps"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few hundred studies, minutes")
    parser.add_argument("--n", type=int, help="override the number of synthetic studies")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=parse_run, nargs="+", default=DEFAULT_RUNS, metavar="F:V",
                        help="one training run per pair of loss weights, finding:view (0: that loss off); "
                             "the first is the headline (default: %(default)s)")
    parser.add_argument("--reuse-runs", nargs="*", default=[],
                        help="finished `voxsearch train clip` run folders to score instead of training, one per "
                             "--runs entry in order; '-' trains that one")
    parser.add_argument("--rescan-patients", type=int, default=32, help="patients of the rescan probe per run")
    parser.add_argument("--no-throughput", action="store_true", help="skip the 1- vs 2-worker throughput probe")
    parser.add_argument("--work", type=Path, help="keep archive/catalog/runs here (default: a temp dir)")
    parser.add_argument("--catalog", type=Path, help="reuse this ingested synthetic catalog (skips synth+ingest)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    mode = "quick" if args.quick else "full"
    spec = dict(MODES[mode])
    spec["n"] = args.n or spec["n"]
    spec["epochs"] = args.epochs or spec["epochs"]

    from voxsearch.common.runtime import init_ray
    from voxsearch.training.data import load_catalog, split_rows

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
    test_rows = split_rows(load_catalog(catalog), "test", limit=500).to_pylist()

    import rescan

    runs = {}
    for i, weights in enumerate(args.runs):
        reuse = Path(args.reuse_runs[i]) if i < len(args.reuse_runs) and args.reuse_runs[i] != "-" else None
        run = train_one(catalog, work, weights, spec, args.seed, reuse)
        run["stats"] = embedding_stats(run["model_dir"], catalog, test_rows, 2)
        probe = rescan.measure(run["model_dir"], patients=args.rescan_patients)
        run["stats"]["rescan_top1_same_patient"] = probe["top1_same_patient"]["model"]
        run["stats"]["rescan_raw_voxels"] = probe["top1_same_patient"]["raw_voxels"]
        runs[weights] = run
    head = runs[args.runs[0]]
    cfg, final = head["cfg"], head["final"]
    baseline = untrained_baseline(cfg, catalog)
    ladder = oracle_ladder(test_rows)
    sps = {} if args.no_throughput else {w: throughput(catalog, work, w, spec["probe_studies"], args.seed) for w in (1, 2)}

    result = {
        "mode": mode,
        "studies": None if args.catalog else spec["n"],
        "train_studies": head["metrics"]["train_studies"],
        "test_pairs_N": final.get("eval_n"),
        "split_shares": list(spec["shares"]),
        "preset": "quick",
        "image_size": list(cfg.preprocess.spatial_size),
        "vision_variant": cfg.model.vision_variant,
        "input_filter": cfg.model.input_filter,
        "runs": {run_name(w): {"finding_loss_weight": w[0], "view_loss_weight": w[1], "optimizer_steps": r["steps"],
                               "train_seconds": r["train_seconds"], "samples_per_s_per_worker": r["samples_per_s"],
                               "trained": r["final"], **r["stats"]}
                 for w, r in runs.items()},
        "trained": final,
        "untrained_baseline": baseline,
        "oracles": ladder,
        "ratios": {
            "t2i_R@10_vs_chance": ratio(final["t2i_R@10"], final["chance_R@10"]),
            "P@10_vs_chance": ratio(final.get("P@10", 0.0), final.get("chance_P@10", 0.0)),
            "P@10_vs_body_abnormal_oracle": ratio(final.get("P@10", 0.0), ladder["+ abnormal"]["P@10"]),
            "t2i_R@10_vs_untrained": ratio(final["t2i_R@10"], baseline["t2i_R@10"]),
            **({"samples_per_s_per_worker_2w_vs_1w": ratio(sps[2], sps[1])} if sps else {}),
        },
        "samples_per_s_per_worker": {str(k): v for k, v in sps.items()},
        "seconds": {"synth_and_ingest": t_ingest},
        "integrity": head["metrics"]["final"]["integrity"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    os.replace(tmp_out, args.out)

    print(f"\ntrain_retrieval ({mode}): {result['train_studies']} train studies, test N={result['test_pairs_N']}, "
          f"image {tuple(cfg.preprocess.spatial_size)}, DCFormer {cfg.model.vision_variant}, quick preset")
    print(f"{'retriever':<34} {'t2i R@1':>8} {'t2i R@10':>9} {'P@10':>7}")
    print(f"{'chance':<34} {final['chance_R@1']:8.3f} {final['chance_R@10']:9.3f} {final.get('chance_P@10', float('nan')):7.3f}")
    for name, o in ladder.items():
        print(f"{'oracle: ' + name:<34} {o['t2i_R@1']:8.3f} {o['t2i_R@10']:9.3f} {o['P@10']:7.3f}")
    print(f"{'untrained model':<34} {baseline['t2i_R@1']:8.3f} {baseline['t2i_R@10']:9.3f} {baseline.get('P@10', float('nan')):7.3f}")
    for w, r in runs.items():
        f = r["final"]
        label = f"model, {run_name(w)}"
        print(f"{label:<34} {f['t2i_R@1']:8.3f} {f['t2i_R@10']:9.3f} {f.get('P@10', float('nan')):7.3f}"
              f"   (P@10 by text embedding alone {f.get('P@10_text_only', float('nan')):.3f}; {r['steps']} steps)")
    print(f"\n{'embedding (runs: finding:view)':<34} " + " ".join(f"{format(w[0], 'g') + ':' + format(w[1], 'g'):>9}"
                                                           for w in runs))
    for key, label in (("mean_cos_same_body", "mean cos, same body part"), ("mean_cos_other_body", "mean cos, other body part"),
                       ("scan_search_same_findings_first", "scan search: same findings first"),
                       ("scan_search_same_findings_first_abnormal", "  ... abnormal queries"),
                       ("rescan_top1_same_patient", "rescan: same patient first"),
                       ("rescan_raw_voxels", "  raw-voxel baseline")):
        print(f"{label:<34} " + " ".join(f"{r['stats'][key]:9.3f}" for r in runs.values()))
    any_stats = next(iter(runs.values()))["stats"]
    print(f"{'  body-part oracle, all / abnormal':<34} {any_stats['body_part_oracle_same_findings_first']:9.3f} "
          f"{any_stats['body_part_oracle_same_findings_first_abnormal']:9.3f}")
    if sps:
        print(f"samples/s per worker: 1 worker {sps[1]:.2f}, 2 workers {sps[2]:.2f} "
              f"(ratio {result['ratios']['samples_per_s_per_worker_2w_vs_1w']:.2f})")
    print(f"JSON: {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
