"""DCFormer: the 3-D image encoder of Med3DVLM, built from decomposed (three parallel 1-D) convolutions.

Module and parameter names follow the published model (``encoder.s0.0.0.c1.0.weight``, ...) so that its
checkpoints load by name. The published encoder permutes its input from (D, H, W) to (H, W, D) before the
first convolution, so the ``c1``/``c2``/``c3`` branches run along H, W and D respectively; we keep that
internal layout, otherwise the published 1-D kernels would act along the wrong axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DCFormerSpec:
    """One member of the published family: blocks and channels per stage (stage 0 is the stem)."""

    depths: tuple[int, int, int, int, int]
    channels: tuple[int, int, int, int, int]
    kernel_sizes: tuple[int, int, int, int] = (13, 11, 9, 7)  # depthwise kernel of stages 1..4
    mlp_ratio: int = 4


VARIANTS: dict[str, DCFormerSpec] = {
    "nano": DCFormerSpec((1, 1, 1, 1, 1), (32, 32, 64, 128, 256)),
    "naive": DCFormerSpec((1, 2, 2, 2, 2), (32, 64, 128, 256, 512)),
    "tiny": DCFormerSpec((1, 2, 3, 3, 2), (64, 96, 192, 384, 768)),
    "small": DCFormerSpec((1, 2, 3, 6, 2), (64, 96, 192, 384, 768)),
    "base": DCFormerSpec((1, 2, 6, 6, 2), (64, 128, 256, 512, 1024)),
    "large": DCFormerSpec((1, 2, 6, 12, 2), (64, 256, 512, 1024, 2048)),
}

# Stem stride 4, then four max-pools of stride 2: sizes divisible by this give exact halvings.
TOTAL_STRIDE = 64


class DecompConv3d(nn.Module):
    """A k*k*k convolution replaced by the sum of three 1-D convolutions (each with bias and BatchNorm)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__()
        pad = kernel_size // 2
        for name, axis in (("c1", 0), ("c2", 1), ("c3", 2)):
            kernel = [1, 1, 1]
            padding = [0, 0, 0]
            kernel[axis], padding[axis] = kernel_size, pad
            branch = nn.Sequential(
                nn.Conv3d(in_ch, out_ch, tuple(kernel), stride=stride, padding=tuple(padding), groups=groups),
                nn.BatchNorm3d(out_ch),
            )
            self.add_module(name, branch)
        self.lines_as_matmul = False

    def use_lines_as_matmul(self) -> bool:
        """Compute this unit as line gathers and one small matrix product per branch, channels-last out
        (see _lines_as_matmul); only for a folded unit with one input channel. Returns whether it applies."""
        convs = [getattr(self, name)[0] for name in ("c1", "c2", "c3")]
        folded = all(isinstance(getattr(self, name)[1], nn.Identity) for name in ("c1", "c2", "c3"))
        self.lines_as_matmul = folded and all(c.in_channels == 1 and c.groups == 1 for c in convs)
        return self.lines_as_matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lines_as_matmul:
            return self._lines_as_matmul(x)
        # Summed into the first branch's output: no second full-size buffer (the stem's maps are 32 MiB
        # each at 128x256x256, and allocating them costs more than adding). Autograd allows it: neither
        # convolution nor BatchNorm keeps its output for the backward pass.
        out = self.c1(x)
        out += self.c2(x)
        out += self.c3(x)
        return out

    def _lines_as_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The same sum for one input channel, computed directly: each branch reads one line of k voxels
        per output voxel, so gather those lines (a strided view: the other two axes are only subsampled)
        and multiply by the (k, C) weights into one channels-last output. The stem's first unit runs its
        stride-4 convolutions on one channel at a small fraction of the CPU's speed; this way it costs
        little more than writing its output."""
        convs = [self.c1[0], self.c2[0], self.c3[0]]
        out = None
        for axis, conv in enumerate(convs):
            stride, pad, k = conv.stride[axis], conv.padding[axis], conv.kernel_size[axis]
            # Along the other two axes the kernel is 1 and there is no padding: every stride-th plane.
            keep = [slice(None)] * 4
            for other in range(3):
                if other != axis:
                    keep[other + 1] = slice(None, None, conv.stride[other])
            volume = x[:, 0][tuple(keep)]  # (B, A0, A1, A2), subsampled
            if pad:
                pads = [0] * 6
                pads[2 * (2 - axis)] = pads[2 * (2 - axis) + 1] = pad
                volume = nn.functional.pad(volume, pads)
            lines = volume.unfold(axis + 1, k, stride)  # (B, O0, O1, O2, k)
            weight = conv.weight.reshape(conv.out_channels, k).t()
            if out is None:
                bias = sum(c.bias for c in convs)
                out = torch.addmm(bias, lines.reshape(-1, k), weight)
            else:
                out.addmm_(lines.reshape(-1, k), weight)
        shape = lines.shape[:4]
        return out.view(*shape, -1).permute(0, 4, 1, 2, 3)


class Mlp(nn.Module):
    """Channel MLP applied to channels-last features; the inner ``mlp`` name matches the checkpoints."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class ConvBlock(nn.Module):
    """Depthwise decomposed conv -> MLP -> per-channel layer scale -> residual (ConvNeXt-style)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, downsample: bool, mlp_ratio: int = 4,
                 layer_scale_init: float = 1e-6):
        super().__init__()
        if downsample:
            self.pool = nn.MaxPool3d(3, 2, 1)
            self.proj = nn.Conv3d(in_ch, out_ch, 1, bias=False)
        elif in_ch != out_ch:
            raise ValueError(f"a block without downsampling keeps its width ({in_ch} != {out_ch})")
        self.downsample = downsample
        self.dwconv = DecompConv3d(out_ch, out_ch, kernel_size, groups=out_ch)
        self.mlp = Mlp(out_ch, out_ch * mlp_ratio)
        self.scale = nn.Parameter(torch.full((out_ch,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = self.proj(self.pool(x))
        y = self.mlp(self.dwconv(x).permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        # x + scale * y in one pass, without a scaled copy of y.
        return torch.addcmul(x, y, self.scale.view(-1, 1, 1, 1))


def make_stem(in_ch: int, out_ch: int) -> nn.Sequential:
    # The published stem has no activation between its four units (its act argument is never set).
    return nn.Sequential(
        DecompConv3d(in_ch, out_ch, 7, stride=4),
        DecompConv3d(out_ch, out_ch, 3),
        DecompConv3d(out_ch, out_ch, 3),
        DecompConv3d(out_ch, out_ch, 3),
    )


class DCFormerEncoder(nn.Module):
    """Stages s0 (stem) .. s4; returns every stage's feature map in the internal (H, W, D) layout."""

    def __init__(self, spec: DCFormerSpec, in_channels: int = 1):
        super().__init__()
        ch = spec.channels
        # The stem is one "block" in every published variant; its depth entry only nests it in a Sequential.
        self.s0 = nn.Sequential(*[make_stem(in_channels if i == 0 else ch[0], ch[0]) for i in range(spec.depths[0])])
        for stage in range(1, 5):
            blocks = [
                ConvBlock(ch[stage - 1] if i == 0 else ch[stage], ch[stage], spec.kernel_sizes[stage - 1],
                          downsample=i == 0, mlp_ratio=spec.mlp_ratio)
                for i in range(spec.depths[stage])
            ]
            self.add_module(f"s{stage}", nn.Sequential(*blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in (self.s0, self.s1, self.s2, self.s3, self.s4):
            x = stage(x)
            maps.append(x)
        return maps


class DCFormer(nn.Module):
    """DCFormer image encoder: (B, 1, D, H, W) -> five stage maps as (B, tokens, C), tokens depth-major.

    ``input_filter`` k > 1 box-filters the input (k x k x k, stride 1) before the stem. The stem's 1-D
    kernels run at stride 4 in all three axes, so each branch reads one line in 16 of every plane: at
    small inputs (32x64x64) a lesion of a few voxels can fall entirely between the lines. The filter
    lets every voxel reach the stem; it has no weights, so published checkpoints load either way, and
    0 (the default) keeps the published computation exactly.
    """

    def __init__(self, spec: DCFormerSpec, in_channels: int = 1, variant: str | None = None,
                 input_filter: int = 0):
        super().__init__()
        if input_filter < 0 or (input_filter > 1 and input_filter % 2 == 0):
            raise ValueError(f"input_filter must be 0, 1 or an odd size, got {input_filter}")
        self.spec = spec
        self.variant = variant
        self.in_channels = in_channels
        self.input_filter = int(input_filter)
        self.channels: list[int] = list(spec.channels)
        self.encoder = DCFormerEncoder(spec, in_channels)
        self.memory_format = torch.contiguous_format

    def use_channels_last(self) -> "DCFormer":
        """Keep weights and activations channels-last (N, H, W, D, C in memory), in place.

        oneDNN's 3-D convolutions run up to twice as fast on this layout, and the blocks' channel MLPs
        read it without a transposing copy (the permute to channels-last becomes a view). Same values,
        same parameter names; only strides change.
        """
        if self.memory_format is torch.channels_last_3d:
            return self
        self.to(memory_format=torch.channels_last_3d)
        # Except the stem's first unit, whose input has one channel: there channels-last gains nothing,
        # and oneDNN (torch 2.13) corrupts the heap on its stride-4 convolutions for batches > 1. Its
        # output is turned channels-last for the rest (convolutions follow their input's layout).
        first = self.encoder.s0[0][0]
        first.to(memory_format=torch.contiguous_format)
        if not first.use_lines_as_matmul():  # that one hands on channels-last itself
            first.register_forward_hook(lambda module, args, out: out.contiguous(memory_format=torch.channels_last_3d))
        self.memory_format = torch.channels_last_3d
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # (B, C, H, W, D) -> (B, D, H, W, C) -> tokens in (D, H, W) order.
        return [m.permute(0, 4, 2, 3, 1).flatten(1, 3) for m in self.feature_maps(x)]

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage maps as (B, C, H', W', D') tensors, skipping the copy into token order (for pooling)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DCFormer expects a (batch, {self.in_channels}, D, H, W) tensor, got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"DCFormer expects a floating-point volume, got dtype {x.dtype}")
        if self.input_filter > 1:
            k = self.input_filter
            x = nn.functional.avg_pool3d(x, k, stride=1, padding=k // 2, count_include_pad=False)
        x = x.permute(0, 1, 3, 4, 2)
        if self.memory_format is torch.channels_last_3d:
            x = x.contiguous()  # the stem reads a permuted view at half speed
        return self.encoder(x)

    @staticmethod
    def stage_shapes(size: tuple[int, int, int]) -> list[tuple[int, int, int]]:
        """Spatial (D, H, W) grid of each stage for an input of ``size``; tokens = product."""
        def conv4(n: int) -> int:
            return (n - 1) // 4 + 1

        def pool(n: int) -> int:
            return (n - 1) // 2 + 1

        grid = tuple(conv4(n) for n in size)
        shapes = [grid]
        for _ in range(4):
            grid = tuple(pool(n) for n in grid)
            shapes.append(grid)
        return shapes


def dcformer(variant: str = "small", in_channels: int = 1, input_filter: int = 0) -> DCFormer:
    """A freshly initialised DCFormer of one published variant (nano, naive, tiny, small, base, large)."""
    try:
        spec = VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown DCFormer variant {variant!r}; choose one of {sorted(VARIANTS)}") from None
    return DCFormer(spec, in_channels=in_channels, variant=variant, input_filter=input_filter)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
