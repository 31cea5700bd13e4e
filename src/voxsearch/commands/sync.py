"""`voxsearch sync`: keep catalog, embeddings and index in step with a folder or a PACS."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share between 0 and 1 (e.g. 0.2)")
    return value


def register(sub):
    p = sub.add_parser(
        "sync",
        help="ingest, embed and index what is new in a folder or PACS; drop what it deleted",
        description=(
            "The standing job for new studies. Each round ingests what is new or changed in SOURCE (a folder, "
            "or a DICOMweb base URL such as http://pacs:8042/dicom-web), embeds it and adds it to the index the "
            "server searches; studies deleted from SOURCE leave the catalog, embeddings and index. PACS "
            "credentials come from VOXSEARCH_DICOMWEB_USER/VOXSEARCH_DICOMWEB_PASSWORD, VOXSEARCH_DICOMWEB_TOKEN "
            "or --auth-file, never from the command line. A round that would delete more than --max-delete-share "
            "of the known series, or all of them, deletes none (an emptied PACS or an unmounted folder looks the "
            "same as a mass deletion) and exits 1, unless --allow-mass-delete. Example: voxsearch sync "
            "http://127.0.0.1:8042/dicom-web --catalog cat --index idx --checkpoint model --every 60"
        ),
    )
    p.add_argument("source", help="a folder or a DICOMweb base URL")
    p.add_argument("--catalog", required=True, type=Path)
    p.add_argument("--index", required=True, type=Path)
    p.add_argument("--checkpoint", required=True, help="CLIP checkpoint folder, or its s3:// / gs:// URI")
    p.add_argument("--embeddings", type=Path, help="embedding folder (default: <index>-embeddings)")
    p.add_argument("--mirror", type=Path, help="de-identified local copy of PACS series (default: <catalog>-mirror)")
    p.add_argument("--auth-file", type=Path, help='JSON: {"token": ...} or {"username": ..., "password": ...}')
    p.add_argument("--modality", help="only series of this modality (QIDO filter), e.g. CT")
    p.add_argument("--study-date-from", help="YYYYMMDD")
    p.add_argument("--study-date-to", help="YYYYMMDD")
    p.add_argument("--max-delete-share", type=_share, default=0.2,
                   help="most of the known series one round may delete (default 0.2)")
    p.add_argument("--allow-mass-delete", action="store_true",
                   help="delete whatever the source lacks, even more than --max-delete-share or every series")
    p.add_argument("--every", type=float, help="run a round every this many seconds (default: one round)")
    p.add_argument("--rounds", type=int, help="stop after this many rounds")
    p.add_argument("--ray-address", help="Ray cluster (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=run)


def run(args) -> int:
    from voxsearch.sync.job import SyncConfig, sync_forever, sync_round
    from voxsearch.common.runtime import RayConfig

    cfg = SyncConfig(
        source=args.source, catalog=args.catalog, index=args.index, checkpoint=args.checkpoint,
        embeddings=args.embeddings, mirror=args.mirror, auth_file=args.auth_file, modality=args.modality,
        study_date_from=args.study_date_from, study_date_to=args.study_date_to,
        max_delete_share=args.max_delete_share, allow_mass_delete=args.allow_mass_delete,
        ray=RayConfig(address=args.ray_address),
    )

    def show(report):
        print(json.dumps(report.to_dict()), flush=True)

    if args.every is None:
        report = sync_round(cfg)
        show(report)
        return 1 if report.failed or report.deletions_refused else 0
    sync_forever(cfg, every=args.every, rounds=args.rounds, on_round=show)
    return 0
