"""PACS throughput and latency: studies per second pulled from a local Orthanc, embedded and indexed, against
the same series synced from a folder, in one run; and the delay from a study's upload to its first
appearance in the index with `sync --every 5`.

    python bench/pacs.py --quick          # 20 studies
    python bench/pacs.py --studies 300    # "a few hundred"

Needs the Debian packages orthanc and orthanc-dicomweb. Writes bench/results/pacs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="20 studies")
    ap.add_argument("--every", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pacs.json")
    args = ap.parse_args()
    n = 20 if args.quick else args.studies

    from embed_testlib import make_checkpoint
    from orthanc_server import PASSWORD, USER, Orthanc, available

    reason = available()
    if reason:
        print(f"skipped: {reason}")
        return 2
    from voxsearch.sync.job import SyncConfig, sync_forever, sync_round
    from voxsearch.index import VectorIndex
    from voxsearch.ingest import SynthConfig, generate_archive
    from voxsearch.common.runtime import init_ray

    os.environ["VOXSEARCH_DICOMWEB_USER"], os.environ["VOXSEARCH_DICOMWEB_PASSWORD"] = USER, PASSWORD
    work = Path(tempfile.mkdtemp(prefix="voxsearch-bench-pacs-"))
    archive = generate_archive(SynthConfig(n=n + 1, seed=5, out=work / "archive", size="tiny", dicom_share=1.0))
    series = sorted({p.parent for p in archive.rglob("*.dcm")})
    late, series = series[-1], series[:-1]
    folder = work / "folder"
    folder.mkdir()
    for s in series:  # the folder baseline holds exactly the series the PACS holds
        os.symlink(s, folder / s.name)
    ckpt = make_checkpoint(work / "ckpt")
    init_ray()
    rows = []
    with Orthanc(work / "orthanc") as pacs:
        t = time.perf_counter()
        for s in series:
            pacs.upload(sorted(s.glob("*.dcm")))
        upload_s = time.perf_counter() - t

        def timed(source: str, tag: str) -> dict:
            cfg = SyncConfig(source=source, catalog=work / f"{tag}-catalog", index=work / f"{tag}-index",
                             checkpoint=ckpt, progress=False)
            start = time.perf_counter()
            report = sync_round(cfg)
            seconds = time.perf_counter() - start
            return {"source": tag, "studies": report.added, "failed": report.failed, "seconds": round(seconds, 2),
                    "studies_per_s": round(report.added / seconds, 3), "cfg": cfg}

        # Warm-up on two studies: the first round in a process pays for starting Ray workers and importing
        # torch and MONAI in them; neither timed run should carry that.
        warm = work / "warm"
        warm.mkdir()
        for s in series[:2]:
            os.symlink(s, warm / s.name)
        timed(str(warm), "warm-up")
        folder_run = timed(str(folder), "folder")
        pacs_run = timed(pacs.dicomweb, "pacs")
        for run in (folder_run, pacs_run):
            run["ratio_vs_folder"] = round(run["studies_per_s"] / folder_run["studies_per_s"], 3)
            rows.append({k: v for k, v in run.items() if k != "cfg"})

        # Upload-to-searchable delay: a standing sync every N s, one new study uploaded while it runs.
        cfg = pacs_run["cfg"]
        threading.Thread(target=sync_forever, args=(cfg,), kwargs={"every": args.every}, daemon=True).start()
        time.sleep(args.every / 2)
        before = len(VectorIndex.load(cfg.index))
        uploaded = time.perf_counter()
        pacs.upload(sorted(late.glob("*.dcm")))
        delay = None
        while time.perf_counter() - uploaded < 20 * args.every + 120:
            if len(VectorIndex.load(cfg.index)) > before:
                delay = time.perf_counter() - uploaded
                break
            time.sleep(0.2)

    print(f"\nPACS sync, {n} synthetic DICOM studies (tiny size, DCFormer-nano random weights), STOW upload {upload_s:.1f} s")
    print(f"{'source':8} {'studies':>8} {'failed':>7} {'seconds':>8} {'studies/s':>10} {'vs folder':>10}")
    for r in rows:
        print(f"{r['source']:8} {r['studies']:8d} {r['failed']:7d} {r['seconds']:8.2f} {r['studies_per_s']:10.3f} {r['ratio_vs_folder']:10.3f}")
    print(f"upload -> in index with --every {args.every:g}: {delay:.1f} s" if delay else "upload never reached the index")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"studies": n, "upload_s": round(upload_s, 2), "runs": rows, "every_s": args.every,
              "upload_to_index_s": round(delay, 2) if delay else None}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    os._exit(0)  # the standing sync thread is a daemon loop; end it with the process


if __name__ == "__main__":
    sys.exit(main())
