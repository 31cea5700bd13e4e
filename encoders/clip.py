"""Contrastive image-text model: DCFormer + HF text tower, linear projections to a shared width, L2 norm."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .dcformer import DCFormer, dcformer
from .inference import fold_batchnorm, inference_context
from .siglip import MODES, SigLipLoss
from .text import TextTower, TextTowerConfig


@dataclass
class ClipConfig:
    vision_variant: str = "small"
    embed_dim: int = 768
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    loss_mode: str = "med3dvlm"
    init_t_prime: float = math.log(10)
    init_bias: float = -10.0
    image_size: tuple[int, int, int] = (128, 256, 256)  # (D, H, W) the model is trained and used at

    def __post_init__(self):
        if isinstance(self.text, dict):
            self.text = TextTowerConfig.from_dict(self.text)
        self.image_size = tuple(int(s) for s in self.image_size)
        if self.loss_mode not in MODES:
            raise ValueError(f"unknown loss_mode {self.loss_mode!r}; choose one of {MODES}")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}")
        if len(self.image_size) != 3:
            raise ValueError(f"image_size must be (D, H, W), got {self.image_size}")

    def to_dict(self) -> dict:
        return {
            "vision_variant": self.vision_variant,
            "embed_dim": self.embed_dim,
            "text": self.text.to_dict(),
            "loss_mode": self.loss_mode,
            "init_t_prime": self.init_t_prime,
            "init_bias": self.init_bias,
            "image_size": list(self.image_size),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ClipConfig":
        return cls(**d)


class ClipModel(nn.Module):
    def __init__(self, cfg: ClipConfig | None = None, load_text_weights: bool = True):
        super().__init__()
        self.config = cfg or ClipConfig()
        self.vision: DCFormer = dcformer(self.config.vision_variant)
        self.text = TextTower(self.config.text, load_weights=load_text_weights)
        self.vision_proj = nn.Linear(self.vision.channels[-1], self.config.embed_dim)
        self.text_proj = nn.Linear(self.text.hidden_size, self.config.embed_dim)
        self.t_prime = nn.Parameter(torch.tensor(float(self.config.init_t_prime)))
        self.bias = nn.Parameter(torch.tensor(float(self.config.init_bias)))
        self.criterion = SigLipLoss(self.config.loss_mode)

    @property
    def device(self) -> torch.device:
        return self.vision_proj.weight.device

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, E), L2-normalised: mean of the last stage's tokens, projected."""
        # The mean over the last stage's tokens, taken on the spatial map: token order does not matter.
        pooled = self.vision.feature_maps(x)[-1].mean(dim=(2, 3, 4))
        return F.normalize(self.vision_proj(pooled), dim=-1)

    def encode_text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(input_ids, attention_mask)), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        enc = self.text.tokenize(texts)
        return self.encode_text_tokens(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text_tokens(input_ids, attention_mask)

    def loss(self, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
        """SigLIP loss with this model's t' and b (chunked across ranks when a process group is active)."""
        return self.criterion(img_emb, txt_emb, self.t_prime, self.bias)

    def prepare_for_inference(self) -> "ClipModel":
        """Eval mode with every BatchNorm folded into its convolution; pair with ``inference()``."""
        self.eval()
        fold_batchnorm(self.vision)
        return self

    def inference(self):
        """Context for fast inference on this model's device (inference_mode; bf16 autocast on CUDA)."""
        return inference_context(self.device)
