"""voxsearch.encoders: DCFormer image encoder, text tower, CLIP model, SigLIP loss, checkpoints, importers."""

from .checkpoint import (
    ClipCheckpoint,
    FindingHead,
    export_clip,
    load_clip,
    model_id,
    open_checkpoint,
    read_clip_meta,
    read_finding_head,
    save_clip,
)
from .clip import ClipConfig, ClipModel
from .dcformer import VARIANTS, DCFormer, DCFormerSpec, count_parameters, dcformer
from .inference import fold_batchnorm, inference_context
from .med3dvlm import import_med3dvlm_clip, load_med3dvlm_dcformer, load_med3dvlm_projector
from .pretrained import packaged_checkpoint
from .projector import MixerProjector, MixerProjectorConfig
from .siglip import SigLipLoss, distributed_siglip_loss, siglip_loss
from .statedict import CheckpointMismatchError, read_state_dict
from .text import TextTower, TextTowerConfig

__all__ = [
    "CheckpointMismatchError", "ClipCheckpoint", "ClipConfig", "ClipModel", "DCFormer", "DCFormerSpec",
    "FindingHead", "MixerProjector", "MixerProjectorConfig", "SigLipLoss", "TextTower", "TextTowerConfig",
    "VARIANTS", "count_parameters", "dcformer", "distributed_siglip_loss", "export_clip", "fold_batchnorm",
    "import_med3dvlm_clip", "inference_context", "load_clip", "load_med3dvlm_dcformer",
    "load_med3dvlm_projector", "model_id", "open_checkpoint", "packaged_checkpoint", "read_clip_meta",
    "read_finding_head", "read_state_dict", "save_clip", "siglip_loss",
]
