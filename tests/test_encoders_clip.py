"""Text tower, ClipModel, the project's checkpoint format and the Med3DVLM CLIP importer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from voxsearch.encoders import (
    CheckpointMismatchError,
    ClipConfig,
    ClipModel,
    TextTower,
    TextTowerConfig,
    import_med3dvlm_clip,
    load_clip,
    model_id,
    read_clip_meta,
    save_clip,
)
from voxsearch.encoders.med3dvlm import expected_clip_layout, load_clip_state

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "the a liver lesion in of normal chest ct scan mass left right kidney no nodule lung".split()
)


CLINICALBERT = dict(dim=768, n_layers=6, n_heads=12, hidden_dim=3072, max_position_embeddings=512)
TINY_BERT = dict(dim=64, n_layers=2, n_heads=2, hidden_dim=128, max_position_embeddings=64)


def make_distilbert_dir(directory, vocab_size: int, with_weights: bool, arch: dict = CLINICALBERT):
    """A DistilBERT (by default shaped like ClinicalBERT) with random weights and a small tokenizer."""
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    DistilBertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(str(directory))
    cfg = DistilBertConfig(vocab_size=vocab_size, **arch)
    if with_weights:
        torch.manual_seed(0)
        DistilBertModel(cfg).save_pretrained(str(directory))
    else:
        cfg.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def distilbert_dir(tmp_path_factory):
    return make_distilbert_dir(tmp_path_factory.mktemp("clinicalbert"), vocab_size=len(WORDS) + 11,
                               with_weights=True)


@pytest.fixture(scope="module")
def nano_clip():
    torch.manual_seed(0)
    return ClipModel(ClipConfig(vision_variant="nano", embed_dim=32)).eval()


def test_default_text_tower_is_packaged_minilm_and_masks_padding():
    tower = TextTower(TextTowerConfig()).eval()
    assert tower.hidden_size == 384
    short = "liver lesion"
    with torch.no_grad():
        alone = tower(**tower.tokenize([short]))
        batch = tower.tokenize([short, "a much longer report text about the left kidney and a lung nodule"])
        padded = tower(**batch)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # the short text was padded
    # Mean pooling ignores padding: the short text's vector does not depend on its batch-mates.
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    with pytest.raises(ValueError, match="non-empty list"):
        tower.tokenize("not a list")


def test_distilbert_loads_from_local_dir_with_cls_pooling(distilbert_dir):
    from transformers import DistilBertModel

    tower = TextTower(TextTowerConfig(path=str(distilbert_dir), pooling="cls", max_length=16)).eval()
    assert tower.hidden_size == 768
    enc = tower.tokenize(["normal chest ct", "liver lesion"])
    assert (enc["input_ids"][:, 1] != 1).all()  # words are in the vocabulary, not [UNK]
    reference = DistilBertModel.from_pretrained(str(distilbert_dir)).eval()
    with torch.no_grad():
        ours = tower(**enc)
        ref = reference(**enc).last_hidden_state[:, 0]
    assert torch.allclose(ours, ref, atol=1e-5)


def test_text_tower_refuses_bad_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TextTower(TextTowerConfig(path=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown pooling"):
        TextTowerConfig(pooling="max")


def test_clip_embeddings_are_normalised_and_trainable(nano_clip):
    model = nano_clip
    images = torch.rand(2, 1, 64, 64, 64)
    enc = model.text.tokenize(["liver lesion", "normal chest"])
    img, txt = model(images, enc["input_ids"], enc["attention_mask"])
    assert img.shape == txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(model.encode_text(["liver lesion", "normal chest"]), txt, atol=1e-6)
    # The contract: mean of the last stage's tokens, projected, L2-normalised.
    tokens_mean = model.vision(images)[-1].mean(dim=1)
    assert torch.allclose(img, torch.nn.functional.normalize(model.vision_proj(tokens_mean), dim=-1), atol=1e-6)
    assert model.t_prime.item() == pytest.approx(2.302585, abs=1e-6) and model.bias.item() == -10.0
    loss = model.loss(img, txt)
    loss.backward()
    assert torch.isfinite(loss)
    for p in (model.t_prime, model.bias, model.vision_proj.weight, model.text_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_checkpoint_round_trip_is_self_contained(nano_clip, tmp_path):
    model = nano_clip
    extra = {"preprocess": {"spatial_size": [64, 64, 64]}, "trained_on": "synthetic"}
    ckpt = save_clip(model, tmp_path / "ckpt", extra=extra)
    meta = read_clip_meta(ckpt)
    assert meta["format"] == "voxsearch-clip" and meta["format_version"] == 1
    assert meta["extra"] == extra and meta["clip_config"]["vision_variant"] == "nano"
    assert (ckpt / "text" / "config.json").is_file() and (ckpt / "text" / "tokenizer.json").is_file()

    moved = tmp_path / "moved"
    shutil.copytree(ckpt, moved)
    shutil.rmtree(ckpt)
    loaded = load_clip(moved)
    assert not loaded.training
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(x), model.encode_image(x), atol=1e-6)
        assert torch.allclose(loaded.encode_text(["liver lesion"]), model.encode_text(["liver lesion"]), atol=1e-6)

    first = model_id(moved)
    assert first == model_id(moved) and len(first) == 16
    with torch.no_grad():
        loaded.bias.add_(1.0)
    save_clip(loaded, moved, extra=extra)  # overwrite in place
    assert model_id(moved) != first
    assert load_clip(moved).bias.item() == pytest.approx(model.bias.item() + 1.0)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left behind


def test_checkpoint_errors_name_the_problem(nano_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a voxsearch CLIP checkpoint"):
        read_clip_meta(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt checkpoint config"):
        read_clip_meta(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "voxsearch-clip", "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load_clip(tmp_path)
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_clip(nano_clip, tmp_path / "x", extra={"bad": object()})
    assert not (tmp_path / "x").exists()


def test_prepare_for_inference_folds_batchnorm_and_keeps_outputs(tmp_path):
    torch.manual_seed(3)
    model = ClipModel(ClipConfig(vision_variant="nano", embed_dim=16))
    for m in model.vision.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.rand(1, 1, 64, 64, 96)
    with torch.no_grad():
        before = model.encode_image(x)
    model.prepare_for_inference()
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    with model.inference():
        after = model.encode_image(x)
        assert torch.is_inference_mode_enabled()
    assert after.dtype == torch.float32  # bf16 autocast is for CUDA only
    assert torch.allclose(after, before, atol=1e-5)
    with pytest.raises(ValueError, match="folded"):
        save_clip(model, tmp_path / "folded")


def test_med3dvlm_clip_layout_is_fully_mapped(med3dvlm_fixtures, tmp_path):
    """The real published layout (ClinicalBERT vocabulary 119,547) against our model, on the meta device."""
    layout = json.loads((med3dvlm_fixtures / "med3dvlm_clip_layout.json").read_text())["tensors"]
    text_dir = make_distilbert_dir(tmp_path / "clinicalbert", vocab_size=119_547, with_weights=False)
    cfg = ClipConfig(vision_variant="small", embed_dim=768, loss_mode="med3dvlm",
                     text=TextTowerConfig(path=str(text_dir), pooling="cls"))
    with torch.device("meta"):
        model = ClipModel(cfg, load_text_weights=False)
        state = {k: torch.empty(shape) for k, shape in layout.items()}
    assert {k: list(v) for k, v in expected_clip_layout(model).items()} == layout
    load_clip_state(model, state, "layout")

    removed = dict(state)
    del removed["language_encoder.transformer.layer.3.ffn.lin2.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"missing: language_encoder\.transformer\.layer\.3\.ffn"):
        load_clip_state(model, removed, "layout")
    with torch.device("meta"):
        added = {**state, "vision_encoder.encoder.s5.0.scale": torch.empty(8)}
    with pytest.raises(CheckpointMismatchError, match=r"unexpected: vision_encoder\.encoder\.s5\.0\.scale"):
        load_clip_state(model, added, "layout")


def test_import_med3dvlm_clip_from_file(tmp_path):
    """A published-format checkpoint directory imports with every tensor in place. The full ClinicalBERT
    shapes are covered on the meta device above; a tiny DistilBERT keeps this file small."""
    from voxsearch.encoders.med3dvlm import _to_published

    distilbert_dir = make_distilbert_dir(tmp_path / "tinybert", len(WORDS), with_weights=False, arch=TINY_BERT)
    torch.manual_seed(5)
    cfg = ClipConfig(vision_variant="small", embed_dim=768,
                     text=TextTowerConfig(path=str(distilbert_dir), pooling="cls"))
    source = ClipModel(cfg, load_text_weights=False)
    published = {_to_published(k): v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / "DCFormer_SigLIP"
    path.mkdir()
    save_file(published, str(path / "model.safetensors"))

    model = import_med3dvlm_clip(path, text_dir=distilbert_dir)
    assert not model.training and model.config.text.pooling == "cls" and model.config.loss_mode == "med3dvlm"
    ours = model.state_dict()
    for name, tensor in source.state_dict().items():
        assert torch.equal(ours[name], tensor), name

    del published["mm_language_proj.bias"]
    save_file(published, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"missing: mm_language_proj\.bias"):
        import_med3dvlm_clip(tmp_path / "broken.safetensors", text_dir=distilbert_dir)


def test_export_without_packaged_text_weights_is_small_and_loads_the_same(tmp_path):
    from voxsearch.encoders import export_clip

    torch.manual_seed(1)
    model = ClipModel(ClipConfig(vision_variant="nano", embed_dim=16, input_filter=3,
                                 finding_labels=("cyst|liver", "nodule|lung"))).eval()
    full = save_clip(model, tmp_path / "full")
    small = export_clip(full, tmp_path / "small")
    assert (small / "model.safetensors").stat().st_size < (full / "model.safetensors").stat().st_size / 5
    assert not (small / "text").exists()
    loaded = load_clip(small)
    x = torch.rand(2, 1, 32, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(x), model.encode_image(x), atol=1e-6)
        assert torch.allclose(loaded.encode_text(["liver cyst"]), model.encode_text(["liver cyst"]), atol=1e-6)
        assert torch.allclose(loaded.predict_findings(model.encode_image(x)), model.predict_findings(model.encode_image(x)))
    assert loaded.config.finding_labels == ("cyst|liver", "nodule|lung") and loaded.config.input_filter == 3

    with torch.no_grad():  # a text tower that training changed cannot be replaced by the package's
        next(model.text.parameters()).add_(0.01)
    changed = save_clip(model, tmp_path / "changed")
    with pytest.raises(ValueError, match="not the packaged one"):
        export_clip(changed, tmp_path / "changed_small")


def test_input_filter_lets_the_stem_see_a_voxel_between_its_lines():
    from voxsearch.encoders import dcformer

    torch.manual_seed(0)
    plain, filtered = dcformer("nano").eval(), dcformer("nano", input_filter=3).eval()
    filtered.load_state_dict(plain.state_dict())  # the filter has no weights: same parameters
    base = torch.zeros(1, 1, 32, 64, 64)
    dot = base.clone()
    dot[0, 0, 17, 33, 34] = 1.0  # off the stride-4 grid in all three axes
    with torch.no_grad():
        assert torch.equal(plain(base)[0], plain(dot)[0])  # the published stem never reads it
        assert not torch.allclose(filtered(base)[0], filtered(dot)[0])
    with pytest.raises(ValueError, match="odd"):
        dcformer("nano", input_filter=4)


def test_feature_finding_head_reads_pooled_tower_features_and_round_trips(tmp_path):
    from voxsearch.encoders.clip import finding_organ_matrix, finding_organs

    labels = ("cyst|kidney", "mass|liver", "stone|kidney")
    torch.manual_seed(0)
    model = ClipModel(ClipConfig(vision_variant="nano", embed_dim=16, image_size=(16, 32, 32),
                                 finding_labels=labels, feature_finding_head=True)).eval()
    assert finding_organs(labels) == ["kidney", "liver"]
    assert finding_organ_matrix(labels).tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    x = torch.rand(2, 1, 16, 32, 32)
    feats = torch.rand(2, model.text.hidden_size)
    with torch.no_grad():
        img, txt, logits, wide = model(x, text_features=feats, with_findings=True)
        # The embedding is the one search uses, whatever head trains beside it.
        assert torch.allclose(img, model.encode_image(x), atol=1e-6)
        # The feature head reads the stage maps, not the embedding: changing the projection leaves it alone.
        model.vision_proj.weight.mul_(3.0)
        assert torch.allclose(model(x, text_features=feats, with_findings=True)[3], wide)
    assert logits.shape == (2, 3) and wide.shape == (2, 3 + 2)
    save_clip(model, tmp_path / "m")
    again = load_clip(tmp_path / "m").eval()
    assert again.config.feature_finding_head and torch.equal(again.feature_head.weight, model.feature_head.weight)
    plain = ClipModel(ClipConfig(vision_variant="nano", embed_dim=16, finding_labels=labels))
    assert plain.feature_head is None and len(plain(x, text_features=feats, with_findings=True)) == 3
