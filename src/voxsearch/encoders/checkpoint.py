"""The project's own CLIP checkpoint format: one self-contained directory.

    model.safetensors   every tensor of the ClipModel (vision, text encoder, projections, t', b)
    config.json         {"format": "voxsearch-clip", "format_version": 1, "clip_config": ..., "extra": ...}
    text/               the text tower's HF config and tokenizer (weights live in model.safetensors)

A checkpoint whose text tower is the packaged MiniLM, unchanged (trained frozen), can be exported
without it (``export_clip(..., packaged_text=True)``): a few MB instead of ~100, small enough to ship
inside the voxsearch package; loading takes the text weights from the installed package.

Directories are written to a temporary sibling and renamed into place, so a reader never sees half a
checkpoint and a failed save leaves the previous one intact.

Every reader also takes the ``s3://`` or ``gs://`` URI of a checkpoint folder: workers on a cluster need
not see the driver's files. It is read from a local copy, downloaded once per machine and again when the
objects change (voxsearch.common.cache); errors name the URI. The copy holds the same bytes, so the
model id is that of the folder that was uploaded.

Whatever feeds a checkpoint scans (embedding, serving, search, evaluation, the report model's vision init)
opens it with ``open_checkpoint``: one ``ClipCheckpoint`` holds the model config, the preprocessing
contract and the model id, read and checked once, so none of them can re-derive the contract differently.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from voxsearch.common.cache import local_folder
from voxsearch.common.durable import replace_dir
from voxsearch.common.hashing import sha256_file

from .clip import ClipConfig, ClipModel
from .inference import is_folded
from .statedict import check_layout

FORMAT_NAME = "voxsearch-clip"
FORMAT_VERSION = 1
TEXT_SUBDIR = "text"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_clip(model: ClipModel, directory: str | Path, extra: dict | None = None, packaged_text: bool = False) -> Path:
    """Write ``model`` to ``directory`` (replaced atomically if it exists); ``extra`` is stored verbatim.
    ``packaged_text``: leave the text tower out, to be loaded from the installed package (see export_clip)."""
    from safetensors.torch import save_file

    if is_folded(model):
        raise ValueError("cannot save a model whose BatchNorms were folded for inference; save it before "
                         "prepare_for_inference()")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    # Relative: the directory carries its own text tower files, unless they come from the package.
    cfg["text"]["path"] = None if packaged_text else TEXT_SUBDIR
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "clip_config": cfg, "extra": extra or {}}
    if packaged_text:
        meta["text_weights"] = "packaged"
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"extra metadata for {directory} is not JSON-serialisable: {exc}") from exc

    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        # Clone so tied or shared tensors become separate blobs that safetensors accepts.
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
                   if not (packaged_text and k.startswith("text."))}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT_NAME})
        if not packaged_text:
            model.text.save_pretrained_files(tmp / TEXT_SUBDIR)
        (tmp / CONFIG).write_text(meta_text)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def export_clip(src: str | Path, dest: str | Path, packaged_text: bool = True) -> Path:
    """Copy checkpoint ``src`` to ``dest``; with ``packaged_text`` leave out the text tower, which must then
    be the packaged default tower with its weights unchanged (checked tensor by tensor)."""
    local, name = local_folder(src)
    meta = _read_meta(local, name)[0]
    model = _build_model(local, meta, _clip_config(local, meta, name), "cpu", name)
    extra = meta.get("extra")
    if packaged_text:
        from .text import TextTower, TextTowerConfig

        reference = TextTower(TextTowerConfig(pooling=model.config.text.pooling,
                                              max_length=model.config.text.max_length)).state_dict()
        mine = model.text.state_dict()
        if set(reference) != set(mine) or any(not torch.equal(reference[k], mine[k]) for k in reference):
            raise ValueError(f"{name}: its text tower is not the packaged one unchanged (trained or another model); "
                             "export it with its text weights")
    return save_clip(model, dest, extra=extra, packaged_text=packaged_text)


def read_clip_meta(directory: str | Path) -> dict:
    """The checkpoint's config.json (format, version, clip_config, extra); checks format and version."""
    return _read_meta(*local_folder(directory))[0]


def _read_meta(directory: Path, name: str) -> tuple[dict, bytes]:
    """config.json parsed and checked, with its bytes (part of the model id)."""
    path = f"{name}/{CONFIG}"
    if not (directory / CONFIG).is_file():
        raise FileNotFoundError(f"{name} is not a voxsearch CLIP checkpoint (no {CONFIG})")
    raw = (directory / CONFIG).read_bytes()
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt checkpoint config {path}: {exc}") from exc
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {meta.get('format_version')!r}; this voxsearch reads up to {FORMAT_VERSION}"
        )
    return meta, raw


def _clip_config(directory: Path, meta: dict, name: str) -> ClipConfig:
    """The model config of a checkpoint, its text tower path made absolute (the directory carries it)."""
    try:
        cfg = dict(meta["clip_config"])
        if meta.get("text_weights") != "packaged":
            cfg["text"] = dict(cfg["text"], path=str(directory / cfg["text"]["path"]))
        return ClipConfig.from_dict(cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{name}/{CONFIG}: unusable clip_config ({type(exc).__name__}: {exc})") from exc


def _build_model(directory: Path, meta: dict, config: ClipConfig, device: str | torch.device, name: str) -> ClipModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    packaged_text = meta.get("text_weights") == "packaged"
    model = ClipModel(config, load_text_weights=packaged_text)
    try:
        state = load_file(str(directory / WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"cannot read weights {name}/{WEIGHTS}: {exc}") from exc
    expected = {k: v.shape for k, v in model.state_dict().items() if not (packaged_text and k.startswith("text."))}
    check_layout(f"{name}/{WEIGHTS}", state, expected)
    model.load_state_dict(state, strict=not packaged_text)
    return model.to(device).eval()


def load_clip(directory: str | Path, device: str | torch.device = "cpu") -> ClipModel:
    """A ``ClipModel`` in eval mode from a directory written by ``save_clip`` (no other path needed).

    The model alone, for training, which brings its own preprocessing; whatever feeds the model scans by
    the checkpoint's own contract opens it with ``open_checkpoint``."""
    local, name = local_folder(directory)
    meta = _read_meta(local, name)[0]
    return _build_model(local, meta, _clip_config(local, meta, name), device, name)


# A calibrated threshold this high means the label's calls never reached the wanted precision on held-out
# studies (training/evaluate.finding_thresholds): the head calls it only when very sure.
UNRELIABLE_THRESHOLD = 0.95


class FindingHead:
    """A checkpoint's finding read-out as plain arrays: probabilities from stored embeddings without
    loading the model (the search front end holds it)."""

    def __init__(self, labels, weight, bias, thresholds=None):
        import numpy as np

        self.labels = tuple(labels)
        self.weight = np.asarray(weight, dtype=np.float32)
        self.bias = np.asarray(bias, dtype=np.float32)
        # Per-label decision thresholds chosen on held-out studies (a head trained on rare labels is
        # under-confident: 0.5 would hide most true findings); 0.5 where the checkpoint has none.
        self.thresholds = np.asarray(thresholds if thresholds is not None else [0.5] * len(self.labels),
                                     dtype=np.float32)

    @property
    def reliable_labels(self) -> frozenset[str]:
        """Labels whose calibrated calls were right often enough on held-out studies. A head with none
        would call nothing on almost every scan: drafting leaves such a head out."""
        return frozenset(label for label, t in zip(self.labels, self.thresholds) if t < UNRELIABLE_THRESHOLD)

    def probabilities(self, vectors):
        import numpy as np

        logits = np.asarray(vectors, dtype=np.float32) @ self.weight.T + self.bias
        return 1.0 / (1.0 + np.exp(-logits))

    def describe(self, vector, limit: int = 5) -> list[dict]:
        """The findings the head calls present in one study (probability at or above the label's threshold),
        most probable first: [{"finding", "label", "probability"}]."""
        probs = self.probabilities(vector[None])[0]
        order = [int(i) for i in probs.argsort()[::-1] if probs[i] >= self.thresholds[i]][:limit]
        out = []
        for i in order:
            kind, _, organ = self.labels[i].partition("|")
            out.append({"finding": f"{kind} in the {organ}" if organ else kind, "label": self.labels[i],
                        "probability": round(float(probs[i]), 3)})
        return out


def _preprocess_contract(name: str, meta: dict, image_size: tuple[int, ...]) -> dict:
    """The preprocessing the model was trained with (``extra["preprocess"]``, a dict that
    ``voxsearch.ingest.PreprocessConfig.from_dict`` reads), else the defaults at the model's image size.

    A stored contract whose spatial size is not the model's image size is refused: every volume it makes
    would be refused by the model's users, or, worse, embedded at a size the model was not trained at."""
    stored = (meta.get("extra") or {}).get("preprocess")
    if not stored:
        return {"spatial_size": list(image_size)}
    if not isinstance(stored, dict):
        raise ValueError(f"{name}/{CONFIG}: extra.preprocess is not a mapping")
    if not stored.get("spatial_size"):
        # Without a size the contract means the model's own, not whatever default the preprocessing has.
        return {**copy.deepcopy(stored), "spatial_size": list(image_size)}
    try:
        size = tuple(int(s) for s in stored["spatial_size"])
    except (TypeError, ValueError):
        raise ValueError(f"{name}/{CONFIG}: extra.preprocess.spatial_size {stored['spatial_size']!r} "
                         "is not a list of integers") from None
    if size != tuple(image_size):
        raise ValueError(f"checkpoint {name}: preprocess spatial_size {size} differs from the model's "
                         f"image_size {tuple(image_size)}")
    return copy.deepcopy(stored)


@dataclass(frozen=True, eq=False)
class ClipCheckpoint:
    """A CLIP checkpoint as its users need it: model config, preprocessing contract and model id, read
    and checked once. The weights are read only by ``load_model``: the search front end and the embed
    driver need the contract, not the model."""

    path: Path  # the folder read: for a checkpoint in object storage, its local copy
    source: str  # the folder or URI it was opened by, for messages
    config: ClipConfig
    preprocess: dict  # PreprocessConfig-compatible: build the ingest config from it, leave it unchanged
    meta: dict = field(repr=False)  # config.json as stored
    meta_bytes: bytes = field(repr=False)

    @property
    def image_size(self) -> tuple[int, int, int]:
        return tuple(self.config.image_size)

    @property
    def embed_dim(self) -> int:
        return int(self.config.embed_dim)

    @cached_property
    def model_id(self) -> str:
        """Short stable id: hash of config.json and of the weights file's digest (the weights are read
        once, on first use)."""
        return _model_id(self.path, self.meta_bytes)

    def load_model(self, device: str | torch.device = "cpu", inference: bool = False) -> ClipModel:
        """The ``ClipModel`` in eval mode; ``inference``: BatchNorms folded too (``prepare_for_inference``),
        for embedding and serving (such a model cannot be saved or trained)."""
        model = _build_model(self.path, self.meta, self.config, device, self.source)
        return model.prepare_for_inference() if inference else model

    def finding_head(self) -> FindingHead | None:
        """The finding head as plain arrays, or None when the model was trained without finding labels."""
        return _finding_head(self.path, self.meta)


def open_checkpoint(directory: str | Path) -> ClipCheckpoint:
    """Read and check a checkpoint directory or s3:// / gs:// URI (format, model config, preprocessing
    contract); ValueError or FileNotFoundError naming it when it cannot be used, OSError naming the URI
    when it cannot be fetched."""
    local, name = local_folder(directory)
    meta, raw = _read_meta(local, name)
    config = _clip_config(local, meta, name)
    preprocess = _preprocess_contract(name, meta, config.image_size)
    return ClipCheckpoint(local, name, config, preprocess, meta, raw)


def read_finding_head(directory: str | Path) -> FindingHead | None:
    """The checkpoint's finding head, or None when it was trained without finding labels."""
    local, name = local_folder(directory)
    return _finding_head(local, _read_meta(local, name)[0])


def _finding_head(directory: Path, meta: dict) -> FindingHead | None:
    from safetensors import safe_open

    labels = meta["clip_config"].get("finding_labels") or []
    if not labels:
        return None
    thresholds = (meta.get("extra") or {}).get("finding_thresholds")
    with safe_open(str(directory / WEIGHTS), framework="np") as f:
        return FindingHead(labels, f.get_tensor("finding_head.weight"), f.get_tensor("finding_head.bias"),
                           thresholds if thresholds is not None and len(thresholds) == len(labels) else None)


def model_id(directory: str | Path) -> str:
    """Short stable id of a checkpoint: hash of its config.json and its weights file's digest."""
    local, name = local_folder(directory)
    return _model_id(local, _read_meta(local, name)[1])


def _model_id(directory: Path, meta_bytes: bytes) -> str:
    digest = hashlib.sha256()
    digest.update(meta_bytes)
    digest.update(sha256_file(directory / WEIGHTS).encode())
    return digest.hexdigest()[:16]
