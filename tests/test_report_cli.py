"""The report commands: `voxsearch report`, `train report`, `eval report`, `eval vqa`."""

from __future__ import annotations

import json
import logging

import pytest

from voxsearch.cli import build_parser, main


def test_commands_are_registered():
    parser = build_parser()
    args = parser.parse_args(["report", "scan.nii.gz", "--model", "m"])
    assert args.func.__name__ == "run_report"
    args = parser.parse_args(["train", "report", "--stage", "2", "--catalog", "c", "--init", "m1", "--lora", "8"])
    assert args.func.__name__ == "run_train" and args.stage == 2 and args.lora == 8
    assert parser.parse_args(["eval", "report", "--catalog", "c"]).func.__name__ == "run_eval_report"
    assert parser.parse_args(["eval", "vqa", "--m3d-vqa-csv", "q.csv"]).func.__name__ == "run_eval_vqa"


def test_report_without_a_model_says_how_to_get_one(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("VOXSEARCH_REPORT_MODEL", str(tmp_path / "none"))
    with caplog.at_level(logging.ERROR):
        assert main(["report", str(tmp_path / "scan.nii.gz")]) == 1
    assert "voxsearch train report" in caplog.text and str(tmp_path / "none") in caplog.text


def test_stage2_without_init_is_refused(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["train", "report", "--stage", "2", "--catalog", str(tmp_path), "--out", str(tmp_path / "m")]) == 1
    assert "stage-1 model" in caplog.text


@pytest.mark.slow
def test_stage1_stage2_report_and_eval_on_the_synthetic_catalog(tiny_catalog, tmp_path, capsys):
    """The whole CLI path on the ingested phantom archive, with a tiny LM."""
    from voxsearch.ingest import read_catalog
    from tiny_lm_testlib import build_tiny_lm

    table = read_catalog(tiny_catalog)
    lm = build_tiny_lm(tmp_path / "lm", [r for r in table.column("report").to_pylist() if r])
    common = ["--catalog", str(tiny_catalog), "--workers", "2", "--batch-size", "4"]
    assert main(["train", "report", "--stage", "1", "--out", str(tmp_path / "s1"), "--lm", str(lm),
                 "--vision-variant", "nano", "--image-size", "32", "64", "64", "--visual-tokens", "4", "4",
                 "--epochs", "1", *common]) == 0
    assert main(["train", "report", "--stage", "2", "--init", str(tmp_path / "s1"), "--out", str(tmp_path / "s2"),
                 "--epochs", "2", "--lm-lr", "1e-3", *common]) == 0
    meta = json.loads((tmp_path / "s2" / "config.json").read_text())
    assert meta["extra"]["training"]["stage"] == 2
    row = next(r for r in table.to_pylist() if r["split"] == "test")
    capsys.readouterr()
    assert main(["report", row["source_path"], "--model", str(tmp_path / "s2"), "--max-new-tokens", "8"]) == 0
    # Decoded pieces, then the closing newline. A tiny LM trained for two epochs may decode only
    # whitespace (it did after a rounding change in the vision tower): that still is output.
    printed = capsys.readouterr().out
    assert printed.endswith("\n") and len(printed) > 1
    out = tmp_path / "eval.json"
    assert main(["eval", "report", "--model", str(tmp_path / "s2"), "--catalog", str(tiny_catalog),
                 "--max-new-tokens", "8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["f1_vs_baseline"]) == {"all", "abnormal"}
    assert main(["eval", "vqa", "--model", str(tmp_path / "s2"), "--catalog", str(tiny_catalog),
                 "--max-new-tokens", "6", "--json", str(tmp_path / "vqa.json")]) == 0
    assert "presence" in json.loads((tmp_path / "vqa.json").read_text())["closed"]["per_type"]
