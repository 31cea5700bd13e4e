"""Checkpoints shipped inside the package (made by the project's own training; see each one's TRAINED.json)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent / "pretrained"
DEFAULT = "phantom-nano"


def packaged_checkpoint(name: str = DEFAULT) -> Path:
    """The directory of a shipped checkpoint (load it with load_clip)."""
    path = ROOT / name
    if not (path / "config.json").is_file():
        available = sorted(p.name for p in ROOT.iterdir() if (p / "config.json").is_file()) if ROOT.is_dir() else []
        raise FileNotFoundError(f"no packaged checkpoint {name!r}; available: {available or 'none'}")
    return path
