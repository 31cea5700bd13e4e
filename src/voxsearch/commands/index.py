"""`voxsearch index build|add|delete|search|info|compact`: vector indexes over embeddings from any source."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

EPILOG = """examples:
  voxsearch index build out/embeddings/ --out out/index
  voxsearch index build vectors.npy --ids ids.txt --out out/index --factory "IVF1024,Flat"
  voxsearch index search out/index --id SERIES_ID -k 5 --where modality=CT --where study_date=2020-01-01..
  voxsearch index search out/index --query-file queries.npy --nprobe 32 --json
  voxsearch index delete out/index ID1 ID2 ;  voxsearch index compact out/index
  voxsearch index build out/embeddings/ --out out/sharded --shards 4      # Ray actors, one shard each
"""

_SIZE = re.compile(r"^\s*([\d.]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8G, 512M, 1073741824)")
    power = " kmgt".index((match.group(2) or " ").lower())
    return int(float(match.group(1)) * 1024**power)


def location(text: str):
    """A folder argument: a local Path, or an ObjectPath for s3:// and gs:// URIs (which Path would
    turn into "s3:/bucket")."""
    from voxsearch.common.storage import location as parse

    return parse(text)


def parse_where(items: list[str] | None) -> dict:
    """col=value, col=v1,v2 (any of), col=lo..hi (inclusive range; either end may be empty)."""
    filters: dict = {}
    for item in items or []:
        column, sep, value = item.partition("=")
        if not sep or not column:
            raise ValueError(f"--where {item!r}: expected COLUMN=VALUE, COLUMN=V1,V2 or COLUMN=LO..HI")
        if ".." in value:
            lo, hi = value.split("..", 1)
            filters[column] = {"min": lo or None, "max": hi or None}
        elif "," in value:
            filters[column] = [v for v in value.split(",") if v]
        else:
            filters[column] = value
    return filters


def register(sub) -> None:
    p = sub.add_parser("index", help="build, update and search vector indexes of scan embeddings",
                       description="Vector indexes (faiss) over embedding Parquet shards or .npy matrices.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    def sources(q):
        q.add_argument("sources", nargs="+", type=location,
                       help="embedding Parquet files/folders (or s3:// / gs:// prefixes), or one .npy file")
        q.add_argument("--vector-column", default="vector", help="Parquet column holding the vectors (default: vector)")
        q.add_argument("--ids", type=Path, help="for a .npy input: text file with one id per line")

    b = cmds.add_parser("build", help="build an index (factory chosen from size and memory budget)")
    sources(b)
    b.add_argument("--out", type=location, required=True, help="index folder (or s3:// / gs:// prefix) to write")
    b.add_argument("--factory", help='force a faiss factory string, e.g. "HNSW32,Flat" or "IVF4096,PQ96x8"')
    b.add_argument("--memory-budget", type=parse_size, default=None, help="RAM the index may use (default 8G)")
    b.add_argument("--target-recall", type=float, default=None, help="recall@10 the tuning aims for (default 0.97)")
    b.add_argument("--no-gpu", action="store_true", help="never use a GPU even if faiss sees one")
    b.add_argument("--shards", type=int, default=1, help="split into N shards served by Ray actors")
    b.add_argument("--ray-address", help="Ray cluster address for --shards (default: RAY_ADDRESS or local)")

    a = cmds.add_parser("add", help="add (or with --replace update) embeddings without rebuilding")
    a.add_argument("index", type=location)
    sources(a)
    a.add_argument("--replace", action="store_true", help="update ids that are already indexed")

    d = cmds.add_parser("delete", help="delete ids (compact later to reclaim space)")
    d.add_argument("index", type=location)
    d.add_argument("delete_ids", nargs="*", metavar="ID")
    d.add_argument("--ids-file", type=Path, help="text file with one id per line")

    s = cmds.add_parser("search", help="nearest neighbours of query vectors or of indexed items")
    s.add_argument("index", type=location)
    group = s.add_mutually_exclusive_group(required=True)
    group.add_argument("--query-file", type=Path, help=".npy (q, d) or Parquet with a vector column")
    group.add_argument("--id", dest="query_ids", action="append", help="search by the vector of an indexed id (repeatable)")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--where", action="append", metavar="COL=VALUE",
                   help="metadata filter: col=v, col=v1,v2, col=lo..hi (repeatable, ANDed)")
    s.add_argument("--nprobe", type=int)
    s.add_argument("--ef-search", type=int)
    s.add_argument("--rerank-factor", type=int)
    s.add_argument("--vector-column", default="vector")
    s.add_argument("--mmap", action="store_true", help="memory-map the index instead of reading it (large indexes)")
    s.add_argument("--json", action="store_true", help="one JSON object per query")
    s.add_argument("--ray-address")

    i = cmds.add_parser("info", help="manifest: factory, counts, measured recall, files")
    i.add_argument("index", type=location)
    i.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    i.add_argument("--json", action="store_true")
    i.add_argument("--ray-address")

    c = cmds.add_parser("compact", help="rebuild over live rows (after many deletes), re-tune and re-measure recall")
    c.add_argument("index", type=location)
    c.add_argument("--ray-address")
    p.set_defaults(func=run)


def _is_sharded(path: Path) -> bool:
    from voxsearch.index.sharded import SHARDED_MANIFEST

    return (path / SHARDED_MANIFEST).is_file()


def _open(path: Path, args, mmap: bool = False, verify: bool = True):
    from voxsearch.index import ShardedIndex, VectorIndex

    if _is_sharded(path):
        _ray(args)
        return ShardedIndex.load(path, mmap=mmap, verify=verify)
    return VectorIndex.load(path, mmap=mmap, verify=verify)


def _ray(args) -> None:
    from voxsearch.common.runtime import RayConfig, init_ray

    init_ray(RayConfig(address=getattr(args, "ray_address", None)))


def _queries(args, index):
    import numpy as np

    if args.query_ids:
        return list(args.query_ids), np.stack([index.vector(i) for i in args.query_ids])
    path = args.query_file
    if path.suffix == ".npy":
        matrix = np.load(path)
        matrix = matrix[None, :] if matrix.ndim == 1 else matrix
        return [f"{path.name}[{r}]" for r in range(len(matrix))], matrix
    from voxsearch.index.embeddings import read_parquet_embeddings

    emb = read_parquet_embeddings(path, args.vector_column)
    return emb.ids, emb.vectors


def _build(args) -> int:
    from voxsearch.index import IndexConfig, ShardedIndex, VectorIndex, read_embeddings

    overrides = {"factory": args.factory, "memory_budget_bytes": args.memory_budget, "target_recall": args.target_recall}
    config = IndexConfig(**{k: v for k, v in overrides.items() if v is not None}, use_gpu=False if args.no_gpu else "auto")
    emb = read_embeddings(args.sources, args.vector_column, args.ids)
    if args.shards > 1:
        _ray(args)
        with ShardedIndex.build(emb.ids, emb.vectors, emb.metadata, num_shards=args.shards, config=config) as index:
            index.save(args.out)
            manifest = index.manifest
        print(f"built {manifest['num_shards']} shards ({manifest['count']} vectors, {manifest['factories']}), "
              f"recall@10 ~{manifest['recall_at_k']} -> {args.out}")
        return 0
    index = VectorIndex.build(emb.ids, emb.vectors, emb.metadata, config, source=emb.source)
    index.save(args.out)
    m = index.manifest
    print(f"built {m['factory']} over {m['count']} x {m['dim']} vectors ({m['factory_reason']}); "
          f"recall@{m['recall']['k']} vs exact {m['recall']['recall_at_k']} at {m['search_defaults']} -> {args.out}")
    return 0


def _update(args, action: str, *call_args):
    """Apply an index method to the saved index through update_index (shards: each shard's), so a
    writer that saved meanwhile (the server, a sync) has its version re-applied to, never overwritten.
    Returns (what the method returned, the updated index)."""
    from voxsearch.index import ShardedIndex, update_index

    if _is_sharded(args.index):
        _ray(args)
        index = ShardedIndex.load(args.index)
        names = ("ids", "vectors", "metadata", "replace")
        return index.update(args.index, action, **dict(zip(names, call_args))), index
    done = update_index(args.index, lambda index: getattr(index, action)(*call_args))
    return done.result, done.index


def _add(args) -> int:
    from voxsearch.index import read_embeddings

    emb = read_embeddings(args.sources, args.vector_column, args.ids)
    added, index = _update(args, "add", emb.ids, emb.vectors, emb.metadata, args.replace)
    print(f"added {added} vectors; the index now holds {len(index)}")
    return 0


def _delete(args) -> int:
    ids = list(args.delete_ids)
    if args.ids_file:
        ids += [line.strip() for line in args.ids_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError("no ids to delete: give IDs or --ids-file")
    removed, index = _update(args, "delete", ids)
    hint = " (over 20% deleted: run `voxsearch index compact`)" if getattr(index, "needs_compact", False) else ""
    print(f"deleted {removed} of {len(ids)} ids; {len(index)} remain{hint}")
    return 0


def _search(args) -> int:
    index = _open(args.index, args, mmap=args.mmap)
    labels, queries = _queries(args, index)
    params = {k: v for k, v in (("nprobe", args.nprobe), ("efSearch", args.ef_search),
                                ("rerank_factor", args.rerank_factor)) if v is not None}
    results = index.search(queries, k=args.k, filters=parse_where(args.where), params=params or None)
    for label, hits in zip(labels, results):
        if args.json:
            print(json.dumps({"query": label, "hits": [{"id": h.id, "score": round(h.score, 6), "metadata": h.metadata}
                                                       for h in hits]}, default=str))
            continue
        print(f"query {label}: {len(hits)} hits")
        for rank, h in enumerate(hits, 1):
            meta = " ".join(f"{c}={h.metadata[c]}" for c in ("modality", "body_part", "split", "study_date")
                            if h.metadata.get(c) is not None)
            print(f"  {rank:>3}  {h.score:8.4f}  {h.id}  {meta}")
    return 0


def _info(args) -> int:
    index = _open(args.index, args, verify=not args.no_verify)
    m = index.manifest
    if args.json:
        print(json.dumps(m, indent=2, default=str))
        return 0
    if "shards" in m:
        print(f"sharded index: {m['num_shards']} shards, {m['count']} vectors, dim {m['dim']}, "
              f"factories {m['factories']}, recall@10 ~{m['recall_at_k']}")
        return 0
    r = m.get("recall", {})
    print(f"factory      {m['factory']}  ({m.get('factory_reason')})")
    print(f"vectors      {m['count']} live, {m['deleted']} deleted, dim {m['dim']}, metric {m['metric']}"
          f"{' (cosine)' if m['normalized'] else ''}")
    print(f"recall@{r.get('k')}    {r.get('recall_at_k')} vs exact search at {r.get('params')} "
          f"({r.get('queries')} sampled queries, {r.get('rows_at_measurement')} rows)")
    print(f"model        {m.get('source', {}).get('model_id')}")
    print(f"columns      {', '.join(m['metadata_columns']) or '-'}")
    for name, f in sorted(m.get("files", {}).items()):
        print(f"file         {name}  {f['bytes']:,} B  sha256 {f['sha256'][:16]}...")
    print("checksums    " + ("skipped" if args.no_verify else "verified"))
    if index.needs_compact:
        print("note         over 20% of rows are deleted: run `voxsearch index compact`")
    return 0


def _compact(args) -> int:
    from voxsearch.index import update_index

    if _is_sharded(args.index):
        _, index = _update(args, "compact")
        m = index.manifest
        print(f"compacted {m['num_shards']} shards -> {m['count']} rows; recall@10 ~{m['recall_at_k']}")
        return 0

    def compact(index) -> int:
        rows = index.manifest["rows"]
        index.compact()
        return rows

    done = update_index(args.index, compact)
    m = done.index.manifest
    print(f"compacted {done.result} rows -> {m['count']}; {m['factory']}, recall@10 {m['recall']['recall_at_k']}")
    return 0


def run(args) -> int:
    from voxsearch.index.errors import VectorIndexError

    actions = {"build": _build, "add": _add, "delete": _delete, "search": _search, "info": _info, "compact": _compact}
    try:
        return actions[args.index_command](args)
    except (VectorIndexError, ValueError, KeyError, FileNotFoundError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"voxsearch index {args.index_command}: error: {message}", file=sys.stderr)
        return 2
