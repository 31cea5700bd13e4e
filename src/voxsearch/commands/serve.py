"""`voxsearch serve`: the search API and web page on Ray Serve."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the search API and web page (Ray Serve)",
        description=(
            "Serve text and similar-case search, study viewing, report drafts and new-study embedding over "
            "HTTP, with a web page at /. Replicas, resources, limits and API keys come from --config "
            "(JSON or YAML); command-line options override it.\n\n"
            "example: voxsearch serve --index out/index --checkpoint out/ckpt --catalog out/catalog --port 8000"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--index", help="index directory (written by `voxsearch index`), or its s3:// / gs:// URI")
    p.add_argument("--checkpoint", help="CLIP checkpoint directory (written by training), or its s3:// / gs:// URI")
    p.add_argument("--catalog", help="catalog directory (written by `voxsearch ingest`), or its s3:// / gs:// URI")
    p.add_argument("--config", help="serve config file (.json, .yaml); see the README for its keys")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; other addresses require API keys)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--report-model", help="report model directory, or its s3:// / gs:// URI; without it drafts are "
                   "retrieval-based")
    p.add_argument("--data-dir", help="where studies added through /api/v1/embed are kept (default: beside the index; "
                   "required for an index on object storage)")
    p.add_argument("--api-keys-file", help="file with one API key per line")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--exit-after", type=float, metavar="SECONDS",
                   help="stop after this many seconds (for scripts and smoke tests); default: until Ctrl-C")
    p.set_defaults(func=run)


def config_from_args(args):
    from voxsearch.serve.config import ServeConfig, load_serve_config

    config = load_serve_config(args.config) if args.config else ServeConfig()
    overrides = {
        "index": args.index, "checkpoint": args.checkpoint, "catalog": args.catalog, "host": args.host,
        "port": args.port, "report_model": args.report_model, "data_dir": args.data_dir,
        "api_keys_file": args.api_keys_file,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    return config


def run(args) -> int:
    from voxsearch.serve.config import ServeConfigError

    try:
        config = config_from_args(args)
        config.validate()
    except ServeConfigError as exc:
        print(f"voxsearch serve: {exc}")
        return 2
    from voxsearch.serve.app import serve_until_stopped

    return serve_until_stopped(config, args.ray_address, args.exit_after)
