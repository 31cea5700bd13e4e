"""Bulk embedding throughput: the Ray Data pipeline vs a plain single-process loop over the same files.

    python bench/embed.py --quick     # 1x64x128x128 inputs, 8 series (a few minutes on 2 cores)
    python bench/embed.py             # 1x128x256x256 inputs (Med3DVLM size), 16 series, DCFormer-nano and -small

Both modes embed the same catalog (a synthetic archive at full in-plane size, ingested first) with a
random-weight CLIP of each variant (throughput does not depend on the weights), images and report text,
and are timed end to end from "model on disk" to "shards on disk" (model loading included; Ray already
running with warm worker processes, as a deployed cluster is: one untimed series goes first; Ray workers
at the loop's priority). The loop uses every core for torch; the pipeline splits the node into
read tasks and model actors as `voxsearch embed` does by default. Per stage: summed busy seconds
(read, preprocess, model, write), and for the pipeline the model actors' busy fraction (near 1: the
CPU stages keep the model fed). Also checks that both modes give the same vectors.
Pipeline modes: "pipeline" is `voxsearch embed`'s default (on fewer than 4 CPUs the model actor reads
and preprocesses its own rows with every core), "2-stage" forces read tasks apart from the model actors
(the layout for larger nodes and GPUs). Target (issue 18): the default >= 0.9x the loop on 2 CPUs.
Results go to bench/results/embed.json under "quick" or "full".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

RESULTS = Path(__file__).resolve().parent / "results" / "embed.json"
EMBED_DIM = 768


def make_catalog(work: Path, n: int, size: str) -> Path:
    from voxsearch.ingest import IngestConfig, SynthConfig, generate_archive, run_ingest

    archive = generate_archive(SynthConfig(n=n, seed=7, out=work / "archive", size=size, dicom_share=0.25))
    summary = run_ingest(IngestConfig(archive=archive, out=work / "catalog", progress=False, check_preprocess=None))
    if summary.added != n:
        raise SystemExit(f"ingest added {summary.added} of {n} synthetic series: {summary.to_dict()}")
    return work / "catalog"


def make_checkpoint(directory: Path, variant: str, image_size: tuple) -> Path:
    import torch

    from voxsearch.encoders import ClipConfig, ClipModel, save_clip
    from voxsearch.ingest import PreprocessConfig

    torch.manual_seed(0)
    model = ClipModel(ClipConfig(vision_variant=variant, embed_dim=EMBED_DIM, image_size=image_size))
    return save_clip(model, directory, extra={"preprocess": PreprocessConfig(spatial_size=image_size).to_dict()})


def plain_loop(rows: list[dict], checkpoint: Path, out: Path) -> dict:
    """What one would write without Ray: one process, rows one after another, all cores to torch."""
    import torch

    from voxsearch.embed.runner import resolve_model
    from voxsearch.common.durable import atomic_write_parquet
    from voxsearch.encoders import load_clip
    from voxsearch.ingest import preprocess_volume, read_volume_row
    from voxsearch.ingest.preprocess import row_window

    torch.set_num_threads(os.cpu_count() or 1)
    stages = {"load_model": 0.0, "read": 0.0, "preprocess": 0.0, "model": 0.0, "write": 0.0}
    start = time.perf_counter()
    preprocess = resolve_model(checkpoint).preprocess
    model = load_clip(checkpoint, device="cuda" if torch.cuda.is_available() else "cpu").prepare_for_inference()
    stages["load_model"] = time.perf_counter() - start
    ids, vectors, text_vectors, done_at = [], [], [], []
    for row in rows:
        t0 = time.perf_counter()
        volume = read_volume_row(row)
        t1 = time.perf_counter()
        array = preprocess_volume(volume, preprocess, window=row_window(row), name=row["source_path"])
        t2 = time.perf_counter()
        with model.inference():
            vectors.append(model.encode_image(torch.from_numpy(array)[None].to(model.device)).float().cpu().numpy()[0])
            text_vectors.append(model.encode_text([row["report"] or ""]).float().cpu().numpy()[0])
        t3 = time.perf_counter()
        stages["read"] += t1 - t0
        stages["preprocess"] += t2 - t1
        stages["model"] += t3 - t2
        ids.append(row["series_id"])
        done_at.append(t3)
    t3 = time.perf_counter()
    matrix = np.stack(vectors)
    table = pa.table({"id": ids, "vector": pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(out / "part-loop-00000.parquet", table)
    stages["write"] = time.perf_counter() - t3
    seconds = time.perf_counter() - start
    steady = (len(rows) - 1) / (done_at[-1] - done_at[0]) if len(rows) > 1 else None
    return {"seconds": seconds, "series": len(rows), "series_per_s": len(rows) / seconds, "stage_seconds": stages,
            "startup_s": done_at[0] - start, "steady_series_per_s": steady, "vectors": dict(zip(ids, matrix))}


def pipeline(catalog: Path, checkpoint: Path, out: Path, batch_size: int, reads_in_actor: bool | None = None) -> dict:
    from voxsearch.embed import EmbedConfig, run_embedding
    from voxsearch.index import read_embeddings

    summary = run_embedding(EmbedConfig(catalog=catalog, checkpoint=checkpoint, out=out, batch_size=batch_size,
                                        read_in_model_actor=reads_in_actor, progress=False))
    embeddings = read_embeddings(out)
    vectors = dict(zip(embeddings.ids, embeddings.vectors))
    return {"seconds": summary.seconds, "series": summary.embedded, "failed": summary.failed, "actors": summary.actors,
            "series_per_s": summary.throughput, "stage_seconds": summary.stage_seconds, "vectors": vectors,
            "startup_s": summary.startup_seconds, "steady_series_per_s": summary.steady_series_per_s}


def model_gflops(variant: str, image_size: tuple) -> float:
    """Forward FLOPs of the image tower for one volume, counted by torch (for GPU cost estimates)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from voxsearch.encoders import dcformer

    net = dcformer(variant).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 1, *image_size))
    return counter.get_total_flops() / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1x64x128x128 inputs, 8 series")
    parser.add_argument("--n", type=int, help="series to embed (default 16, quick 8)")
    parser.add_argument("--variants", default="nano,small", help="DCFormer variants, comma-separated")
    parser.add_argument("--batch-size", type=int, default=2, help="pipeline volumes per forward pass")
    parser.add_argument("--workdir", help="keep the archive, catalog and shards here (default: a temp folder)")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray runs its workers at nice 15; the loop runs at 0. On a shared box that alone skews the ratio.
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from voxsearch.ingest import read_catalog
    from voxsearch.common.runtime import init_ray

    mode = "quick" if args.quick else "full"
    image_size = (64, 128, 128) if args.quick else (128, 256, 256)
    n = args.n or (8 if args.quick else 16)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="voxsearch-bench-embed-"))
    work.mkdir(parents=True, exist_ok=True)
    init_ray()  # a running cluster is the deployed situation: its start-up is not embedding time
    import ray

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"embed bench ({mode}): {n} series at 1x{'x'.join(map(str, image_size))}, variants {variants}, "
          f"{os.cpu_count()} CPUs, device {device}, Ray {ray.cluster_resources().get('CPU', 0):g} CPUs "
          f"{ray.cluster_resources().get('GPU', 0):g} GPUs", flush=True)
    t = time.perf_counter()
    catalog = make_catalog(work, n, "full" if not args.quick else "small")
    rows = read_catalog(catalog).to_pylist()
    print(f"synthetic archive + catalog: {time.perf_counter() - t:.1f} s", flush=True)

    results = []
    for variant in variants:
        checkpoint = make_checkpoint(work / f"ckpt-{variant}", variant, image_size)
        # A deployed cluster has warm worker processes (torch, MONAI imported): one untimed series first.
        from voxsearch.embed import EmbedConfig, run_embedding

        shutil.rmtree(work / f"warm-{variant}", ignore_errors=True)
        run_embedding(EmbedConfig(catalog=catalog, checkpoint=checkpoint, out=work / f"warm-{variant}", limit=1,
                                  progress=False))
        loop = plain_loop(rows, checkpoint, work / f"loop-{variant}")
        print(f"{variant} loop: {loop['seconds']:.1f} s", flush=True)
        runs = [("loop", loop)]
        # The default (`voxsearch embed`: on fewer than 4 CPUs the model actor reads its own rows), then
        # reads as tasks of their own, the layout larger nodes get.
        for name, reads in (("pipeline", None), ("2-stage", False)):
            shutil.rmtree(work / f"emb-{variant}", ignore_errors=True)
            runs.append((name, pipeline(catalog, checkpoint, work / f"emb-{variant}", args.batch_size, reads)))
            print(f"{variant} {name}: {runs[-1][1]['seconds']:.1f} s", flush=True)
        gflops = model_gflops(variant, image_size)
        for name, r in runs:
            common = sorted(set(loop["vectors"]) & set(r["vectors"]))
            max_diff = float(max(np.abs(loop["vectors"][i] - r["vectors"][i]).max() for i in common))
            busy = r["stage_seconds"]["model"] / r["actors"]["size"] / r["seconds"] if name != "loop" else None
            results.append({
                "variant": variant, "mode": name, "series": r["series"], "seconds": round(r["seconds"], 2),
                "series_per_s": round(r["series_per_s"], 4),
                "ratio_vs_loop": round(r["series_per_s"] / loop["series_per_s"], 3),
                "startup_s": round(r["startup_s"], 2),
                "steady_series_per_s": round(r["steady_series_per_s"], 4) if r["steady_series_per_s"] else None,
                "steady_ratio_vs_loop": (round(r["steady_series_per_s"] / loop["steady_series_per_s"], 3)
                                         if r["steady_series_per_s"] and loop["steady_series_per_s"] else None),
                "stage_seconds": {k: round(v, 2) for k, v in r["stage_seconds"].items()},
                "model_s_per_series": round(r["stage_seconds"]["model"] / max(1, r["series"]), 3),
                "read_preprocess_s_per_series": round(
                    (r["stage_seconds"]["read"] + r["stage_seconds"]["preprocess"]) / max(1, r["series"]), 3),
                "model_busy_fraction": round(busy, 3) if busy is not None else None,
                "actors": r.get("actors"), "max_abs_diff_vs_loop": max_diff, "image_gflops_per_series": round(gflops, 1),
            })

    header = (f"{'variant':8} {'mode':9} {'series':>6} {'wall s':>7} {'series/s':>9} {'x loop':>7} {'start s':>8} "
              f"{'steady/s':>9} {'x loop':>7} {'read':>6} {'prep':>6} {'model':>7} {'write':>6} {'busy':>5}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        s = r["stage_seconds"]
        busy = f"{r['model_busy_fraction']:.2f}" if r["model_busy_fraction"] is not None else "-"
        steady = f"{r['steady_series_per_s']:>9.3f}" if r["steady_series_per_s"] else f"{'-':>9}"
        steady_x = f"{r['steady_ratio_vs_loop']:>7.2f}" if r["steady_ratio_vs_loop"] else f"{'-':>7}"
        print(f"{r['variant']:8} {r['mode']:9} {r['series']:>6} {r['seconds']:>7.1f} {r['series_per_s']:>9.3f} "
              f"{r['ratio_vs_loop']:>7.2f} {r['startup_s']:>8.1f} {steady} {steady_x} {s['read']:>6.1f} "
              f"{s['preprocess']:>6.1f} {s['model']:>7.1f} {s['write']:>6.2f} {busy:>5}")
    print("start s: until the first rows were done (workers starting: imports, model load); steady: series/s after "
          "them;\nstage columns: busy seconds summed over workers; busy: model actor busy / wall time")

    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "device": device, "torch": torch.__version__, "python": sys.version.split()[0],
                    "platform": platform.platform(), "load_avg_1m_at_end": os.getloadavg()[0]},
        "config": {"n": n, "image_size": list(image_size), "embed_dim": EMBED_DIM, "batch_size": args.batch_size,
                   "with_text": True, "synth_size": "small" if args.quick else "full"},
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged[mode] = report
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=2))
    os.replace(tmp, RESULTS)
    print(f"wrote {RESULTS}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
