"""Load test of the serving app on loopback, against the same operations called in-process.

Builds an index of --n studies (the real embeddings of a small ingested synthetic archive plus synthetic
clustered vectors for the bulk, with metadata copied from real rows), serves it on 127.0.0.1, and runs
--clients concurrent HTTP clients for --duration seconds per scenario:

  text          POST /api/v1/search/text      (text encoder -> searcher -> study store)
  scan_id       POST /api/v1/search/scan id   (stored vector -> searcher -> study store)
  scan_upload   POST /api/v1/search/scan file (upload checks -> preprocess -> image encoder -> searcher)

The baseline runs the same work in this process on one thread (encode + index search, no HTTP, no Ray):
the ratios show what serving costs and what concurrency buys. Client and server share the machine's
cores, so absolute numbers understate a real deployment. Errors must be 0.

    python bench/serve.py            # 100,000 studies, 16 clients, 30 s per scenario
    python bench/serve.py --quick    # 20,000 studies, 8 clients, 6 s per scenario
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

SIZE = (32, 64, 64)
ORGANS = ["liver", "lung", "brain", "kidney", "spleen"]
KINDS = ["cyst", "nodule", "mass", "metastasis", "hemorrhage", "stone", "infarct"]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller index, fewer clients, shorter runs")
    p.add_argument("--n", type=int, help="studies in the index (default 100000; quick 20000)")
    p.add_argument("--clients", type=int, help="concurrent HTTP clients (default 16; quick 8)")
    p.add_argument("--duration", type=float, help="seconds per scenario (default 30; quick 6)")
    p.add_argument("--checkpoint", help="CLIP checkpoint to serve (default: a random-weight nano model)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = p.parse_args()
    args.n = args.n or (20_000 if args.quick else 100_000)
    args.clients = args.clients or (8 if args.quick else 16)
    args.duration = args.duration or (6.0 if args.quick else 30.0)
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None}
    arr = np.asarray(latencies) * 1e3
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)), "mean_ms": float(arr.mean())}


def queries(rng: random.Random, n: int) -> list[str]:
    sides = ["left", "right", ""]
    return [f"{rng.choice(KINDS)} in the {rng.choice(sides)} {rng.choice(ORGANS)}".replace("  ", " ") for _ in range(n)]


def build(work: Path, args):
    """Catalog, checkpoint, index of args.n studies; returns what the scenarios need."""
    import pyarrow as pa
    import torch

    from voxsearch.encoders import ClipConfig, ClipModel, TextTowerConfig, load_clip, save_clip
    from voxsearch.index import VectorIndex
    from voxsearch.ingest import IngestConfig, PreprocessConfig, SynthConfig, generate_archive, load_volume, read_catalog, run_ingest

    archive = generate_archive(SynthConfig(n=24, seed=7, out=work / "archive", size="tiny", dicom_share=0.25))
    run_ingest(IngestConfig(archive=archive, out=work / "catalog"))
    rows = read_catalog(work / "catalog").to_pylist()
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        torch.manual_seed(0)
        size = SIZE
        model = ClipModel(ClipConfig(vision_variant="nano", embed_dim=128, text=TextTowerConfig(max_length=64), image_size=size))
        ckpt = work / "ckpt"
        save_clip(model, ckpt, extra={"preprocess": PreprocessConfig(spatial_size=size).to_dict()})
    model = load_clip(ckpt).prepare_for_inference()
    from voxsearch.encoders import read_clip_meta

    pp = PreprocessConfig.from_dict(read_clip_meta(ckpt)["extra"]["preprocess"])
    with torch.inference_mode():
        real = model.encode_image(torch.from_numpy(np.stack([load_volume(r, pp) for r in rows]))).numpy()
    n_fake = max(0, args.n - len(rows))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(500, real.shape[1])).astype(np.float32)
    fake = centres[rng.integers(0, 500, n_fake)] + 0.35 * rng.normal(size=(n_fake, real.shape[1])).astype(np.float32)
    fake /= np.linalg.norm(fake, axis=1, keepdims=True)
    ids = [r["series_id"] for r in rows] + [f"synthetic-{i:07d}" for i in range(n_fake)]
    donors = [rows[i % len(rows)] for i in range(n_fake)]
    cols = ("study_id", "modality", "body_part", "split", "abnormal")
    meta = pa.table({c: pa.array([r.get(c) for r in rows] + [d.get(c) for d in donors]) for c in cols})
    started = time.perf_counter()
    index = VectorIndex.build(ids, np.concatenate([real, fake]), metadata=meta)
    build_s = time.perf_counter() - started
    index.save(work / "index")
    uploads = [Path(r["source_path"]).read_bytes() for r in rows if r["source_format"] == "nifti"][:4]
    return {"rows": rows, "ckpt": ckpt, "model": model, "index": index, "pp": pp, "uploads": uploads,
            "index_build_s": build_s, "manifest": index.manifest}


async def http_scenario(url: str, name: str, clients: int, duration: float, ctx: dict) -> dict:
    import httpx

    rng = random.Random(1)
    texts = queries(rng, 200)
    ids = [r["series_id"] for r in ctx["rows"]]
    latencies, errors, statuses = [], 0, {}
    deadline = time.perf_counter() + duration

    async def one(client: httpx.AsyncClient, i: int):
        if name == "text":
            return await client.post("/api/v1/search/text", json={"query": texts[i % len(texts)], "k": 10})
        if name == "scan_id":
            return await client.post("/api/v1/search/scan", data={"series_id": ids[i % len(ids)], "k": "10"})
        blob = ctx["uploads"][i % len(ctx["uploads"])]
        return await client.post("/api/v1/search/scan", files={"file": ("scan.nii.gz", blob)}, data={"k": "10"})

    async def worker(w: int):
        nonlocal errors
        i = w
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                try:
                    r = await one(client, i)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code != 200 or not r.json()["results"]:
                        errors += 1
                    else:
                        latencies.append(time.perf_counter() - t)
                except Exception:  # noqa: BLE001 - every failure counts as an error
                    errors += 1
                i += clients

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    wall = time.perf_counter() - started
    return {"requests": len(latencies), "errors": errors, "statuses": statuses, "seconds": wall,
            "throughput_rps": len(latencies) / wall, **percentiles(latencies)}


def inprocess_scenario(name: str, duration: float, ctx: dict) -> dict:
    """The same work on one thread in this process: no HTTP, no Ray, no serialisation."""
    import torch

    from voxsearch.ingest import preprocess_path

    rng = random.Random(1)
    texts = queries(rng, 200)
    ids = [r["series_id"] for r in ctx["rows"]]
    model, index = ctx["model"], ctx["index"]
    tmp = Path(tempfile.mkdtemp())
    files = []
    for j, blob in enumerate(ctx["uploads"]):
        files.append(tmp / f"u{j}.nii.gz")
        files[-1].write_bytes(blob)
    latencies = []
    deadline = time.perf_counter() + duration
    i = 0
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        with torch.inference_mode():
            if name == "text":
                q = model.encode_text([texts[i % len(texts)]]).numpy()
            elif name == "scan_id":
                q = index.vector(ids[i % len(ids)])[None]
            else:
                vol = preprocess_path(files[i % len(files)], ctx["pp"])
                q = model.encode_image(torch.from_numpy(vol)[None]).numpy()
        hits = index.search(q, k=10)
        assert hits[0]
        latencies.append(time.perf_counter() - t)
        i += 1
    return {"requests": len(latencies), "throughput_rps": len(latencies) / duration, **percentiles(latencies)}


def main() -> int:
    args = parse()
    from voxsearch.common.runtime import RayConfig, init_ray
    from voxsearch.serve.app import start, stop
    from voxsearch.serve.config import DeploymentOptions, Deployments, ServeConfig

    init_ray(RayConfig(num_cpus=2))
    work = Path(tempfile.mkdtemp(prefix="voxsearch-bench-serve-"))
    print(f"building a {args.n:,}-study index in {work} ...", flush=True)
    ctx = build(work, args)
    small = DeploymentOptions(num_cpus=0.1, max_ongoing_requests=64)
    config = ServeConfig(index=str(work / "index"), checkpoint=str(ctx["ckpt"]), catalog=str(work / "catalog"),
                         data_dir=str(work / "added"), port=free_port(),
                         deployments=Deployments(**{k: small for k in ("ingress", "text_encoder", "image_encoder",
                                                                        "searcher", "studies", "reporter")}))
    url = start(config, ready_timeout_s=300)
    scenarios = ["text", "scan_id", "scan_upload"]
    results = {}
    try:
        for name in scenarios:
            # Warm-up: first calls load lazily imported code and fill caches.
            asyncio.run(http_scenario(url, name, 2, 2.0, ctx))
            print(f"{name}: {args.clients} clients x {args.duration:.0f}s over HTTP ...", flush=True)
            served = asyncio.run(http_scenario(url, name, args.clients, args.duration, ctx))
            inproc = inprocess_scenario(name, min(args.duration, 10.0), ctx)
            results[name] = {
                "http": served, "in_process": inproc,
                "p50_ratio_http_vs_in_process": served["p50_ms"] / inproc["p50_ms"] if served["p50_ms"] else None,
                "throughput_ratio_http_vs_in_process": served["throughput_rps"] / inproc["throughput_rps"],
            }
    finally:
        stop(config)
    total_errors = sum(r["http"]["errors"] for r in results.values())
    report = {
        "bench": "serve", "quick": args.quick, "studies": len(ctx["index"]), "clients": args.clients,
        "duration_s": args.duration, "index_factory": ctx["manifest"].get("factory"),
        "index_build_s": ctx["index_build_s"], "embed_dim": ctx["index"].dim, "errors": total_errors,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
        "model": "random-weight DCFormer-nano + MiniLM text tower" if not args.checkpoint else str(args.checkpoint),
        "scenarios": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    header = f"{'scenario':<12} {'mode':<11} {'req':>6} {'rps':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
    print(f"\n{len(ctx['index']):,} studies, index {report['index_factory']}, {args.clients} clients\n{header}")
    for name, r in results.items():
        h, b = r["http"], r["in_process"]
        print(f"{name:<12} {'http':<11} {h['requests']:>6} {h['throughput_rps']:>8.1f} {h['p50_ms']:>8.1f} {h['p99_ms']:>8.1f} {h['errors']:>6}")
        print(f"{'':<12} {'in-process':<11} {b['requests']:>6} {b['throughput_rps']:>8.1f} {b['p50_ms']:>8.1f} {b['p99_ms']:>8.1f} {'-':>6}")
        print(f"{'':<12} {'ratio':<11} {'':>6} {r['throughput_ratio_http_vs_in_process']:>8.2f} "
              f"{r['p50_ratio_http_vs_in_process']:>8.2f}")
    print(f"\nwrote {out}; errors: {total_errors}")
    return 0 if total_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
