"""`voxsearch search`: query an index by free text, by an indexed series (--like) or by a scan file (--scan)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

COLUMNS = (("score", 6), ("study_id", 14), ("series_id", 14), ("modality", 8), ("body_part", 10), ("report", 0))


def register(sub):
    p = sub.add_parser(
        "search",
        help="search an index by free text, by example series (--like) or by a scan file (--scan)",
        description=(
            "Rank indexed series by cosine similarity to a query: free text (encoded by the checkpoint's "
            "text tower), an indexed series (--like SERIES_ID, its stored vector) or a scan file/folder "
            "(--scan PATH, preprocessed and encoded like the archive).\n\n"
            'examples:\n  voxsearch search "liver lesion with rim enhancement" --index idx/ --checkpoint ckpt/ '
            "--filter modality=CT\n  voxsearch search --like 3f2a9c... --index idx/ --k 5\n"
            "  voxsearch search --scan head.nii.gz --index idx/ --checkpoint ckpt/"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("text", nargs="?", help="free-text query")
    p.add_argument("--index", required=True, help="vector index folder")
    p.add_argument("--checkpoint", help="CLIP checkpoint (folder or s3:// / gs:// URI) the index was embedded with "
                   "(for text and --scan)")
    p.add_argument("--like", metavar="SERIES_ID", help="find series similar to this indexed series")
    p.add_argument("--scan", metavar="PATH", help="find series similar to this NIfTI file / DICOM folder or zip")
    p.add_argument("--modality", help="modality of --scan when the file does not say (CT or MR)")
    p.add_argument("--k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--filter", action="append", default=[], metavar="COL=VALUE",
                   help="metadata filter, repeatable: col=value, col=a,b (any of), col=lo..hi (range)")
    p.add_argument("--json", action="store_true", help="print hits as JSON lines")
    p.set_defaults(func=run)


def parse_filters(items: list[str]) -> dict:
    filters: dict = {}
    for item in items:
        column, sep, value = item.partition("=")
        if not sep or not column.strip():
            raise ValueError(f"--filter {item!r}: expected COLUMN=VALUE")
        column, value = column.strip(), value.strip()
        if ".." in value:
            lo, _, hi = value.partition("..")
            filters[column] = {"min": lo or None, "max": hi or None}
        elif "," in value:
            filters[column] = [v.strip() for v in value.split(",") if v.strip()]
        else:
            filters[column] = value
    return filters


def _check_model(index, checkpoint) -> None:
    indexed = index.manifest.get("source", {}).get("model_id")
    if indexed and indexed != checkpoint.model_id:
        raise ValueError(f"index was embedded with model {indexed}, but --checkpoint {checkpoint.source} is model "
                         f"{checkpoint.model_id}")


def query_vector(args, index):
    """The (1, d) query for whichever of text / --like / --scan was given."""
    import numpy as np

    if args.like:
        try:
            return index.vector(args.like)[None].astype(np.float32)
        except KeyError:
            raise ValueError(f"--like {args.like}: no such series in index {args.index}") from None
    if not args.checkpoint:
        raise ValueError("a text or --scan query needs --checkpoint (the model the index was embedded with)")
    from voxsearch.encoders import open_checkpoint

    checkpoint = open_checkpoint(args.checkpoint)
    _check_model(index, checkpoint)
    model = checkpoint.load_model(inference=True)
    with model.inference():
        if args.scan:
            import torch

            from voxsearch.ingest import PreprocessConfig, preprocess_path

            volume = preprocess_path(args.scan, PreprocessConfig.from_dict(checkpoint.preprocess),
                                     modality=args.modality)
            return model.encode_image(torch.from_numpy(volume)[None]).float().numpy()
        return model.encode_query([args.text]).float().numpy()  # finding-aware, as the server


def _cell(value, width: int) -> str:
    text = "" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
    text = " ".join(text.split())
    return text if not width or len(text) <= width else text[: width - 1] + "…"


def print_table(hits, out=None) -> None:
    out = out or sys.stdout  # looked up per call: a default argument would keep the stdout of import time
    if not hits:
        print("no results", file=out)
        return
    header = "  ".join(name.ljust(w) if w else name for name, w in COLUMNS)
    print(header, file=out)
    print("-" * max(len(header), 100), file=out)
    for hit in hits:
        meta = hit.metadata or {}
        values = {"score": hit.score, "series_id": hit.id, "report": meta.get("report_excerpt"), **{
            k: meta.get(k) for k in ("study_id", "modality", "body_part")}}
        cells = [_cell(values[name], w).ljust(w) if w else textwrap.shorten(_cell(values[name], 0) or "-", 60)
                 for name, w in COLUMNS]
        print("  ".join(cells), file=out)


def run(args) -> int:
    modes = [m for m in (args.text, args.like, args.scan) if m]
    if len(modes) != 1:
        print("voxsearch search: error: give exactly one of: free text, --like SERIES_ID, --scan PATH", file=sys.stderr)
        return 2
    if args.k < 1:
        print("voxsearch search: error: --k must be >= 1", file=sys.stderr)
        return 2
    from voxsearch.index import VectorIndex

    try:
        filters = parse_filters(args.filter)
        index = VectorIndex.load(args.index)
        query = query_vector(args, index)
        # The example series itself would always rank first: ask for one more and drop it.
        k = args.k + 1 if args.like else args.k
        hits = [h for h in index.search(query, k=k, filters=filters or None)[0] if h.id != args.like][: args.k]
    except (ValueError, OSError) as e:
        print(f"voxsearch search: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        for h in hits:
            print(json.dumps({"id": h.id, "score": h.score, **{k: _jsonable(v) for k, v in (h.metadata or {}).items()}}))
    else:
        print_table(hits)
    return 0


def _jsonable(value):
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
