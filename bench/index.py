"""Benchmark the index types on clustered random 768-d vectors, exact FlatIP as the baseline.

    python bench/index.py --quick        # 100,000 vectors (a few minutes on 2 cores)
    python bench/index.py                # 1,000,000 vectors (tens of minutes, ~12 GB RAM)

For each index: build time (train + add + recall calibration), index size, recall@10 against exact
search on held-out queries, batched QPS, single-query p50/p99, and ratios against FlatIP from the
same run. Searches go through VectorIndex.search, so latency includes the Python API overhead.
Results are merged into bench/results/index.json under "quick" or "full".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from voxsearch.index import IndexConfig, VectorIndex
from voxsearch.index.factory import choose_factory, ivf_nlist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from index_testlib import clustered_vectors  # noqa: E402 - the stand-in embeddings the index tests use

RESULTS = Path(__file__).resolve().parent / "results" / "index.json"


def index_bytes(index: VectorIndex) -> int:
    with tempfile.NamedTemporaryFile(suffix=".faiss") as handle:
        faiss.write_index(index._index, handle.name)
        return os.path.getsize(handle.name)


def time_search(index: VectorIndex, queries: np.ndarray, k: int, singles: int, params: dict | None):
    started = time.perf_counter()
    hits = index.search(queries, k=k, params=params)
    batch_s = time.perf_counter() - started
    lat = []
    for q in queries[:singles]:
        t = time.perf_counter()
        index.search(q, k=k, params=params)
        lat.append((time.perf_counter() - t) * 1000)
    return hits, len(queries) / batch_s, float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def recall(hits, truth, k: int) -> float:
    return float(np.mean([len({h.id for h in a[:k]} & set(t[:k])) / k for a, t in zip(hits, truth)]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100,000 vectors instead of 1,000,000")
    parser.add_argument("--n", type=int, help="override the collection size")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--singles", type=int, default=300, help="queries timed one at a time")
    parser.add_argument("--baseline-singles", type=int, default=100, help="single queries timed on exact FlatIP (slow)")
    parser.add_argument("--variants", default="flat,default,sq8,pq,pq-raw,hnsw",
                        help="comma list of flat (always run: the baseline), default, sq8, pq, pq-raw, hnsw")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    n = args.n or (100_000 if args.quick else 1_000_000)
    d, k = args.dim, 10
    mode = "quick" if args.quick else "full"
    print(f"generating {n} clustered {d}-d vectors (+{args.queries} held-out queries)...", flush=True)
    data = clustered_vectors(n + args.queries, d, n_clusters=max(100, n // 500), seed=0)
    queries, data = data[:args.queries].copy(), data[args.queries:]
    ids = np.arange(n).astype(str)
    default = choose_factory(n, d, IndexConfig())
    nlist = ivf_nlist(n)
    variants = [
        ("flat", "FlatIP (baseline)", IndexConfig(factory="Flat", store_vectors=False, recall_queries=50), None),
        ("default", f"default ({default.factory})", IndexConfig(store_vectors=default.rerank), None),
        ("sq8", f"IVF{nlist},SQ8", IndexConfig(factory=f"IVF{nlist},SQ8", store_vectors=False), None),
        ("pq", f"IVF{nlist},PQ{d // 8}x8 + rerank", IndexConfig(factory=f"IVF{nlist},PQ{d // 8}x8"), None),
        # The same PQ index with re-ranking limited to its own k candidates: the recall PQ alone gives.
        ("pq-raw", f"IVF{nlist},PQ{d // 8}x8 no rerank", "pq", {"rerank_factor": 1}),
        ("hnsw", "HNSW32,Flat", IndexConfig(factory="HNSW32,Flat", store_vectors=False), None),
    ]
    wanted = set(args.variants.split(",")) | {"flat"}
    if "pq-raw" in wanted:
        wanted.add("pq")
    unknown = wanted - {key for key, *_ in variants}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    rows, truth, base = [], None, None
    built: dict[str, VectorIndex] = {}
    meta = {"n": n, "dim": d, "queries": args.queries, "singles": args.singles, "baseline_singles": args.baseline_singles,
            "k": k, "data": f"{max(100, n // 500)} uneven Gaussian clusters on the unit sphere, cluster-mate cosine ~0.6",
            "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(), "python": sys.version.split()[0],
            "machine": platform.machine(), "cpus": os.cpu_count()}
    for key, name, config, params in variants:
        if key not in wanted:
            continue
        print(f"building {name}...", flush=True)
        started = time.perf_counter()
        reused = isinstance(config, str)
        index = built[config] if reused else VectorIndex.build(ids, data, config=config)
        build_s = time.perf_counter() - started
        singles = args.baseline_singles if key == "flat" else args.singles
        hits, qps, p50, p99 = time_search(index, queries, k, singles, params)
        if truth is None:
            truth = [[h.id for h in row] for row in hits]
        m = index.manifest
        row = {"index": name, "factory": m["factory"], "build_s": None if reused else round(build_s, 1),
               "train_s": m.get("train_seconds"), "calibration_s": m["recall"].get("seconds"),
               "index_bytes": index_bytes(index), "recall_at_10": round(recall(hits, truth, k), 4),
               "manifest_recall_estimate": None if params else m["recall"].get("recall_at_k"),
               "search_params": {**m.get("search_defaults", {}), **(params or {})},
               "qps_batch": round(qps, 1), "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
               "load_avg": round(os.getloadavg()[0], 1)}
        base = base or row
        row.update({"qps_vs_flat": round(row["qps_batch"] / base["qps_batch"], 2),
                    "p50_speedup_vs_flat": round(base["p50_ms"] / row["p50_ms"], 2),
                    "memory_vs_flat": round(row["index_bytes"] / base["index_bytes"], 3)})
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_results(args.out, mode, {**meta, "complete": False, "results": rows})
        if key == "pq" and "pq-raw" in wanted:
            built["pq"] = index
        del index, hits
        gc.collect()
    header = ("index", "build_s", "MiB", "recall@10", "est.recall", "QPS", "p50 ms", "p99 ms", "QPS x", "mem x")
    print(f"\n{n:,} x {d} clustered vectors, {args.queries} queries, k={k}, faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['index']} | {r['build_s']} | {r['index_bytes'] / 2**20:.0f} | {r['recall_at_10']:.3f} | "
              f"{r['manifest_recall_estimate']} | {r['qps_batch']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['qps_vs_flat']} | {r['memory_vs_flat']} |")
    default_row = next((r for r in rows if r["index"].startswith("default")), rows[0])
    ok = default_row["recall_at_10"] >= 0.95 and default_row["p50_ms"] < 5.0
    print(f"\ndefault choice {default_row['factory']}: recall@10 {default_row['recall_at_10']:.3f}, "
          f"p50 {default_row['p50_ms']:.2f} ms -> {'meets' if ok else 'MISSES'} the target (>= 0.95, < 5 ms)")
    write_results(args.out, mode, {**meta, "complete": True, "default_meets_target": ok, "results": rows})
    print(f"wrote {args.out}")
    return 0


def write_results(path: Path, mode: str, result: dict) -> None:
    """Merge this run into the JSON file (quick and full runs live side by side), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.is_file() else {}
    existing[mode] = {**result, "load_avg": os.getloadavg(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(existing, indent=2))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
