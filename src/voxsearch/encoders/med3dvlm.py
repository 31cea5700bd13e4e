"""Importers for the published Med3DVLM checkpoints (MagicXin/DCFormer_SigLIP, MagicXin/Med3DVLM-*).

Every tensor of the published layouts is mapped by name; a file with missing, extra or misshapen tensors
is refused with a ``CheckpointMismatchError`` that names them, never loaded half-way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from .clip import ClipConfig, ClipModel
from .dcformer import DCFormer, dcformer
from .projector import MixerProjector, MixerProjectorConfig
from .statedict import check_layout, read_state_dict, strip_prefix
from .text import TextTowerConfig

# Published top-level module name -> ours. Order matters: the first matching prefix wins.
CLIP_PREFIXES = (
    ("vision_encoder.", "vision."),
    ("language_encoder.", "text.model."),
    ("mm_vision_proj.", "vision_proj."),
    ("mm_language_proj.", "text_proj."),
    ("t_prime", "t_prime"),
    ("bias", "bias"),
)
DCFORMER_ANCHOR = "encoder.s0.0.0.c1.0.weight"
PROJECTOR_ANCHOR = "low_mixer.0.ln1.weight"


def _to_published(name: str) -> str:
    for published, ours in CLIP_PREFIXES:
        if name.startswith(ours) and (name == ours or ours.endswith(".")):
            return published + name[len(ours):]
    raise KeyError(f"model tensor {name} has no Med3DVLM counterpart")


def _to_ours(name: str) -> str:
    for published, ours in CLIP_PREFIXES:
        if name.startswith(published) and (name == published or published.endswith(".")):
            return ours + name[len(published):]
    raise KeyError(name)


def expected_clip_layout(model: ClipModel) -> dict[str, torch.Size]:
    """Published name -> shape of every tensor the Med3DVLM CLIP checkpoint must hold for ``model``."""
    return {_to_published(k): v.shape for k, v in model.state_dict().items()}


def load_clip_state(model: ClipModel, state: Mapping[str, torch.Tensor], source: str) -> ClipModel:
    """Check ``state`` (published names) against ``model`` and load it; all or nothing."""
    check_layout(source, state, expected_clip_layout(model))
    converted = {_to_ours(k): v for k, v in state.items()}
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(converted, strict=True, assign=on_meta)
    return model


def import_med3dvlm_clip(path: str | Path, text_dir: str | Path, max_length: int = 512) -> ClipModel:
    """The published DCFormer_SigLIP checkpoint as a ``ClipModel`` (eval mode).

    ``text_dir`` is a local directory with the ClinicalBERT (DistilBERT) config and tokenizer; its weights,
    if any, are not used: the checkpoint holds the fine-tuned text encoder.
    """
    state = read_state_dict(path)
    if "mm_vision_proj.weight" not in state:
        raise ValueError(f"{path} is not a Med3DVLM CLIP checkpoint (no mm_vision_proj.weight)")
    cfg = ClipConfig(
        vision_variant="small",
        embed_dim=int(state["mm_vision_proj.weight"].shape[0]),
        # The published model pools the first ([CLS]) token and uses the symmetrised sigmoid loss.
        text=TextTowerConfig(path=str(text_dir), pooling="cls", max_length=max_length),
        loss_mode="med3dvlm",
        image_size=(128, 256, 256),
    )
    model = ClipModel(cfg, load_text_weights=False)
    return load_clip_state(model, state, str(path)).eval()


def load_dcformer_state(model: DCFormer, state: Mapping[str, torch.Tensor], source: str) -> DCFormer:
    """Load DCFormer weights named bare (``encoder.s0...``) or under any prefix (``vision_encoder.``)."""
    bare = strip_prefix(state, DCFORMER_ANCHOR, source)
    check_layout(source, bare, {k: v.shape for k, v in model.state_dict().items()})
    model.load_state_dict(bare, strict=True)
    return model


def load_med3dvlm_dcformer(path: str | Path, variant: str = "small") -> DCFormer:
    """The published DCFormer encoder (from a safetensors/bin file or checkpoint directory), in eval mode."""
    model = dcformer(variant)
    return load_dcformer_state(model, read_state_dict(path), str(path)).eval()


def load_med3dvlm_projector(path: str | Path, config: MixerProjectorConfig | None = None) -> MixerProjector:
    """The published MLP-Mixer projector, bare or under ``model.mm_projector.`` in a merged VLM (eval mode).

    Without ``config`` the LLM width is read from the checkpoint; the other sizes are the published ones.
    """
    state = strip_prefix(read_state_dict(path), PROJECTOR_ANCHOR, str(path))
    if config is None:
        last = f"low_mixer.{_num_layers(state) - 1}.mlp2.mm_projector.0.weight"
        config = MixerProjectorConfig(output_dim=int(state[last].shape[0]))
    model = MixerProjector(config)
    check_layout(str(path), state, {k: v.shape for k, v in model.state_dict().items()})
    model.load_state_dict(state, strict=True)
    return model.eval()


def _num_layers(state: Mapping[str, torch.Tensor]) -> int:
    return 1 + max(int(k.split(".")[1]) for k in state if k.startswith("low_mixer."))

