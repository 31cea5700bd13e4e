"""MixerProjector: fixture parity, the published projector layout, and its importer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from voxsearch.encoders import (
    CheckpointMismatchError,
    MixerProjector,
    MixerProjectorConfig,
    count_parameters,
    dcformer,
    load_med3dvlm_projector,
)
from voxsearch.encoders.dcformer import VARIANTS, DCFormer


def test_fixture_parity(med3dvlm_fixtures):
    model = load_med3dvlm_projector(med3dvlm_fixtures / "mixer_projector_d64_seed0.weights.safetensors")
    assert model.config.output_dim == 64  # read from the checkpoint
    io = load_file(str(med3dvlm_fixtures / "mixer_projector_d64_seed0.io.safetensors"))
    with torch.no_grad():
        out = model(io["low"], io["high"])
    assert out.shape == io["output"].shape == (2, 256, 64)
    assert float((out - io["output"]).norm() / io["output"].norm()) < 1e-4


def test_published_layout_is_the_default_projector(med3dvlm_fixtures):
    layout = json.loads((med3dvlm_fixtures / "med3dvlm_projector_layout.json").read_text())
    with torch.device("meta"):
        model = MixerProjector()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == layout["tensors"]
    assert count_parameters(model) == layout["params"] == 47_221_248


def test_published_layout_imports_under_vlm_prefix(med3dvlm_fixtures, tmp_path):
    """Every tensor of the width-3584 layout, named as inside the merged VLM, is mapped to its module."""
    layout = json.loads((med3dvlm_fixtures / "med3dvlm_projector_layout.json").read_text())["tensors"]
    # A distinct constant per tensor shows that each name lands on its own parameter.
    state = {f"model.mm_projector.{k}": torch.full(shape, float(i)) for i, (k, shape) in enumerate(layout.items())}
    state["model.embed_tokens.weight"] = torch.zeros(4, 8)  # the LLM's own tensors are not the projector's
    path = tmp_path / "vlm.safetensors"
    save_file(state, str(path))
    model = load_med3dvlm_projector(path)
    assert model.config.output_dim == 3584
    loaded = model.state_dict()
    assert set(loaded) == set(layout)
    for i, k in enumerate(layout):
        assert bool((loaded[k] == float(i)).all()), k


def test_importer_refuses_missing_or_extra_tensors(med3dvlm_fixtures, tmp_path):
    weights = load_file(str(med3dvlm_fixtures / "mixer_projector_d64_seed0.weights.safetensors"))
    state = {f"model.mm_projector.{k}": v for k, v in weights.items()}
    dropped = "model.mm_projector.high_mixer.1.ln2.bias"
    save_file({k: v for k, v in state.items() if k != dropped}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"missing: high_mixer\.1\.ln2\.bias"):
        load_med3dvlm_projector(tmp_path / "missing.safetensors")
    save_file({**state, "model.mm_projector.low_mixer.0.gate": torch.zeros(2)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected: low_mixer\.0\.gate"):
        load_med3dvlm_projector(tmp_path / "extra.safetensors")


def test_projects_dcformer_stages_and_checks_shapes():
    encoder = dcformer("nano").eval()
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        stages = encoder(x)
    low, high = stages[-2], stages[-1]
    cfg = MixerProjectorConfig(low_input=tuple(low.shape[1:]), high_input=tuple(high.shape[1:]),
                               low_tokens=(6, 4), high_tokens=(2, 4), output_dim=32)
    projector = MixerProjector(cfg).eval()
    with torch.no_grad():
        out = projector.forward_stages(stages)
    assert out.shape == (1, projector.num_tokens, 32) == (1, 8, 32)
    with pytest.raises(ValueError, match="low stream expects"):
        projector(low[:, :-1], high)


def test_config_round_trip():
    cfg = MixerProjectorConfig(output_dim=64)
    assert MixerProjectorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_default_projector_fits_dcformer_small_at_the_published_input_size():
    cfg = MixerProjectorConfig()
    shapes = DCFormer.stage_shapes((128, 256, 256))
    channels = VARIANTS["small"].channels
    assert (math.prod(shapes[3]), channels[3]) == cfg.low_input == (256, 384)
    assert (math.prod(shapes[4]), channels[4]) == cfg.high_input == (32, 768)


@pytest.mark.slow
def test_small_encoder_and_projector_at_full_size():
    torch.manual_seed(0)
    encoder = dcformer("small").eval()
    projector = MixerProjector(MixerProjectorConfig(output_dim=64)).eval()
    with torch.inference_mode():
        stages = encoder(torch.rand(1, 1, 128, 256, 256))
        out = projector.forward_stages(stages)
    assert [tuple(s.shape) for s in stages[-2:]] == [(1, 256, 384), (1, 32, 768)]
    assert out.shape == (1, 256, 64) and torch.isfinite(out).all()
