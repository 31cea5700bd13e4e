"""`voxsearch embed`: embed a catalog's volumes (and reports) into Parquet shards, then build/update an index."""

from __future__ import annotations

import json
import sys


def register(sub):
    p = sub.add_parser(
        "embed",
        help="bulk-embed a catalog on Ray into Parquet shards and an index (resumable)",
        description=(
            "Read + preprocess every catalog row as Ray CPU tasks, run the image tower in an actor pool "
            "(one actor per GPU when there are GPUs), write Parquet shards to --out, then build or update "
            "--index. Reruns skip rows already embedded with the same model and preprocessing; a killed "
            "run resumes where it stopped.\n\n"
            "example: voxsearch embed --catalog cat/ --checkpoint ckpt/ --out emb/ --index idx/"
        ),
    )
    p.add_argument("--catalog", required=True, help="catalog folder written by `voxsearch ingest`")
    p.add_argument("--checkpoint", required=True,
                   help="CLIP checkpoint folder (save_clip format), or its s3:// / gs:// URI")
    p.add_argument("--out", required=True,
                   help="embedding folder (Parquet shards), or its s3:// / gs:// URI (one run per prefix at a "
                        "time, held by a run lease); created or resumed")
    p.add_argument("--index", help="vector index folder to build (missing) or update (existing)")
    p.add_argument("--batch-size", type=int, default=4, help="volumes per model forward pass (default 4)")
    p.add_argument("--concurrency", type=int, help="model actors (default: one per GPU, else half the CPUs)")
    p.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs (torch threads) per CPU model actor")
    p.add_argument("--reads", choices=("auto", "actor", "tasks"), default="auto",
                   help="read and preprocess inside the model actors (actor) or in tasks of their own (tasks); "
                        "auto: inside the actors on CPU clusters of fewer than 4 CPUs")
    p.add_argument("--shard-rows", type=int, default=256, help="rows per Parquet shard (default 256)")
    p.add_argument("--no-text", action="store_true", help="skip report-text embeddings")
    p.add_argument("--float16", action="store_true", help="store vectors as float16 (half the size)")
    p.add_argument("--retry-failed", action="store_true", help="retry rows that failed in earlier runs")
    p.add_argument("--limit", type=int, help="embed at most this many new rows (a trial run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--ray-address", help="Ray cluster (ray://host:10001 or auto); default RAY_ADDRESS or local")
    p.set_defaults(func=run)


def run(args) -> int:
    from voxsearch.embed import EmbedConfig, EmbedError, run_embedding
    from voxsearch.common.runtime import RayConfig

    try:
        cfg = EmbedConfig(
            catalog=args.catalog,
            checkpoint=args.checkpoint,
            out=args.out,
            index=args.index,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            actor_cpus=args.actor_cpus,
            read_in_model_actor={"auto": None, "actor": True, "tasks": False}[args.reads],
            shard_rows=args.shard_rows,
            with_text=not args.no_text,
            vector_dtype="float16" if args.float16 else "float32",
            retry_failed=args.retry_failed,
            limit=args.limit,
            progress=not args.no_progress,
            ray=RayConfig(address=args.ray_address),
        )
        summary = run_embedding(cfg)
    except (EmbedError, ValueError) as e:
        print(f"voxsearch embed: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
        return 0
    s = summary
    print(f"embedded {s.embedded}, skipped {s.skipped} (already done), failed {s.failed}"
          + (f", redone {s.superseded} changed" if s.superseded else ""))
    print(f"{s.seconds:.1f} s, {s.throughput:.2f} series/s; model {s.model_id}, preprocessing {s.preprocess_id}")
    if s.startup_seconds is not None:
        steady = f", then {s.steady_series_per_s:.2f} series/s" if s.steady_series_per_s else ""
        print(f"first rows after {s.startup_seconds:.1f} s (workers starting, model loading){steady}")
    if s.stage_seconds:
        busy = ", ".join(f"{k} {v:.1f}" for k, v in s.stage_seconds.items())
        print(f"busy seconds summed over workers: {busy}")
    if s.failed:
        print(f"failed rows are listed in {cfg.out / '_errors'} (rerun with --retry-failed to try them again)")
    if s.index:
        print(f"index {s.index['path']}: {s.index['action']} (+{s.index['added']} -{s.index['deleted']}), "
              f"{s.index['size']} vectors")
    return 0
