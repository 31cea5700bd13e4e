"""Reading state dicts from files or checkpoint directories, and checking them against an expected layout."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Mapping

import torch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the layout a model expects; the message names them."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], wrong_shape: list[str]):
        self.missing, self.unexpected, self.wrong_shape = missing, unexpected, wrong_shape
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if names:
                shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
                parts.append(f"{len(names)} {label}: {shown}")
        super().__init__(f"checkpoint {source} does not match the model layout; " + "; ".join(parts))


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors/.bin/.pt file, or a directory holding one (sharded or not)."""
    path = Path(path)
    if path.is_file():
        from safetensors import SafetensorError

        try:
            return _load_file(path)
        except (OSError, RuntimeError, ValueError, SafetensorError, pickle.UnpicklingError) as exc:
            raise ValueError(f"cannot read checkpoint file {path}: {exc}") from exc
    if path.is_dir():
        for index_name in SHARD_INDEXES:
            index = path / index_name
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                state: dict[str, torch.Tensor] = {}
                for shard in shards:
                    state.update(read_state_dict(path / shard))
                return state
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return read_state_dict(path / name)
        raise FileNotFoundError(f"no weights in {path} (looked for {', '.join(WEIGHT_FILES + SHARD_INDEXES)})")
    raise FileNotFoundError(f"checkpoint {path} does not exist")


def check_layout(source: str, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> None:
    """Raise ``CheckpointMismatchError`` unless ``state`` has exactly the ``expected`` names and shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or wrong:
        raise CheckpointMismatchError(source, missing, unexpected, wrong)


def strip_prefix(state: Mapping[str, torch.Tensor], anchor: str, source: str) -> dict[str, torch.Tensor]:
    """Find the one prefix before ``anchor`` (a name every matching checkpoint has) and keep only the
    tensors under it, without the prefix. Lets one loader accept bare, ``vision_encoder.`` or deeper names."""
    prefixes = {k[: -len(anchor)] for k in state if k.endswith(anchor)}
    prefixes = {p for p in prefixes if p == "" or p.endswith(".")}
    if not prefixes:
        raise CheckpointMismatchError(source, [anchor], [], [])
    if len(prefixes) > 1:
        raise ValueError(f"checkpoint {source} holds several candidate modules: prefixes {sorted(prefixes)}")
    (prefix,) = prefixes
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
