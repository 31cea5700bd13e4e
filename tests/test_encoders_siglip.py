"""SigLIP loss: fixture values, both modes, and the chunked distributed form over 2 gloo processes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from voxsearch.encoders import SigLipLoss, distributed_siglip_loss, siglip_loss


@pytest.mark.parametrize("mode", ["siglip", "med3dvlm"])
def test_fixture_values(med3dvlm_fixtures, mode):
    f = load_file(str(med3dvlm_fixtures / "siglip_loss_seed0.safetensors"))
    loss = SigLipLoss(mode).loss(f["image"], f["text"], f["t_prime"][0], f["bias"][0])
    ref = float(f[f"loss_{mode}"][0])
    assert abs(float(loss) - ref) <= 1e-5 * abs(ref)


def test_modes_differ_and_match_a_direct_formula():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    t, b = torch.tensor(math.log(10)), torch.tensor(-10.0)
    z = 2 * torch.eye(6) - 1
    sims = img @ txt.T
    direct = -torch.nn.functional.logsigmoid(z * (sims * 10 - 10)).sum() / 6
    direct_sym = -torch.nn.functional.logsigmoid(z * ((sims + sims.T) / 2 * 10 - 10)).sum() / 6
    assert torch.allclose(siglip_loss(img, txt, t, b, "siglip"), direct)
    assert torch.allclose(siglip_loss(img, txt, t, b, "med3dvlm"), direct_sym)
    assert not torch.allclose(direct, direct_sym)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown SigLIP loss mode"):
        SigLipLoss("clip")
    with pytest.raises(ValueError, match="same shape"):
        siglip_loss(torch.zeros(3, 4), torch.zeros(2, 4), torch.tensor(0.0), torch.tensor(0.0))
    with pytest.raises(RuntimeError, match="process group"):
        distributed_siglip_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor(0.0), torch.tensor(0.0))


SIZES = (3, 5)  # unequal local batches: the normalisation must use the global N
# Same-findings groups that span both ranks (ids 0, 1, 2) and rows in no group (-1).
GROUPS = torch.tensor([0, 1, 0, -1, 2, 1, 2, -1])
VARIANTS = (("siglip", False), ("med3dvlm", False), ("siglip", True), ("med3dvlm", True))


def _global_batch():
    g = torch.Generator().manual_seed(7)
    n = sum(SIZES)
    img = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=-1)
    # A lower temperature and bias than the defaults so every term contributes a visible gradient.
    return img, txt, torch.tensor(1.0), torch.tensor(-1.0)


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        img, txt, t, b = _global_batch()
        start = sum(SIZES[:rank])
        sl = slice(start, start + SIZES[rank])
        results = {}
        for mode, grouped in VARIANTS:
            img_l = img[sl].clone().requires_grad_(True)
            txt_l = txt[sl].clone().requires_grad_(True)
            t_l = t.clone().requires_grad_(True)
            b_l = b.clone().requires_grad_(True)
            groups = GROUPS[sl] if grouped else None
            loss = SigLipLoss(mode).loss(img_l, txt_l, t_l, b_l, groups=groups)  # picks the distributed form
            loss.backward()
            results[(mode, grouped)] = {"loss": loss.detach(), "img": img_l.grad, "txt": txt_l.grad,
                             "t": t_l.grad, "b": b_l.grad}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_pairs_with_the_same_findings_are_not_negatives():
    img, txt, t, b = _global_batch()
    n = img.shape[0]
    logits = img @ txt.T * t.exp() + b
    z = 2 * torch.eye(n) - 1
    keep = ~((GROUPS[:, None] == GROUPS[None, :]) & (GROUPS[:, None] >= 0)) | torch.eye(n, dtype=torch.bool)
    expected = -(torch.nn.functional.logsigmoid(z * logits) * keep).sum() / n
    assert torch.allclose(siglip_loss(img, txt, t, b, "siglip", groups=GROUPS), expected)
    # Grouping must change the loss here (pairs 0-2, 1-5 and 4-6 are dropped as negatives) ...
    assert not torch.allclose(siglip_loss(img, txt, t, b, "siglip"), expected)
    # ... and ids of -1 group nothing.
    assert torch.allclose(siglip_loss(img, txt, t, b, "siglip", groups=torch.full((n,), -1)),
                          siglip_loss(img, txt, t, b, "siglip"))


def test_distributed_equals_single_process(tmp_path):
    """2 gloo processes: the mean of the per-rank losses is the single-process loss on the global batch,
    and the gradients (averaged as DDP does) are the single-process gradients."""
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    img, txt, t, b = _global_batch()
    for mode, grouped in VARIANTS:
        img_g, txt_g = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        t_g, b_g = t.clone().requires_grad_(True), b.clone().requires_grad_(True)
        ref = siglip_loss(img_g, txt_g, t_g, b_g, mode, groups=GROUPS if grouped else None)
        mode = (mode, grouped)
        ref.backward()
        mean_loss = sum(r[mode]["loss"] for r in ranks) / world
        assert torch.allclose(mean_loss, ref.detach(), rtol=1e-5, atol=1e-6), mode
        # DDP divides every gradient by the world size.
        img_grad = torch.cat([r[mode]["img"] for r in ranks]) / world
        txt_grad = torch.cat([r[mode]["txt"] for r in ranks]) / world
        assert torch.allclose(img_grad, img_g.grad, rtol=1e-4, atol=1e-6), mode
        assert torch.allclose(txt_grad, txt_g.grad, rtol=1e-4, atol=1e-6), mode
        for name, ref_grad in (("t", t_g.grad), ("b", b_g.grad)):
            mean_grad = sum(r[mode][name] for r in ranks) / world
            assert torch.allclose(mean_grad, ref_grad, rtol=1e-4, atol=1e-6), (mode, name)
