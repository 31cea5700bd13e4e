"""`voxsearch eval ...`: evaluation stages. `eval retrieval` is here; other modules add stages through
`register_eval(eval_subparsers)` (e.g. `eval report`, `eval vqa`)."""

from __future__ import annotations

import logging
from pathlib import Path

from voxsearch.commands._groups import extend_group

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate models (retrieval: recall@K and finding precision)",
                       description="Evaluation stages.")
    stages = p.add_subparsers(dest="eval_stage", metavar="STAGE")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    _register_retrieval(stages)
    extend_group(stages, "register_eval", skip=__name__)


def _register_retrieval(stages) -> None:
    p = stages.add_parser(
        "retrieval", help="image<->report recall@1/5/10 (Med3DVLM protocol) and finding precision@10",
        description="Scores a CLIP checkpoint on the first N pairs of a catalog split (N in --ns, as many as "
                    "exist), both directions, with chance levels; on catalogs with ground-truth findings "
                    "(the synthetic archive) also precision@10 of finding queries. Refuses a split that "
                    "shares scans (content hash) or patients with another split.\n"
                    "example: voxsearch eval retrieval --checkpoint runs/clip/model --catalog catalog\n"
                    "(either may be an s3:// or gs:// URI: the catalog and its volumes are read from the bucket, "
                    "the checkpoint is fetched once per machine into the checkpoint cache)")
    # Strings, not Paths: an s3:// or gs:// URI must keep its "//".
    p.add_argument("--checkpoint", required=True,
                   help="CLIP checkpoint directory (save_clip format) or its s3:// / gs:// URI")
    p.add_argument("--catalog", required=True, help="catalog folder or s3:// / gs:// URI")
    p.add_argument("--split", default="test")
    p.add_argument("--ns", type=int, nargs="+", default=[100, 500, 1000, 2000])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="Ray Data preprocessing actors")
    p.add_argument("--allow-split-overlap", action="store_true")
    p.add_argument("--json", type=Path, help="also write the full result here")
    p.add_argument("--ray-address")
    p.set_defaults(func=run_retrieval)


def format_table(result: dict) -> str:
    lines = [f"{'N':>6} {'dir':>4} {'R@1':>7} {'R@5':>7} {'R@10':>7}   chance R@1/R@5/R@10"]
    for n, s in result["recall"].items():
        for d in ("i2t", "t2i"):
            lines.append(f"{n:>6} {d:>4} {s[f'{d}_R@1']:7.3f} {s[f'{d}_R@5']:7.3f} {s[f'{d}_R@10']:7.3f}   "
                         f"{s['chance_R@1']:.3f}/{s['chance_R@5']:.3f}/{s['chance_R@10']:.3f}")
    if "findings" in result:
        f = result["findings"]
        lines.append(f"finding queries: {f['queries']}  P@10 {f['P@10']:.3f}  (chance {f['chance_P@10']:.3f})")
    integ = result["integrity"]
    lines.append(f"split integrity: {integ['duplicate_scans']} duplicate scans, {integ['shared_patients']} "
                 f"shared patients ({'clean' if integ['clean'] else 'LEAKS'})")
    return "\n".join(lines)


def run_retrieval(args) -> int:
    from voxsearch.common.runtime import RayConfig, init_ray
    from voxsearch.common.storage import location
    from voxsearch.training import SplitLeakageError, evaluate_retrieval

    for label, value in (("checkpoint", args.checkpoint), ("catalog", args.catalog)):
        try:
            path = location(value)  # an ObjectPath prints its URI without the query string
            found = path.exists()
        except (OSError, ValueError) as exc:  # names the URI, never a key
            log.error("%s: %s", label, exc)
            return 1
        if not found:
            log.error("%s not found: %s", label, path)
            return 1
    try:
        init_ray(RayConfig(address=args.ray_address))
        result = evaluate_retrieval(args.checkpoint, args.catalog, split=args.split, ns=args.ns,
                                    allow_split_overlap=args.allow_split_overlap, workers=args.workers,
                                    batch_size=args.batch_size)
    except (OSError, ValueError, SplitLeakageError) as exc:
        log.error("%s", exc)
        return 1
    print(format_table(result))
    if args.json:
        from voxsearch.common.durable import atomic_write_json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, result)
    return 0
