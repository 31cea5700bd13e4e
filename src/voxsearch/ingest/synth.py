"""`generate_archive`: the seeded phantom archive (NIfTI + DICOM + M3D, manifest with ground truth)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voxsearch.common.durable import replace_dir
from voxsearch.ingest import synth_defects
from voxsearch.ingest.synth_phantom import GRIDS, render
from voxsearch.ingest.synth_report import write_report
from voxsearch.ingest.synth_vocab import BODY_PARTS, CT_PHASES, MR_PHASES, sample_findings
from voxsearch.ingest.synth_writers import (
    STORAGE_ORIENTATIONS,
    fake_patient,
    reorient,
    write_dicom_series,
    write_nifti,
    write_npy,
)

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["path", "report", "split", "findings", "abnormal", "patient_id", "modality", "body_part",
                    "contrast_phase", "study_date"]


@dataclass
class SynthConfig:
    n: int = 200  # good studies (planted bad files come on top)
    seed: int = 0
    out: Path = Path("synth_archive")
    dicom_share: float = 0.25
    m3d_share: float = 0.0
    bad_files: int = 0
    size: str = "small"  # "tiny" (tests, ~40 px), "small" (~96 px), "full" (256 px)
    ct_share: float = 0.65
    studies_per_patient: float = 1.4  # >1: some patients have several studies (split by patient!)
    split_shares: tuple = (0.8, 0.1, 0.1)
    overwrite: bool = False

    def __post_init__(self):
        self.out = Path(self.out)
        if self.size not in GRIDS:
            raise ValueError(f"size must be one of {sorted(GRIDS)}, got {self.size!r}")
        if self.n < 1:
            raise ValueError("n must be >= 1")
        if not 0.0 <= self.dicom_share + self.m3d_share <= 1.0:
            raise ValueError("dicom_share + m3d_share must lie in [0, 1]")


def _formats(cfg: SynthConfig) -> list[str]:
    n_dicom = int(round(cfg.n * cfg.dicom_share))
    n_m3d = int(round(cfg.n * cfg.m3d_share))
    fmts = ["dicom"] * n_dicom + ["m3d"] * n_m3d + ["nifti"] * (cfg.n - n_dicom - n_m3d)
    return [fmts[i] for i in np.random.default_rng([cfg.seed, 1]).permutation(cfg.n)]


def _patients(cfg: SynthConfig) -> tuple[list[int], dict[int, str]]:
    rng = np.random.default_rng([cfg.seed, 2])
    n_patients = max(1, int(round(cfg.n / cfg.studies_per_patient)))
    assign = list(range(n_patients)) + [int(v) for v in rng.integers(0, n_patients, size=cfg.n - n_patients)]
    assign = [assign[i] for i in rng.permutation(cfg.n)] if cfg.n >= n_patients else list(range(cfg.n))
    order = rng.permutation(n_patients)
    n_val = max(1, int(round(n_patients * cfg.split_shares[1]))) if n_patients >= 3 else 0
    n_test = max(1, int(round(n_patients * cfg.split_shares[2]))) if n_patients >= 3 else 0
    split = {}
    for rank, p in enumerate(order):
        split[int(p)] = "validation" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return assign, split


@dataclass
class PhantomStudy:
    """One rendered study: the voxels in RAS order (HU for CT, T1 units for MR), ground truth, report."""

    array: np.ndarray
    affine: np.ndarray
    modality: str
    body_part: str
    phase: str
    findings: list
    report: str


def render_study(rng: np.random.Generator, size: str = "small", ct_share: float = 0.65,
                 force_ct: bool = False, noise: bool = True) -> PhantomStudy:
    """A random study drawn as the archive draws them (for benches and tests that need pixels, not files);
    ``noise=False``: the noiseless object (see synth_phantom.render)."""
    modality = "CT" if force_ct or rng.random() < ct_share else "MR"
    body_part = str(rng.choice(BODY_PARTS))
    phase = str(rng.choice(CT_PHASES[body_part] if modality == "CT" else MR_PHASES))
    findings = sample_findings(rng, body_part, phase)
    array, affine = render(rng, body_part, modality, phase, findings, size, noise=noise)
    report = write_report(rng, modality, body_part, phase, findings)
    return PhantomStudy(array, affine, modality, body_part, phase, findings, report)


def _study(cfg: SynthConfig, i: int, fmt: str, patient: dict, split: str, root: Path) -> dict:
    rng = np.random.default_rng([cfg.seed, 100, i])
    drawn = render_study(rng, cfg.size, cfg.ct_share, force_ct=fmt == "m3d")
    array, affine, modality, body_part = drawn.array, drawn.affine, drawn.modality, drawn.body_part
    phase, findings, report = drawn.phase, drawn.findings, drawn.report
    date = (dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3650)))).isoformat()
    key = f"study{i:05d}"
    if fmt == "nifti":
        stored, stored_aff = reorient(array, affine, str(rng.choice(STORAGE_ORIENTATIONS)))
        rel = f"nifti/{key}.nii.gz"
        write_nifti(root / rel, stored, stored_aff, modality, scaled=bool(rng.random() < 0.25))
    elif fmt == "dicom":
        stored, stored_aff = reorient(array, affine, str(rng.choice(["LPS", "LAS", "RPS", "LPI"])))
        rel = f"dicom/{key}"
        uids = {k: f"2.25.{int.from_bytes(rng.bytes(12), 'big')}" for k in ("study", "series", "frame")}
        study = {"date": date, "accession": f"ACC{int(rng.integers(10**6, 10**7))}", "body_part": body_part}
        write_dicom_series(root / rel, stored, stored_aff, modality, uids, patient, study, rng)
    else:
        rel = f"m3d/{key}/image.npy"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_npy(root / rel, array, modality)
        (root / rel).with_name("text.txt").write_text(report + "\n")
    return {
        "path": rel, "report": report, "split": split, "findings": json.dumps(findings),
        "abnormal": bool(findings), "patient_id": patient["id"], "modality": modality, "body_part": body_part,
        "contrast_phase": phase, "study_date": date, "_format": fmt,
    }


def generate_archive(cfg: SynthConfig) -> Path:
    """Write the archive to cfg.out (built in a temporary sibling folder, then renamed into place)."""
    out = cfg.out.resolve()
    if out.exists():
        if not cfg.overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(cfg, tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(cfg: SynthConfig, root: Path) -> None:
    from tqdm import tqdm

    assign, split_of = _patients(cfg)
    prng = np.random.default_rng([cfg.seed, 3])
    people = {p: fake_patient(prng, p) for p in sorted(set(assign))}
    rows = []
    for i, fmt in enumerate(tqdm(_formats(cfg), desc="synth", unit="study", disable=cfg.n < 50)):
        rows.append(_study(cfg, i, fmt, people[assign[i]], split_of[assign[i]], root))
    m3d = [r for r in rows if r["_format"] == "m3d"]
    if m3d:
        cap = {"train": [], "validation": [], "test": []}
        for r in m3d:
            rel = Path(r["path"]).relative_to("m3d")
            cap[r["split"]].append({"image": rel.as_posix(), "text": (rel.parent / "text.txt").as_posix()})
        (root / "m3d" / "M3D_Cap.json").write_text(json.dumps(cap, indent=1))
    defects = []
    drng = np.random.default_rng([cfg.seed, 4])
    kinds = list(synth_defects.DEFECTS)
    for j in range(cfg.bad_files):
        kind = kinds[j % len(kinds)]
        patient = fake_patient(drng, 900 + j)
        rel = synth_defects.write_defect(kind, root, f"bad/{kind}_{j:03d}", drng, patient)
        defects.append({"path": rel, "defect": kind, "expect": synth_defects.DEFECTS[kind]})
        rows.append({"path": rel, "report": "" if kind == "missing_report" else "FINDINGS: Unremarkable.",
                     "split": "train", "findings": "[]", "abnormal": False, "patient_id": patient["id"],
                     "modality": "CT", "body_part": "abdomen", "contrast_phase": "non-contrast",
                     "study_date": "2020-01-01"})
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (root / "planted_defects.json").write_text(json.dumps(defects, indent=1))
    (root / "synth_config.json").write_text(json.dumps({**{k: v for k, v in vars(cfg).items() if k != "out"},
                                                        "split_shares": list(cfg.split_shares)}, indent=1))
