"""The dual-stream MLP-Mixer projector of Med3DVLM: two DCFormer stages -> visual tokens at LLM width.

Names follow the published model (``low_mixer.0.mlp1.mm_projector.1.1.weight``, ...) so its weights load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


class ProjectorMlp(nn.Module):
    """Linear, then (GELU, Linear) pairs; the nesting reproduces the published parameter names."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2):
        super().__init__()
        if depth < 1:
            raise ValueError(f"mlp depth must be >= 1, got {depth}")
        self.mm_projector = nn.Sequential(
            nn.Linear(in_dim, out_dim),
            *[nn.Sequential(nn.GELU(), nn.Linear(out_dim, out_dim)) for _ in range(depth - 1)],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mm_projector(x)


class MixerLayer(nn.Module):
    """Token MLP (tokens n -> n') then channel MLP (d -> d'), each after a LayerNorm over channels.

    The published layer has no residual connections: both MLPs change the size they act on.
    """

    def __init__(self, tokens_in: int, dim_in: int, tokens_out: int, dim_out: int, mlp_depth: int = 2):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim_in)
        self.ln2 = nn.LayerNorm(dim_in)
        self.mlp1 = ProjectorMlp(tokens_in, tokens_out, mlp_depth)
        self.mlp2 = ProjectorMlp(dim_in, dim_out, mlp_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp1(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        return self.mlp2(self.ln2(x))


@dataclass
class MixerProjectorConfig:
    """Defaults are the published projector for a 128x256x256 DCFormer-small input and Qwen2.5-7B."""

    low_input: tuple[int, int] = (256, 384)  # (tokens, channels) of DCFormer stage 3
    high_input: tuple[int, int] = (32, 768)  # (tokens, channels) of DCFormer stage 4
    low_tokens: tuple[int, ...] = (192, 128)
    high_tokens: tuple[int, ...] = (64, 128)
    output_dim: int = 3584
    mlp_depth: int = 2

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "MixerProjectorConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class MixerProjector(nn.Module):
    """Low stream (stage 3) and high stream (stage 4) mixed separately, then concatenated along tokens.

    Layer i of ``depth`` widens the channels to ``output_dim / 2**(depth-1-i)``, so the last layer
    reaches the LLM width.
    """

    def __init__(self, config: MixerProjectorConfig | None = None):
        super().__init__()
        cfg = config or MixerProjectorConfig()
        depth = len(cfg.low_tokens)
        if len(cfg.high_tokens) != depth:
            raise ValueError(f"low_tokens and high_tokens need the same length ({cfg.low_tokens}, {cfg.high_tokens})")
        if cfg.output_dim % (2 ** depth):
            raise ValueError(f"output_dim {cfg.output_dim} must be divisible by 2**{depth}")
        self.config = cfg
        self.low_mixer = self._stream(cfg.low_input, cfg.low_tokens, cfg.output_dim, cfg.mlp_depth)
        self.high_mixer = self._stream(cfg.high_input, cfg.high_tokens, cfg.output_dim, cfg.mlp_depth)

    @staticmethod
    def _stream(inp: tuple[int, int], tokens: tuple[int, ...], out_dim: int, mlp_depth: int) -> nn.ModuleList:
        depth = len(tokens)
        layers = []
        n, d = inp
        for i in range(depth):
            d_out = out_dim // (2 ** (depth - 1 - i))
            layers.append(MixerLayer(n, d, tokens[i], d_out, mlp_depth))
            n, d = tokens[i], d_out
        return nn.ModuleList(layers)

    @property
    def num_tokens(self) -> int:
        return self.config.low_tokens[-1] + self.config.high_tokens[-1]

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """``low`` (B, n_low, c_low), ``high`` (B, n_high, c_high) -> (B, num_tokens, output_dim)."""
        for name, x, expected in (("low", low, self.config.low_input), ("high", high, self.config.high_input)):
            if x.ndim != 3 or tuple(x.shape[1:]) != tuple(expected):
                raise ValueError(
                    f"MixerProjector {name} stream expects (batch, {expected[0]}, {expected[1]}), got "
                    f"{tuple(x.shape)}: the input volume size must match the one the projector was built for"
                )
        for low_layer, high_layer in zip(self.low_mixer, self.high_mixer):
            low = low_layer(low)
            high = high_layer(high)
        return torch.cat([low, high], dim=1)

    def forward_stages(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """Project a DCFormer output: its last two stages are the low and high streams."""
        return self(stages[-2], stages[-1])
