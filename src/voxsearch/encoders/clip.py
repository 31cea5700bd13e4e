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
    input_filter: int = 0  # box pre-filter before the DCFormer stem (see DCFormer); 0 = published
    # Names of the findings the image embedding is also trained to predict ("type|organ"); empty: no head.
    finding_labels: tuple[str, ...] = ()
    # How far a search query leans on the finding head (encode_query); training chooses it on held-out
    # studies, because how well the head ranks a finding against the text embedding differs per model.
    query_finding_weight: float = 1.0
    # A second finding head that reads the tower's pooled features (mean of the last stage, max of the two
    # before it) instead of the embedding. Training only uses its loss: through the 128-d embedding a head
    # left small abdominal lesions at chance that a head on these features learns (bench/recipe_variants.py).
    feature_finding_head: bool = False

    def __post_init__(self):
        self.finding_labels = tuple(str(v) for v in self.finding_labels)
        if isinstance(self.text, dict):
            self.text = TextTowerConfig.from_dict(self.text)
        self.image_size = tuple(int(s) for s in self.image_size)
        if self.loss_mode not in MODES:
            raise ValueError(f"unknown loss_mode {self.loss_mode!r}; choose one of {MODES}")
        self.query_finding_weight = float(self.query_finding_weight)
        if not self.query_finding_weight >= 0:
            raise ValueError(f"query_finding_weight must be >= 0, got {self.query_finding_weight}")
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
            "input_filter": self.input_filter,
            "finding_labels": list(self.finding_labels),
            "query_finding_weight": self.query_finding_weight,
            "feature_finding_head": self.feature_finding_head,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ClipConfig":
        return cls(**d)


def finding_organs(labels) -> list[str]:
    """The organs of "type|organ" labels, sorted: the feature head also predicts "any finding in it"."""
    return sorted({str(label).partition("|")[2] for label in labels})


def finding_organ_matrix(labels) -> torch.Tensor:
    """(len(labels), len(finding_organs)) 0/1: label i is a finding in organ j. Multi-hot labels @ this,
    clamped to 1, are the feature head's "any finding in this organ" targets."""
    organs = finding_organs(labels)
    matrix = torch.zeros(len(labels), len(organs))
    for i, label in enumerate(labels):
        matrix[i, organs.index(str(label).partition("|")[2])] = 1.0
    return matrix


class ClipModel(nn.Module):
    def __init__(self, cfg: ClipConfig | None = None, load_text_weights: bool = True):
        super().__init__()
        self.config = cfg or ClipConfig()
        self.vision: DCFormer = dcformer(self.config.vision_variant, input_filter=self.config.input_filter)
        self.text = TextTower(self.config.text, load_weights=load_text_weights)
        self.vision_proj = nn.Linear(self.vision.channels[-1], self.config.embed_dim)
        self.text_proj = nn.Linear(self.text.hidden_size, self.config.embed_dim)
        self.t_prime = nn.Parameter(torch.tensor(float(self.config.init_t_prime)))
        self.bias = nn.Parameter(torch.tensor(float(self.config.init_bias)))
        self.criterion = SigLipLoss(self.config.loss_mode)
        # A linear read-out of findings from the (normalised) image embedding: training it makes the
        # findings linearly present in the very vector that search compares.
        labels = self.config.finding_labels
        self.finding_head = nn.Linear(self.config.embed_dim, len(labels)) if labels else None
        self.feature_head = self.new_feature_head() if labels and self.config.feature_finding_head else None

    def new_feature_head(self) -> nn.Linear:
        """A fresh feature finding head for this model's labels (see ClipConfig.feature_finding_head)."""
        ch, labels = self.vision.channels, self.config.finding_labels
        return nn.Linear(ch[-1] + ch[-2] + ch[-3], len(labels) + len(finding_organs(labels)))

    @property
    def device(self) -> torch.device:
        return self.vision_proj.weight.device

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, E), L2-normalised: mean of the last stage's tokens, projected."""
        # The mean over the last stage's tokens, taken on the spatial map: token order does not matter.
        pooled = self.vision.feature_maps(x)[-1].mean(dim=(2, 3, 4))
        return F.normalize(self.vision_proj(pooled), dim=-1)

    def _image_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """encode_image, plus the feature head's input when the model has one (one pass over the tower)."""
        maps = self.vision.feature_maps(x)
        pooled = maps[-1].mean(dim=(2, 3, 4))
        img = F.normalize(self.vision_proj(pooled), dim=-1)
        if self.feature_head is None:
            return img, None
        return img, torch.cat([pooled, maps[-2].amax(dim=(2, 3, 4)), maps[-3].amax(dim=(2, 3, 4))], dim=1)

    def encode_text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.project_text(self.text(input_ids, attention_mask))

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled text-tower features (B, hidden) -> (B, E), L2-normalised (a frozen tower's features can
        be computed once and reused every step)."""
        return F.normalize(self.text_proj(features), dim=-1)

    def finding_logits(self, img_emb: torch.Tensor) -> torch.Tensor:
        if self.finding_head is None:
            raise ValueError("this model has no finding head (trained without finding labels)")
        return self.finding_head(img_emb)

    def predict_findings(self, img_emb: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, len(config.finding_labels)) from image embeddings."""
        return torch.sigmoid(self.finding_logits(img_emb))

    def query_labels(self, text: str) -> list[str]:
        """The head's labels that ``text`` asserts (negation-aware; a type without an organ means every
        organ the head knows it in)."""
        from .finding_text import default_matcher

        if self.finding_head is None:
            return []
        named = default_matcher().extract(text)
        return [label for label in self.config.finding_labels
                if any(label.partition("|")[0] == kind and organ in (None, label.partition("|")[2])
                       for kind, organ in named)]

    def encode_query(self, texts: list[str], finding_weight: float | None = None) -> torch.Tensor:
        """Search-query embeddings: the text embedding plus, for each finding the query names, the finding
        head's direction for it times ``finding_weight`` (None: the checkpoint's query_finding_weight).
        Inner product with an image embedding then adds the head's evidence for that finding, so the index
        still ranks by one dot product. Equals encode_text without a head."""
        if finding_weight is None:
            finding_weight = self.config.query_finding_weight
        txt = self.encode_text(texts)
        if self.finding_head is None or finding_weight == 0:
            return txt
        index = {label: i for i, label in enumerate(self.config.finding_labels)}
        directions = F.normalize(self.finding_head.weight.detach(), dim=-1).to(txt.dtype)
        boost = torch.zeros_like(txt)
        for row, text in enumerate(texts):
            for label in self.query_labels(text):
                boost[row] += directions[index[label]]
        return F.normalize(txt + finding_weight * boost, dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        enc = self.text.tokenize(texts)
        return self.encode_text_tokens(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, text_features: torch.Tensor | None = None,
                with_findings: bool = False):
        """(image, text) embeddings, plus finding logits when ``with_findings``. Text comes as tokens or as
        precomputed tower features; one forward for all of it, so DDP sees every trained parameter. With
        findings and a feature head, that head's logits (labels, then finding_organs) come fourth."""
        img, features = self._image_and_features(images)
        if text_features is not None:
            txt = self.project_text(text_features)
        else:
            txt = self.encode_text_tokens(input_ids, attention_mask)
        if with_findings:
            if features is not None:
                return img, txt, self.finding_logits(img), self.feature_head(features)
            return img, txt, self.finding_logits(img)
        return img, txt

    def loss(self, img_emb: torch.Tensor, txt_emb: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """SigLIP loss with this model's t' and b (chunked across ranks when a process group is active).
        ``groups``: one id per pair; pairs of different rows with the same id >= 0 are not negatives."""
        return self.criterion(img_emb, txt_emb, self.t_prime, self.bias, groups=groups)

    def prepare_for_inference(self) -> "ClipModel":
        """Eval mode, every BatchNorm folded into its convolution and the image tower channels-last
        (together 2-3x the unoptimised tower on CPU: bench/encoders.py); pair with ``inference()``."""
        self.eval()
        fold_batchnorm(self.vision)
        self.vision.use_channels_last()
        return self

    def inference(self):
        """Context for fast inference on this model's device (inference_mode; bf16 autocast on CUDA)."""
        return inference_context(self.device)
