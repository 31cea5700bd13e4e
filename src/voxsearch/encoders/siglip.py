"""Sigmoid image-text loss (Zhai et al. 2023) with learnable temperature t' and bias b.

Two modes:
- ``siglip``: loss = -(1/N) sum_ij log sigmoid(z_ij * (exp(t') <x_i, y_j> + b)), z = +1 on the diagonal.
- ``med3dvlm``: the published Med3DVLM training code symmetrises the logit matrix, (L + L^T) / 2, first.

The distributed form follows the SigLIP paper's chunked scheme: each rank keeps its images and passes
text chunks (and, in ``med3dvlm`` mode, the image chunk that the transposed block needs) around a ring,
so no rank ever holds more than a (local x local) block of the global N x N logit matrix.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

MODES = ("siglip", "med3dvlm")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown SigLIP loss mode {mode!r}; choose one of {MODES}")


def _block_loss_sum(logits: torch.Tensor, positives_on_diagonal: bool, not_negative: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """-sum log sigmoid(z * logits) for one block; z = -1 everywhere except a +1 diagonal if asked.
    Off-diagonal entries where ``not_negative`` is true are left out of the sum."""
    if positives_on_diagonal:
        eye = torch.eye(logits.shape[0], logits.shape[1], device=logits.device, dtype=torch.bool)
        terms = -F.logsigmoid((2 * eye.to(logits.dtype) - 1) * logits)
        if not_negative is not None:
            terms = terms.masked_fill(not_negative & ~eye, 0.0)
        return terms.sum()
    terms = -F.logsigmoid(-logits)
    if not_negative is not None:
        terms = terms.masked_fill(not_negative, 0.0)
    return terms.sum()


def _same_group(rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor | None:
    # Studies with the same findings (same group id) are not negatives of each other: pushing two
    # normal abdomens apart teaches the model noise. Id -1 means "in no group".
    if rows is None or cols is None:
        return None
    return (rows[:, None] == cols[None, :]) & (rows[:, None] >= 0)


def _block_logits(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, mode: str,
                  img_other: torch.Tensor | None = None, txt_local: torch.Tensor | None = None) -> torch.Tensor:
    sims = img @ txt.T
    if mode == "med3dvlm":
        # Block (r, s) of (S + S^T)/2 needs S_sr^T = txt_local(r) . img(s).
        sims = (sims + txt_local @ img_other.T) / 2
    return sims * scale + bias


def siglip_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, t_prime: torch.Tensor, bias: torch.Tensor,
                mode: str = "siglip", groups: torch.Tensor | None = None) -> torch.Tensor:
    """Single-process loss over a batch of N matched (image, text) pairs; ``groups`` (N,) ids mark
    pairs that are not negatives of each other (see _same_group)."""
    _check_mode(mode)
    if img_emb.shape != txt_emb.shape or img_emb.ndim != 2:
        raise ValueError(
            f"image and text embeddings must both be (N, E) with the same shape, got "
            f"{tuple(img_emb.shape)} and {tuple(txt_emb.shape)}"
        )
    logits = _block_logits(img_emb, txt_emb, t_prime.exp(), bias, mode, img_other=img_emb, txt_local=txt_emb)
    groups = None if groups is None else groups.to(img_emb.device)
    return _block_loss_sum(logits, True, _same_group(groups, groups)) / img_emb.shape[0]


class _RingShift(torch.autograd.Function):
    """Send a tensor to rank+1 and receive rank-1's; gradients travel the opposite way."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, recv_shape: torch.Size, group) -> torch.Tensor:
        ctx.group = group
        ctx.send_shape = tensor.shape
        return _exchange(tensor.contiguous(), recv_shape, +1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad.contiguous(), ctx.send_shape, -1, ctx.group), None, None


def _exchange(tensor: torch.Tensor, recv_shape: torch.Size, direction: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)

    def global_rank(group_rank: int) -> int:
        return group_rank if group is None else dist.get_global_rank(group, group_rank)

    out = torch.empty(recv_shape, dtype=tensor.dtype, device=tensor.device)
    # Post both sides before waiting: every rank sends and receives in the same step, so blocking
    # send/recv would deadlock.
    reqs = [
        dist.isend(tensor, global_rank((rank + direction) % world), group=group),
        dist.irecv(out, global_rank((rank - direction) % world), group=group),
    ]
    for req in reqs:
        req.wait()
    return out


def _gather_sizes(n_local: int, device: torch.device, group) -> list[int]:
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n_local], dtype=torch.long, device=device), group=group)
    return [int(s.item()) for s in sizes]


def distributed_siglip_loss(img_local: torch.Tensor, txt_local: torch.Tensor, t_prime: torch.Tensor,
                            bias: torch.Tensor, mode: str = "siglip", group=None,
                            groups: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's share of the global loss; the mean over ranks equals ``siglip_loss`` on the whole batch.

    Returning the share (not the all-reduced value) keeps the gradients right under DDP, which averages
    gradients over ranks: the mean of the shares is the global loss, and each text chunk's gradient
    comes back from every rank through the ring. Local batch sizes may differ between ranks.
    """
    _check_mode(mode)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed_siglip_loss needs an initialised torch.distributed process group")
    if img_local.shape != txt_local.shape or img_local.ndim != 2:
        raise ValueError(
            f"local image and text embeddings must both be (n, E), got {tuple(img_local.shape)} and "
            f"{tuple(txt_local.shape)}"
        )
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    sizes = _gather_sizes(img_local.shape[0], img_local.device, group)
    n_global = sum(sizes)
    scale = t_prime.exp()
    dim = img_local.shape[1]

    all_groups = None
    if groups is not None:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, [int(g) for g in groups.tolist()], group=group)
        all_groups = [torch.tensor(g, dtype=torch.long, device=img_local.device) for g in gathered]
    mine = None if all_groups is None else all_groups[rank]
    total = _block_loss_sum(
        _block_logits(img_local, txt_local, scale, bias, mode, img_other=img_local, txt_local=txt_local), True,
        _same_group(mine, mine))
    txt_chunk, img_chunk = txt_local, img_local
    for step in range(1, world):
        src = (rank - step) % world
        shape = torch.Size((sizes[src], dim))
        txt_chunk = _RingShift.apply(txt_chunk, shape, group)
        if mode == "med3dvlm":
            img_chunk = _RingShift.apply(img_chunk, shape, group)
        logits = _block_logits(img_local, txt_chunk, scale, bias, mode, img_other=img_chunk, txt_local=txt_local)
        other = None if all_groups is None else all_groups[src]
        total = total + _block_loss_sum(logits, False, _same_group(mine, other))
    return total * world / n_global


class SigLipLoss(nn.Module):
    """Loss object: uses the chunked distributed form when a process group with >1 rank is active."""

    def __init__(self, mode: str = "siglip", distributed: bool | None = None):
        super().__init__()
        _check_mode(mode)
        self.mode = mode
        self.distributed = distributed

    def _use_distributed(self) -> bool:
        if self.distributed is not None:
            return self.distributed
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def loss(self, img_emb: torch.Tensor, txt_emb: torch.Tensor, t_prime: torch.Tensor,
             bias: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        if self._use_distributed():
            return distributed_siglip_loss(img_emb, txt_emb, t_prime, bias, mode=self.mode, groups=groups)
        return siglip_loss(img_emb, txt_emb, t_prime, bias, mode=self.mode, groups=groups)

    forward = loss
