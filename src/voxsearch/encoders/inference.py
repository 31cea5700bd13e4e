"""Evaluation-time speed-ups: BatchNorm folding and the inference context (no autograd, bf16 on GPU)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _fold_pair(conv: nn.Module, bn: nn.Module) -> None:
    """Rewrite ``conv`` so that conv(x) equals bn(conv(x)) with bn's running statistics."""
    with torch.no_grad():
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(std)
        beta = bn.bias if bn.affine else torch.zeros_like(std)
        factor = gamma / std
        conv.weight.mul_(factor.reshape(-1, *([1] * (conv.weight.ndim - 1))))
        old_bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
        new_bias = (old_bias - bn.running_mean) * factor + beta
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution inside an ``nn.Sequential`` (in place).

    Only valid for evaluation: the folded module uses the running statistics frozen at this moment, so
    the module is put in eval mode and marked ``bn_folded`` (checkpoint writers refuse folded modules).
    """
    module.eval()
    folded = 0
    for parent in module.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent._modules.items())
        for (_, first), (name, second) in zip(children, children[1:]):
            if isinstance(first, _CONVS) and isinstance(second, _NORMS) and second.track_running_stats:
                _fold_pair(first, second)
                parent._modules[name] = nn.Identity()
                folded += 1
    module.bn_folded = getattr(module, "bn_folded", False) or folded > 0
    return module


def is_folded(module: nn.Module) -> bool:
    return any(getattr(m, "bn_folded", False) for m in module.modules())


@contextlib.contextmanager
def inference_context(device: torch.device | str) -> Iterator[None]:
    """``torch.inference_mode`` everywhere; bf16 autocast only on CUDA (CPU bf16 is slower on most CPUs)."""
    device = torch.device(device)
    with torch.inference_mode():
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield
