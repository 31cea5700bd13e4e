"""Benchmark: does search by scan find the same patient's other scan? (test-retest, rigid motion)

Each of N phantom patients is scanned twice: the same anatomy and findings, the second time moved
rigidly (a few degrees about each axis, a few voxels of shift), with new scanner noise and a slight
intensity change (gain and offset). Every scan is a query against all other 2N-1 scans; the rescan of
the same patient should rank first. Baselines run in this process: chance, and the raw-voxel
nearest neighbour (cosine on the preprocessed volumes), which motion defeats.

    python bench/rescan.py                          # the packaged model, 32 patients
    python bench/rescan.py --checkpoint RUN/model --patients 64 --seed 5

Prints a table and writes bench/results/rescan.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "rescan.json"


def _moved(rng, array: np.ndarray, max_deg: float, max_shift: float) -> np.ndarray:
    from scipy.ndimage import affine_transform
    from scipy.spatial.transform import Rotation

    rot = Rotation.from_euler("xyz", rng.uniform(-max_deg, max_deg, 3), degrees=True).as_matrix()
    centre = (np.array(array.shape) - 1) / 2.0
    shift = rng.uniform(-max_shift, max_shift, 3)
    offset = centre - rot @ (centre + shift)
    fill = float(np.percentile(array, 1))  # air
    return affine_transform(array, rot, offset=offset, order=1, mode="constant", cval=fill).astype(np.float32)


def make_pairs(n: int, seed: int, size: str, max_deg: float, max_shift: float):
    from voxsearch.ingest import render_study
    from voxsearch.ingest.synth_phantom import add_noise

    scans = []
    for p in range(n):
        rng = np.random.default_rng([seed, 77, p])
        study = render_study(rng, size, noise=False)
        clean, affine, modality, findings = study.array, study.affine, study.modality, study.findings
        first = clean.copy()
        add_noise(np.random.default_rng([seed, 78, p]), first, modality)
        second = _moved(rng, clean, max_deg, max_shift)
        gain, bias = rng.uniform(0.97, 1.03), rng.uniform(-10, 10)
        second = second * gain + (bias if modality == "CT" else 0.0)
        add_noise(np.random.default_rng([seed, 79, p]), second, modality)
        scans.append((p, modality, affine, first, findings))
        scans.append((p, modality, affine, second, findings))
    return scans


def top1_same_patient(vectors: np.ndarray, patients: np.ndarray) -> float:
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    return float((patients[sims.argmax(axis=1)] == patients).mean())


def measure(checkpoint: Path | None = None, patients: int = 32, seed: int = 1234, size: str = "small",
            max_degrees: float = 4.0, max_shift: float = 3.0) -> dict:
    """Top-1 same-patient rate of a CLIP checkpoint (default: the packaged model) beside its baselines."""
    import torch

    from voxsearch.encoders import load_clip, packaged_checkpoint, read_clip_meta
    from voxsearch.ingest import PreprocessConfig, preprocess_volume
    from voxsearch.ingest.volume import HU, RAW, Volume

    model_dir = checkpoint or packaged_checkpoint()
    pp = PreprocessConfig.from_dict(read_clip_meta(model_dir)["extra"]["preprocess"])
    model = load_clip(model_dir).prepare_for_inference()
    scans = make_pairs(patients, seed, size, max_degrees, max_shift)
    inputs = []
    for _, modality, affine, array, _ in scans:
        volume = Volume(array=array, affine=affine, spacing=tuple(np.abs(np.diag(affine)[:3])), modality=modality,
                        units=HU if modality == "CT" else RAW)
        inputs.append(preprocess_volume(volume, pp))
    inputs = np.stack(inputs)
    with model.inference():
        vectors = np.concatenate([model.encode_image(torch.from_numpy(inputs[s:s + 16])).float().numpy()
                                  for s in range(0, len(inputs), 16)])
    ids = np.array([s[0] for s in scans])
    model_top1 = top1_same_patient(vectors, ids)
    raw_top1 = top1_same_patient(inputs.reshape(len(inputs), -1).astype(np.float64), ids)
    return {"patients": patients, "scans": len(scans), "seed": seed, "size": size,
            "max_degrees": max_degrees, "max_shift_voxels": max_shift,
            "checkpoint": str(checkpoint) if checkpoint else f"packaged:{model_dir.name}",
            "top1_same_patient": {"model": model_top1, "raw_voxels": raw_top1, "chance": 1.0 / (len(scans) - 1)},
            "ratio_model_vs_raw": model_top1 / raw_top1 if raw_top1 else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="CLIP checkpoint directory (default: the packaged model)")
    parser.add_argument("--patients", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--size", default="small", choices=["tiny", "small", "full"])
    parser.add_argument("--max-degrees", type=float, default=4.0)
    parser.add_argument("--max-shift", type=float, default=3.0, help="voxels")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    result = measure(args.checkpoint, args.patients, args.seed, args.size, args.max_degrees, args.max_shift)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    top = result["top1_same_patient"]
    print(f"\nrescan: {args.patients} patients x 2 scans (motion <= {args.max_degrees} deg, {args.max_shift} voxels; "
          f"new noise; gain 0.97-1.03)")
    print(f"{'retriever':<14} {'top-1 same patient':>18}")
    for name in ("model", "raw_voxels", "chance"):
        print(f"{name.replace('_', ' '):<14} {top[name]:18.3f}")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
