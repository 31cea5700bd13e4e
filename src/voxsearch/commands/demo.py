"""`voxsearch demo`: the whole pipeline on a synthetic archive, then the web page on 127.0.0.1."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# The packaged model was trained on other seeds' phantoms: the demo's studies are new to it.
DEMO_SEED = 2026

# Findings the synthetic archive plants (voxsearch.ingest.synth_vocab), phrased as a user would.
EXAMPLE_QUERIES = (
    "liver metastases",
    "nodule in the right lung",
    "brain hemorrhage",
    "kidney stone",
    "normal chest CT",
)


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="synthetic archive -> ingest -> model -> embed -> index -> serve, in a few minutes",
        description=(
            "Run every stage on a generated archive of phantom CT and MR studies and serve the result on "
            "127.0.0.1. Finished stages are reused on the next run (delete --dir, or pass --fresh, to redo "
            "them). The model is the packaged one (trained by the project on other phantoms; see "
            "voxsearch/encoders/pretrained/*/TRAINED.json) unless --train asks for one trained here; an existing "
            "checkpoint in DIR/checkpoint is used as it is.\n\n"
            "example: voxsearch demo --dir ./voxsearch-demo --port 8000\n"
            "         voxsearch demo --no-serve            # build everything, serve nothing"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dir", default="voxsearch-demo", help="working folder (default ./voxsearch-demo)")
    p.add_argument("--studies", type=int, default=300, help="synthetic studies to generate (default 300)")
    p.add_argument("--train", action="store_true",
                   help="train a model on the demo archive (quick preset) instead of using the packaged one")
    p.add_argument("--epochs", type=int, default=None, help="training epochs with --train (default: the quick preset's)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--fresh", action="store_true", help="redo every stage even if its output exists")
    p.add_argument("--no-serve", action="store_true", help="stop after building the index")
    p.add_argument("--exit-after", type=float, metavar="SECONDS", help="stop serving after this many seconds")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=run)


class _Stage:
    def __init__(self, n: int, total: int, what: str):
        self.label = f"[{n}/{total}] {what}"

    def __enter__(self):
        print(f"{self.label} ...", flush=True)
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            print(f"{self.label}: done in {time.perf_counter() - self.started:.0f}s", flush=True)
        return False


def _skip(label: str, path: Path) -> None:
    print(f"{label}: reusing {path}", flush=True)


def run(args) -> int:
    import shutil

    from voxsearch.common.runtime import RayConfig, init_ray_while

    root = Path(args.dir).resolve()
    if args.fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    archive, catalog, train_out = root / "archive", root / "catalog", root / "training"
    checkpoint, embeddings, index = root / "checkpoint", root / "embeddings", root / "index"
    total = 4 if args.no_serve else 5
    started = time.perf_counter()

    def synthesize() -> None:
        if (archive / "manifest.csv").is_file():
            _skip("[1] synthetic archive", archive)
            return
        from voxsearch.ingest import SynthConfig, generate_archive

        with _Stage(1, total, f"generating {args.studies} synthetic studies"):
            generate_archive(SynthConfig(n=args.studies, seed=DEMO_SEED, out=archive))

    init_ray_while(synthesize, RayConfig(address=args.ray_address))

    from voxsearch.ingest import IngestConfig, read_catalog, run_ingest

    if catalog.is_dir() and any(catalog.iterdir()):
        _skip("[2] catalog", catalog)
    else:
        with _Stage(2, total, "ingesting (de-identify, validate, catalog)"):
            summary = run_ingest(IngestConfig(archive=archive, out=catalog))
            print(f"    added {summary.added}, skipped {summary.skipped}, failed {summary.failed}", flush=True)

    if (checkpoint / "config.json").is_file():
        _skip("[3] checkpoint", checkpoint)
    elif not args.train:
        from voxsearch.encoders import packaged_checkpoint

        with _Stage(3, total, "using the packaged model (--train trains one here instead)"):
            shutil.copytree(packaged_checkpoint(), checkpoint)
    else:
        from voxsearch.training import preset, train_clip

        overrides = {"epochs": args.epochs} if args.epochs else {}
        with _Stage(3, total, "training the CLIP model (quick preset)"):
            result = train_clip(preset("quick", catalog, train_out, ray_address=args.ray_address, **overrides))
            if checkpoint.exists():
                shutil.rmtree(checkpoint)
            shutil.copytree(result.checkpoint_dir, checkpoint)

    if (index / "CURRENT").is_file():
        _skip("[4] embeddings and index", index)
    else:
        from voxsearch.embed import EmbedConfig, run_embedding

        with _Stage(4, total, "embedding every study and building the index"):
            summary = run_embedding(EmbedConfig(catalog=catalog, checkpoint=checkpoint, out=embeddings, index=index,
                                                ray=RayConfig(address=args.ray_address)))
            print(f"    embedded {summary.embedded}, failed {summary.failed}; index: {summary.index}", flush=True)
    print(f"pipeline ready in {time.perf_counter() - started:.0f}s: {root}", flush=True)
    if args.no_serve:
        return 0

    from voxsearch.serve.app import serve_until_stopped
    from voxsearch.serve.config import ServeConfig

    rows = read_catalog(catalog).num_rows
    config = ServeConfig(index=str(index), checkpoint=str(checkpoint), catalog=str(catalog),
                         data_dir=str(root / "added"), host="127.0.0.1", port=args.port)

    def banner(url: str) -> None:
        print(f"\n{rows} studies indexed. Open {url}/ in a browser and try:", flush=True)
        for query in EXAMPLE_QUERIES:
            print(f"  - {query}", flush=True)
        print(
            "or from a shell:\n"
            f"  curl -s {url}/api/v1/search/text -H 'content-type: application/json' "
            f"-d '{{\"query\": \"{EXAMPLE_QUERIES[0]}\", \"k\": 5}}'\n"
            f"  curl -s {url}/api/v1/search/scan -F file=@SCAN.nii.gz -F k=5",
            flush=True,
        )

    print(f"[{total}/{total}] serving on 127.0.0.1:{args.port}", flush=True)
    return serve_until_stopped(config, args.ray_address, args.exit_after, banner)
