"""Ingest speed and memory: series/s through read + preprocess, one in-process worker versus the
Ray Data pipeline on all cores (ratio from one run), and the peak memory of preprocessing one
512x512x300 CT to 128x256x256.

  python bench/ingest.py            # 24 small phantom studies, Med3DVLM input size
  python bench/ingest.py --quick    # 6 tiny studies, (32, 64, 64), smaller memory case
Writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "ingest.json"

MEMORY_PROBE = r"""
import json, sys, numpy as np, nibabel as nib
from pathlib import Path
from voxsearch.ingest import PreprocessConfig, preprocess_path
src, shape, size = Path(sys.argv[1]), tuple(json.loads(sys.argv[2])), tuple(json.loads(sys.argv[3]))
cfg = PreprocessConfig(spatial_size=size)
small = src.parent / "warm.nii"
nib.save(nib.Nifti1Image(np.full((16, 16, 16), -1000, np.int16), np.eye(4)), str(small))
preprocess_path(small, cfg)  # imports, pipeline construction: not part of the per-volume cost
def status(key):  # MiB; VmHWM is this process's peak (ru_maxrss would include the parent's, kept over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak to the current resident size
base = status("VmRSS")
out = preprocess_path(src, cfg)
print(json.dumps({"base_mib": base, "peak_mib": status("VmHWM"), "out_shape": list(out.shape)}))
"""


def _write_big_ct(folder: Path, shape, fmt: str) -> Path:
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    x, y, z = shape
    vol = np.full(shape, -1000, np.int16)
    yy, xx = np.ogrid[:y, :x]
    body = ((xx - x / 2) / (0.42 * x)) ** 2 + ((yy - y / 2) / (0.32 * y)) ** 2 <= 1
    vol[body.T, :] = 40
    vol += rng.integers(-10, 10, size=(1, 1, z), dtype=np.int16)
    affine = np.diag([-0.7, -0.7, 1.0, 1.0])  # LPS storage: the reader must reorient
    if fmt == "nifti":
        path = folder / "big.nii"
        nib.save(nib.Nifti1Image(vol, affine), str(path))
        return path
    from voxsearch.ingest.synth_writers import fake_patient, write_dicom_series

    path = folder / "big_dicom"
    uids = {"study": "2.25.1", "series": "2.25.2", "frame": "2.25.3"}
    study = {"date": "2020-01-01", "accession": "A", "body_part": "abdomen"}
    write_dicom_series(path, vol.astype(np.float32), affine, "CT", uids, fake_patient(rng, 0), study, rng)
    return path


def memory_case(shape, size, fmt: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = _write_big_ct(Path(tmp), shape, fmt)
        proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(src), json.dumps(shape), json.dumps(size)],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    raw_mib = shape[0] * shape[1] * shape[2] * 4 / 2**20
    return {"format": fmt, "input_shape": list(shape), "output_shape": res["out_shape"], "float32_volume_mib": round(raw_mib),
            "peak_extra_mib": round(res["peak_mib"] - res["base_mib"]), "process_peak_mib": round(res["peak_mib"])}


def _start_local_ray():
    import ray

    # A fresh local Ray of this process with no dashboard: init_ray's default (address None) would
    # join any other Ray already running on the machine. Ray waits a fixed 30 s for its raylet,
    # which a saturated machine can miss, hence the retries.
    for attempt in range(3):
        try:
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                     object_store_memory=500_000_000, log_to_driver=False, configure_logging=False)
            return ray
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(10)


def throughput(archive: Path, size, workers: int | None) -> dict:
    from voxsearch.ingest import IngestConfig, PreprocessConfig, run_ingest

    cfg = dict(archive=archive, salt="bench", progress=False, check_preprocess=PreprocessConfig(spatial_size=size))
    results = {}
    cpus = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        # Warm the local process (imports) so the baseline measures work, not start-up.
        run_ingest(IngestConfig(out=Path(tmp) / "warm", engine="local", **cfg))
        for name, engine, n in (("single worker (in-process)", "local", 1), ("Ray Data actor pool", "ray", workers)):
            if engine == "ray":
                try:
                    cpus = int(_start_local_ray().cluster_resources().get("CPU", 1))
                except Exception as exc:
                    results[name] = {"error": f"Ray did not start: {exc}"}
                    continue
            t0 = time.perf_counter()
            s = run_ingest(IngestConfig(out=Path(tmp) / engine, engine=engine, workers=n, **cfg))
            dt = time.perf_counter() - t0
            results[name] = {"series": s.added, "failed": s.failed, "seconds": round(dt, 2),
                             "series_per_s": round(s.added / dt, 3), "actors": n or cpus if engine == "ray" else 1}
    return {"cpus": cpus, "runs": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--only", choices=["memory", "speed"], help="run one half (results of the other are kept)")
    args = ap.parse_args()
    from voxsearch.ingest import SynthConfig, generate_archive

    n = args.n or (6 if args.quick else 24)
    size = (32, 64, 64) if args.quick else (128, 256, 256)
    mem_shape = (256, 256, 150) if args.quick else (512, 512, 300)
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.only == "speed":
        memory = previous.get("memory", [])
    else:
        memory = [memory_case(mem_shape, size, fmt) for fmt in ("nifti", "dicom")]
    print(f"\npreprocess memory: {mem_shape} int16 CT -> {size}")
    print(f"{'source':8s} {'float32 volume MiB':>19s} {'peak extra MiB':>15s} {'process peak MiB':>17s}")
    for m in memory:
        print(f"{m['format']:8s} {m['float32_volume_mib']:19d} {m['peak_extra_mib']:15d} {m['process_peak_mib']:17d}")
    if args.only == "memory":
        speed = {k: previous[k] for k in ("cpus", "runs") if k in previous}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            archive = generate_archive(SynthConfig(n=n, seed=5, out=Path(tmp) / "a", size="tiny" if args.quick else "small"))
            speed = throughput(archive, size, args.workers)
    if not speed.get("runs"):
        _save({"quick": args.quick, "memory": memory})
        return 0
    runs = list(speed["runs"].values())
    base = runs[0]["series_per_s"]
    ratio = runs[1]["series_per_s"] / base if "series_per_s" in runs[1] and base else float("nan")
    print(f"\ningest: {n} phantom studies, read + preprocess to {size}, {speed['cpus']} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'pipeline':34s} {'series':>6s} {'seconds':>8s} {'series/s':>9s} {'ratio':>6s}")
    for name, r in speed["runs"].items():
        if "error" in r:
            print(f"{name:34s} {r['error']}")
            continue
        print(f"{name:34s} {r['series']:6d} {r['seconds']:8.2f} {r['series_per_s']:9.3f} {r['series_per_s'] / base:6.2f}")
    _save({"quick": args.quick, "n": n, "spatial_size": list(size), "load_avg_1m": os.getloadavg()[0], **speed,
           "ray_vs_single_ratio": round(ratio, 3), "memory": memory})
    return 0


def _save(out: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_name(RESULTS.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, RESULTS)
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
