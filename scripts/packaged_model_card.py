"""Write TRAINED.json beside an exported checkpoint: how it was made and what it measured.

    python scripts/packaged_model_card.py RUN EXPORTED [--extra-train-args "..."]

RUN is the `voxsearch train clip` run folder (its metrics.json), EXPORTED the `voxsearch train export`
output (its config.json then names the run's catalog and run folders CATALOG and RUN). Measures, in this process: the demo's queries on 300 phantom studies of a seed no training
used (tests/phantom_eval_testlib.py, as tests/test_packaged_model.py does), the rescan probe
(bench/rescan.py) and the finding calls on the demo's own phantoms (seed 2026).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]


def finding_calls(model, head, phantoms) -> dict:
    """Precision and recall of the head's calls (type, organ) against ground truth, and the share of
    normal studies with any call."""
    import torch

    with torch.inference_mode():
        img = np.concatenate([model.encode_image(torch.from_numpy(phantoms.inputs[s:s + 16])).float().numpy()
                              for s in range(0, len(phantoms.inputs), 16)])
    right = made = truth_n = found = 0
    normal_called = normal = 0
    for vec, findings in zip(img, phantoms.findings):
        called = {c["label"] for c in head.describe(vec, limit=len(head.labels))}
        truth = {f"{f['type']}|{f['organ']}" for f in findings} & set(head.labels)
        made += len(called)
        right += len(called & truth)
        truth_n += len(truth)
        found += len(truth & called)
        if not findings:
            normal += 1
            normal_called += bool(called)
    return {"studies": len(img), "precision": round(right / made, 3) if made else None,
            "recall": round(found / truth_n, 3) if truth_n else None,
            "normal_studies_with_a_call": round(normal_called / normal, 3) if normal else None}


def name_folders_as_the_commands_do(exported: Path) -> None:
    """The run's own folders in config.json (train_config.catalog and .out) become the placeholders the
    card's commands use: a shipped checkpoint names no path of the machine that trained it."""
    path = exported / "config.json"
    meta = json.loads(path.read_text())
    train_config = meta.get("extra", {}).get("train_config")
    if train_config:
        train_config.update({"catalog": "CATALOG", "out": "RUN"})
        path.write_text(json.dumps(meta, indent=2, sort_keys=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("exported", type=Path)
    parser.add_argument("--extra-train-args", default="", help="what the train command had beyond --preset quick")
    parser.add_argument("--note", help="anything else a reader must know about how the checkpoint was made")
    args = parser.parse_args(argv)

    import rescan
    from phantom_eval_testlib import draw_phantoms, query_precision
    from voxsearch.encoders import load_clip, read_clip_meta, read_finding_head
    from voxsearch.ingest import PreprocessConfig

    name_folders_as_the_commands_do(args.exported)
    metrics = json.loads((args.run / "metrics.json").read_text())
    epochs = [h for h in metrics["history"] if h["kind"] == "epoch"]
    meta = read_clip_meta(args.exported)
    cfg = meta["extra"]["train_config"]
    model = load_clip(args.exported).prepare_for_inference()
    pp = PreprocessConfig.from_dict(meta["extra"]["preprocess"])
    demo = query_precision(model, draw_phantoms(300, 31337, pp), k=5)
    calls = finding_calls(model, read_finding_head(args.exported), draw_phantoms(120, 2026, pp))
    probe = rescan.measure(args.exported)
    labels = meta["clip_config"]["finding_labels"]
    card = {
        "name": args.exported.name,
        "what": f"DCFormer-{cfg['model']['vision_variant']} at {'x'.join(map(str, cfg['model']['image_size']))} "
                f"+ frozen MiniLM-L6 (packaged), SigLIP with same-findings non-negatives, finding-label head "
                f"({len(labels)} labels, weight {cfg['finding_loss_weight']:g}), feature finding head (labels + "
                f"organs, weight {cfg.get('feature_finding_loss_weight', 0):g}), two-view instance loss "
                f"(weight {cfg.get('view_loss_weight', 0):g}), quick preset",
        "commands": [
            "voxsearch synth --n 3000 --seed 0 --size small --dicom-share 0.1 --split-shares 0.7 0.1 0.2 --out ARCHIVE",
            "voxsearch ingest ARCHIVE --out CATALOG",
            f"voxsearch train clip --catalog CATALOG --out RUN --preset quick {args.extra_train_args}".strip(),
            f"voxsearch train export RUN/model --out {args.exported.name}",
            f"python scripts/packaged_model_card.py RUN {args.exported.name}",
        ],
        "machine": "2-core x86-64 CPU (AVX-512), no GPU, torch 2.13.0+cpu",
        "train_studies": metrics["train_studies"],
        "epochs": cfg["epochs"],
        "optimizer_steps": metrics["optimizer_steps"],
        "samples_per_s": epochs[-1]["samples_per_s_per_worker"] if epochs else None,
        "test_metrics": metrics["final"]["headline"],
        "test_split": "the archive's test split: 20% of patients, none of them in training (N=500 pairs)",
        "unseen_phantoms_demo_queries_P@5": {q: {"P@5": v["P@5"], "relevant": v["relevant"],
                                                 "chance": round(v["chance"], 4)} for q, v in demo.items()},
        "unseen_phantoms": "300 studies drawn with seed 31337 (tests/test_packaged_model.py)",
        "rescan_top1_same_patient": probe["top1_same_patient"],
        "finding_thresholds": "per label, lowest at which calls on the validation split are right >= 60% of "
                              "the time (config.json extra.finding_thresholds)",
        "unseen_demo_phantoms_finding_calls": {**calls, "seed": 2026},
        "query_finding_weight": meta["clip_config"].get("query_finding_weight", 1.0),
        "query_finding_weight_from": meta["extra"].get("query_finding_weight_from"),
    }
    if args.note:
        card["note"] = args.note
    (args.exported / "TRAINED.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
