"""DCFormer: published variant sizes, fixture parity, token order, input checks, BatchNorm folding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from voxsearch.encoders import (
    VARIANTS,
    CheckpointMismatchError,
    count_parameters,
    dcformer,
    fold_batchnorm,
    load_med3dvlm_dcformer,
)
from voxsearch.encoders.dcformer import DCFormer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
        if hasattr(m, "scale") and isinstance(m.scale, torch.nn.Parameter):
            m.scale.data.fill_(0.3)


@pytest.mark.parametrize(
    "variant,params",
    # nano from the fixtures README, small from the published layout; the rest follow the published
    # variant table (depths/channels), checked here so a changed table is noticed.
    [("nano", 789_216), ("naive", 5_851_680), ("tiny", 14_657_472), ("small", 18_244_800),
     ("base", 33_868_864), ("large", 185_125_440)],
)
def test_variant_parameter_counts(variant, params):
    with torch.device("meta"):
        model = dcformer(variant)
    assert count_parameters(model) == params
    assert model.channels == list(VARIANTS[variant].channels)


def test_small_matches_published_layout(med3dvlm_fixtures):
    layout = json.loads((med3dvlm_fixtures / "med3dvlm_clip_layout.json").read_text())["tensors"]
    published = {k[len("vision_encoder."):]: v for k, v in layout.items() if k.startswith("vision_encoder.")}
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in dcformer("small").state_dict().items()}
    assert ours == published


def test_nano_fixture_parity(med3dvlm_fixtures):
    """The fixture input has three different axis lengths, so a transposed axis or a token order other
    than depth-major would change shapes or values."""
    model = load_med3dvlm_dcformer(med3dvlm_fixtures / "dcformer_nano_seed0.weights.safetensors", variant="nano")
    assert not model.training
    io = load_file(str(med3dvlm_fixtures / "dcformer_nano_seed0.io.safetensors"))
    with torch.no_grad():
        stages = model(io["input"])
    assert len(stages) == 5
    for k, out in enumerate(stages):
        ref = io[f"stage{k}"]
        assert out.shape == ref.shape
        assert rel_err(out, ref) < 1e-4, f"stage{k}"


@pytest.mark.parametrize("size", [(64, 64, 64), (64, 128, 192), (32, 40, 48)])
def test_stage_shapes(size):
    model = dcformer("nano").eval()
    with torch.no_grad():
        stages = model(torch.rand(2, 1, *size))
    for out, grid, ch in zip(stages, DCFormer.stage_shapes(size), model.channels):
        assert out.shape == (2, grid[0] * grid[1] * grid[2], ch)
    if all(s % 64 == 0 for s in size):
        assert DCFormer.stage_shapes(size)[-1] == tuple(s // 64 for s in size)


def test_bad_input_is_refused():
    model = dcformer("nano")
    with pytest.raises(ValueError, match="expects a"):
        model(torch.rand(1, 64, 64, 64))
    with pytest.raises(ValueError, match="expects a"):
        model(torch.rand(1, 2, 64, 64, 64))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(1, 1, 64, 64, 64, dtype=torch.int16))
    with pytest.raises(ValueError, match="unknown DCFormer variant"):
        dcformer("huge")


def test_fold_batchnorm_matches_unfolded():
    torch.manual_seed(1)
    model = dcformer("nano")
    randomise_batchnorm(model)
    model.eval()
    x = torch.rand(1, 1, 64, 96, 64)
    with torch.no_grad():
        before = model(x)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    fold_batchnorm(model)
    assert n_bn > 0 and not any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    with torch.no_grad():
        after = model(x)
    for a, b in zip(after, before):
        assert rel_err(a, b) < 1e-5


def test_loader_accepts_prefixed_names_and_refuses_mismatch(med3dvlm_fixtures, tmp_path):
    weights = load_file(str(med3dvlm_fixtures / "dcformer_nano_seed0.weights.safetensors"))
    prefixed = tmp_path / "full.safetensors"
    extra_text = {"language_encoder.embeddings.LayerNorm.weight": torch.ones(4)}
    save_file({**{f"vision_encoder.{k}": v for k, v in weights.items()}, **extra_text}, str(prefixed))
    model = load_med3dvlm_dcformer(prefixed, variant="nano")
    key = "encoder.s3.0.mlp.mlp.0.weight"
    assert torch.equal(model.state_dict()[key], weights[key])

    missing = dict(weights)
    del missing["encoder.s2.0.scale"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"missing: encoder\.s2\.0\.scale"):
        load_med3dvlm_dcformer(tmp_path / "missing.safetensors", variant="nano")

    save_file({**weights, "encoder.s4.0.extra": torch.zeros(3)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected: encoder\.s4\.0\.extra"):
        load_med3dvlm_dcformer(tmp_path / "extra.safetensors", variant="nano")

    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        load_med3dvlm_dcformer(med3dvlm_fixtures / "dcformer_nano_seed0.weights.safetensors", variant="naive")


def test_loader_reports_unreadable_file(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_med3dvlm_dcformer(bad, variant="nano")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_med3dvlm_dcformer(tmp_path / "nope.safetensors", variant="nano")


def test_channels_last_gives_the_same_maps_and_names():
    torch.manual_seed(4)
    model = dcformer("nano")
    randomise_batchnorm(model, seed=4)
    model.eval()
    names = list(model.state_dict())
    reference = fold_batchnorm(dcformer("nano"))
    reference.load_state_dict(fold_batchnorm(model).state_dict())
    model.use_channels_last().use_channels_last()  # twice: idempotent
    assert list(model.state_dict()) == list(reference.state_dict()) and set(model.state_dict()) <= set(names)
    stem_weight = model.encoder.s0[0][1].c1[0].weight
    assert stem_weight.is_contiguous(memory_format=torch.channels_last_3d) and not stem_weight.is_contiguous()
    # Batches > 1 and odd sizes: oneDNN's channels-last stride-4 convolution on one input channel
    # corrupted the heap for batches > 1 (the first stem unit stays in the standard layout for that).
    for batch, size in ((2, (48, 80, 64)), (3, (33, 65, 47)), (1, (64, 64, 64))):
        x = torch.rand(batch, 1, *size)
        with torch.inference_mode():
            after, before = model.feature_maps(x), reference.feature_maps(x)
        for a, b in zip(after, before):
            assert a.shape == b.shape and rel_err(a, b) < 1e-5
    # The first unit (one input channel) runs as line gathers and matrix products, channels-last out.
    assert model.encoder.s0[0][0].lines_as_matmul and not model.encoder.s0[0][1].lines_as_matmul
    with torch.inference_mode():
        first_out = model.encoder.s0[0][0](torch.rand(2, 1, 64, 64, 32))
    assert first_out.is_contiguous(memory_format=torch.channels_last_3d) and not first_out.is_contiguous()


def test_channels_last_without_folding_keeps_the_convolutions():
    torch.manual_seed(6)
    model = dcformer("nano")
    randomise_batchnorm(model, seed=6)
    model.eval()
    reference = dcformer("nano").eval()
    reference.load_state_dict(model.state_dict())
    model.use_channels_last()
    assert not model.encoder.s0[0][0].lines_as_matmul  # BatchNorm still separate: the plain path
    x = torch.rand(2, 1, 40, 72, 56)
    with torch.inference_mode():
        for a, b in zip(model.feature_maps(x), reference.feature_maps(x)):
            assert rel_err(a, b) < 1e-5


def test_branch_sums_in_place_equal_the_published_sum_and_train():
    from voxsearch.encoders.dcformer import DecompConv3d

    torch.manual_seed(5)
    conv = DecompConv3d(4, 6, 3)
    x = torch.rand(2, 4, 8, 9, 10, requires_grad=True)
    out = conv(x)
    published = conv.c1(x) + conv.c2(x) + conv.c3(x)
    assert torch.equal(out, published)  # same order of additions: bit for bit
    out.square().sum().backward()  # autograd accepts the in-place sums (training mode, BatchNorm live)
    assert x.grad is not None and all(p.grad is not None for p in conv.parameters())
