"""Helpers shared by the embed tests: a random-weight checkpoint (no training) and folder readers."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_SIZE = (32, 64, 64)
EMBED_DIM = 32


def make_checkpoint(directory: Path) -> Path:
    """A DCFormer-nano CLIP with random projections, saved with the preprocessing it expects.
    Reused when it already exists (several test modules share one per session)."""
    if (directory / "config.json").is_file():
        return directory
    import torch

    from voxsearch.encoders import ClipConfig, ClipModel, save_clip
    from voxsearch.ingest import PreprocessConfig

    torch.manual_seed(0)
    model = ClipModel(ClipConfig(vision_variant="nano", embed_dim=EMBED_DIM, image_size=IMAGE_SIZE))
    return save_clip(model, directory, extra={"preprocess": PreprocessConfig(spatial_size=IMAGE_SIZE).to_dict()})


def shard_table(folder: Path, errors: bool = False) -> pa.Table:
    """Every row of the folder's embedding (or error) shards, one file at a time (no dedup)."""
    folder = folder / "_errors" if errors else folder
    files = sorted(folder.glob("part-*.parquet"))
    if not files:
        return pa.table({"id": pa.array([], pa.string())})
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def ids_of(folder: Path, errors: bool = False) -> list[str]:
    return shard_table(folder, errors).column("id").to_pylist()
