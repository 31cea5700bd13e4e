"""Report model: placeholder scatter (and the published off-by-one), padding, generation, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_lm_testlib import build_tiny_lm
from voxsearch.reports.model import (
    ReportModelConfig,
    build_report_model,
    load_report_model,
    merge_visual_tokens,
    save_report_model,
    stage_tokens,
)

IMAGE = (32, 64, 64)
TEXTS = ["There is a 12 mm nodule in the right lung.", "No abnormality is seen.", "A 20 mm cyst in the liver."]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    lm_dir = build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"), TEXTS * 4)
    cfg = ReportModelConfig(vision_variant="nano", image_size=IMAGE, lm=str(lm_dir), low_tokens=(8, 4),
                            high_tokens=(4, 4))
    return build_report_model(cfg, preprocess={"spatial_size": list(IMAGE)})


def test_scatter_replaces_exactly_the_placeholder_run():
    p = 9
    ids = torch.tensor([[1, p, p, p, 5, 6, 0], [2, 3, p, p, p, 7, 8]])
    embeds = torch.arange(2 * 7, dtype=torch.float32).reshape(2, 7, 1).repeat(1, 1, 2)
    visual = -torch.arange(1, 7, dtype=torch.float32).reshape(2, 3, 1).repeat(1, 1, 2)
    out = merge_visual_tokens(embeds, ids, visual, p)
    assert out[0, 1:4, 0].tolist() == [-1, -2, -3]
    assert out[1, 2:5, 0].tolist() == [-4, -5, -6]
    # Every text token keeps its own embedding.
    assert out[0, [0, 4, 5, 6], 0].tolist() == embeds[0, [0, 4, 5, 6], 0].tolist()
    assert out[1, [0, 1, 5, 6], 0].tolist() == embeds[1, [0, 1, 5, 6], 0].tolist()


def test_offset_switch_reproduces_the_published_off_by_one():
    p = 9
    ids = torch.tensor([[p, p, p, 5, 6]])  # no BOS, as with Qwen: the run starts at position 0
    embeds = torch.arange(5, dtype=torch.float32).reshape(1, 5, 1)
    visual = -torch.tensor([[[1.0], [2.0], [3.0]]])
    out = merge_visual_tokens(embeds, ids, visual, p, offset=1)
    # The first placeholder survives and the first prompt token (position 3) is overwritten.
    assert out[0, :, 0].tolist() == [0, -1, -2, -3, 4]
    with pytest.raises(ValueError, match="past the end"):
        merge_visual_tokens(embeds, torch.tensor([[5, 6, p, p, p]]), visual, p, offset=1)


def test_scatter_refuses_a_wrong_placeholder_count():
    with pytest.raises(ValueError, match="exactly 3 image placeholder"):
        merge_visual_tokens(torch.zeros(1, 4, 2), torch.tensor([[9, 9, 1, 2]]), torch.zeros(1, 3, 2), 9)


def test_gradient_reaches_visual_tokens_and_text_embeddings():
    embeds = torch.zeros(1, 4, 2, requires_grad=True)
    visual = torch.zeros(1, 2, 2, requires_grad=True)
    merge_visual_tokens(embeds, torch.tensor([[1, 9, 9, 2]]), visual, 9).sum().backward()
    assert visual.grad.abs().sum() == 4
    assert embeds.grad[0, :, 0].tolist() == [1, 0, 0, 1]


def test_stage_tokens_match_the_tower(tiny_model):
    stages = tiny_model.vision(torch.rand(1, 1, *IMAGE))
    assert stages[-2].shape[1] == stage_tokens(IMAGE, 3)
    assert stages[-1].shape[1] == stage_tokens(IMAGE, 4)
    # The published geometry: 128x256x256 -> 256 and 32 tokens.
    assert (stage_tokens((128, 256, 256), 3), stage_tokens((128, 256, 256), 4)) == (256, 32)


def test_prompt_holds_one_run_of_placeholders(tiny_model):
    ids = tiny_model.prompt_ids("Is there a nodule?")
    positions = [i for i, t in enumerate(ids) if t == tiny_model.image_token_id]
    assert len(positions) == tiny_model.num_visual_tokens == 8
    assert positions == list(range(positions[0], positions[0] + 8))


def test_padded_batch_matches_single_rows(tiny_model):
    """Right padding (training) and left padding (generation) must not change any row's result."""
    torch.manual_seed(0)
    images = torch.rand(2, 1, *IMAGE)
    batch = tiny_model.collate(["short?", "a much longer question about the scan?"], ["yes", "a nodule, 12 mm"])
    with torch.no_grad():
        logits = tiny_model(images, **{k: v for k, v in batch.items() if k != "labels"}).logits
        for i in range(2):
            n = int(batch["attention_mask"][i].sum())
            alone = tiny_model(images[i:i + 1], batch["input_ids"][i:i + 1, :n],
                               batch["attention_mask"][i:i + 1, :n]).logits
            torch.testing.assert_close(logits[i, :n], alone[0], atol=1e-4, rtol=1e-4)
    prompts = ["short?", "a much longer question about the scan?"]
    together = tiny_model.generate_batch(images, prompts, max_new_tokens=6)
    apart = [tiny_model.generate(images[i:i + 1], prompts[i], max_new_tokens=6) for i in range(2)]
    assert together == apart


def test_labels_cover_only_the_answer(tiny_model):
    batch = tiny_model.collate([None], ["No abnormality is seen."])
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labelled[-1] == tiny_model.eos_token_id
    assert tiny_model.tokenizer.decode(labelled[:-1]).strip() == "No abnormality is seen."


def test_stream_concatenates_to_generate(tiny_model):
    image = torch.rand(1, 1, *IMAGE)
    pieces = list(tiny_model.generate_stream(image, None, max_new_tokens=8))
    assert "".join(pieces).strip() == tiny_model.generate(image, None, max_new_tokens=8)


def test_stage1_trains_only_new_token_rows(tiny_model):
    model = build_report_model(tiny_model.config, preprocess=tiny_model.preprocess)
    model.set_trainable(projector=True, lm=False, new_embeddings=True)
    emb = model.lm.get_input_embeddings().weight
    before = emb.detach().clone()
    batch = model.collate([None], ["No abnormality is seen."])
    model(torch.rand(1, 1, *IMAGE), **batch).loss.backward()
    changed = (emb.grad.abs().sum(dim=1) > 0).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(model.added_token_ids)
    assert all(not p.requires_grad for p in model.vision.parameters())
    assert all(p.grad is None for n, p in model.lm.named_parameters() if "embed" not in n and "lm_head" not in n)
    assert torch.equal(before, emb.detach())


def test_save_load_roundtrip(tiny_model, tmp_path):
    image = torch.rand(1, 1, *IMAGE)
    expected = tiny_model.generate(image, "Is there a nodule?", max_new_tokens=6)
    out = save_report_model(tiny_model, tmp_path / "model", extra={"note": "x"})
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "voxsearch-report-model" and meta["extra"] == {"note": "x"}
    loaded = load_report_model(out)
    assert loaded.preprocess == tiny_model.preprocess
    assert loaded.generate(image, "Is there a nodule?", max_new_tokens=6) == expected
    assert not list(tmp_path.glob(".model.tmp-*"))


def test_load_rejects_other_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a report model"):
        load_report_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "voxsearch-clip"}))
    with pytest.raises(ValueError, match="not a voxsearch report model"):
        load_report_model(tmp_path)


def test_wrong_image_size_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match=r"expects images of shape"):
        tiny_model.generate(torch.rand(1, 1, 16, 64, 64))


def test_lora_trains_adapters_only_and_saves_merged(tiny_model, tmp_path):
    pytest.importorskip("peft")
    import dataclasses

    from voxsearch.reports.model import LoraSettings

    cfg = dataclasses.replace(tiny_model.config, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    model = build_report_model(cfg, preprocess=tiny_model.preprocess)
    model.set_trainable(projector=True, lm=True)
    lm_trainable = [n for n, p in model.lm.named_parameters() if p.requires_grad]
    assert lm_trainable and all("lora_" in n for n in lm_trainable)
    with torch.no_grad():  # make the adapters matter
        for n, p in model.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    image = torch.rand(1, 1, *IMAGE)
    expected = model.generate(image, "Is there a nodule?", max_new_tokens=6)
    loaded = load_report_model(save_report_model(model, tmp_path / "lora"))
    assert loaded.config.lora is None  # merged into plain LM weights
    assert loaded.generate(image, "Is there a nodule?", max_new_tokens=6) == expected
