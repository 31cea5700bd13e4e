"""`voxsearch ingest`: archive -> de-identified Parquet catalog (Ray Data)."""

from __future__ import annotations

import json


def register(sub):
    p = sub.add_parser(
        "ingest",
        help="build or update a catalog from an archive (NIfTI, DICOM, M3D, CSV/Parquet manifest)",
        description="Read every series of ARCHIVE, check it, and add new or changed series (by content hash) to "
        "the Parquet catalog at --out. Bad inputs go to the errors table; the exit code is 1 if any failed. "
        "ARCHIVE may be a DICOMweb base URL (a PACS): its series are fetched into a de-identified mirror "
        "(--mirror) first; credentials from VOXSEARCH_DICOMWEB_USER/_PASSWORD, _TOKEN or --auth-file.\n"
        "Example: voxsearch ingest data/synth --out data/catalog",
    )
    p.add_argument("archive", help="archive folder (or one NIfTI/.npy/zip, or an s3:// / gs:// prefix of such "
                   "objects), or a DICOMweb base URL")
    p.add_argument("--out", required=True, help="catalog folder (or s3:// / gs:// prefix)")
    p.add_argument("--manifest", help="CSV/Parquet manifest (default ARCHIVE/manifest.csv if present)")
    p.add_argument("--keep-column", action="append", default=[], metavar="NAME",
                   help="also copy this manifest column into the catalog, scrubbed of the row's identifiers "
                   "(repeatable; other unknown columns are dropped; identifier columns are refused)")
    p.add_argument("--engine", choices=["ray", "local"], default="ray")
    p.add_argument("--workers", type=int, help="Ray actors (default: all CPUs)")
    p.add_argument("--ray-address", help="Ray cluster (ray://host:port); default RAY_ADDRESS or a local Ray")
    p.add_argument("--salt-file", help="file holding the hashing salt (default $VOXSEARCH_SALT or OUT/.salt; "
                   "an s3:// or gs:// OUT needs one of the first two)")
    p.add_argument("--max-voxels", type=int, help="refuse volumes larger than this many voxels")
    p.add_argument("--no-check-preprocess", action="store_true", help="skip the trial preprocessing of each volume")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--mirror", help="PACS sources: local de-identified copy (default: OUT-mirror)")
    p.add_argument("--auth-file", help='PACS sources: JSON {"token": ...} or {"username": ..., "password": ...}')
    p.add_argument("--modality", help="PACS sources: only series of this modality, e.g. CT")
    p.add_argument("--study-date-from", help="PACS sources: YYYYMMDD")
    p.add_argument("--study-date-to", help="PACS sources: YYYYMMDD")
    p.set_defaults(func=run)


def _pull_pacs(args, salt: str | None) -> str:
    """Fetch the PACS' new series into the mirror; returns the folder to ingest."""
    from voxsearch.ingest.dicomweb import DicomWebConfig, pull_for_catalog

    config = DicomWebConfig(url=args.archive, auth_file=args.auth_file, modality=args.modality,
                            study_date_from=args.study_date_from, study_date_to=args.study_date_to, salt=salt or "")
    mirror, pulled = pull_for_catalog(config, args.out, args.mirror, progress=not args.no_progress)
    for _, reason in pulled.errors:
        print(f"  FAILED [fetch] {reason}")
    print(f"PACS: {pulled.listed} series listed, {len(pulled.added)} new, {len(pulled.changed)} changed, "
          f"{len(pulled.errors)} failed to fetch")
    mirror.series_dir.mkdir(parents=True, exist_ok=True)
    return str(mirror.series_dir)


def run(args) -> int:
    from pathlib import Path

    from voxsearch.ingest import IngestConfig, read_errors, run_ingest
    from voxsearch.ingest.dicomweb import is_dicomweb_url
    from voxsearch.ingest.discover import keep_columns

    kwargs = {}
    if args.max_voxels:
        kwargs["max_voxels"] = args.max_voxels
    if args.no_check_preprocess:
        kwargs["check_preprocess"] = None
    salt = Path(args.salt_file).read_text().strip() if args.salt_file else None
    try:
        keep_columns(args.keep_column)  # refused before a PACS pull, not after it
        archive = args.archive
        if is_dicomweb_url(archive):
            archive = _pull_pacs(args, salt)
        cfg = IngestConfig(archive=archive, out=args.out, manifest=args.manifest, engine=args.engine,
                           workers=args.workers, ray_address=args.ray_address, salt=salt,
                           progress=not args.no_progress, keep_columns=tuple(args.keep_column), **kwargs)
        summary = run_ingest(cfg)
    except (FileNotFoundError, ValueError) as exc:
        print(f"voxsearch ingest: {exc}")
        return 2
    print(json.dumps(summary.to_dict(), indent=1))
    if summary.failed:
        errors = read_errors(summary.catalog)
        shown = errors.filter(errors.column("severity").to_pandas().eq("error").to_numpy()).slice(0, 10)
        for row in shown.to_pylist():
            print(f"  FAILED [{row['stage']}] {row['reason']}")
        print(f"{summary.failed} input(s) failed; all errors: voxsearch.ingest.read_errors('{summary.catalog}')")
        return 1
    return 0
