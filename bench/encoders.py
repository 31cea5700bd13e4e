"""DCFormer inference throughput on CPU (fp32): BatchNorm folded vs the same module unfolded, one run.

    python bench/encoders.py            # 1x128x256x256, the Med3DVLM input size
    python bench/encoders.py --quick    # 1x64x128x128

Both modules run in this process under torch.inference_mode, timed alternately in ABBA order so that
load from other processes and order effects hit both alike; the result is their ratio, from wall time
(volumes/s) and from process CPU seconds (steadier when other jobs share the cores).
Prints a table and writes bench/results/encoders.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from voxsearch.encoders import dcformer, fold_batchnorm, inference_context

RESULTS = Path(__file__).resolve().parent / "results" / "encoders.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small input (1x64x128x128) and fewer repeats")
    p.add_argument("--variants", nargs="+", default=["nano", "small"])
    p.add_argument("--size", type=int, nargs=3, metavar=("D", "H", "W"), help="override the input size")
    p.add_argument("--repeats", type=int, help="timed forward passes per module (default 4, quick 4)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def time_pair(baseline, candidate, x: torch.Tensor, repeats: int) -> tuple[dict, dict, float]:
    """Alternate the two modules; per-pass wall and process-CPU seconds of each, and the largest
    relative output difference. CPU seconds are reported too because on a shared machine they are far
    less disturbed by other processes than wall time."""
    times = {name: {"wall_s": [], "cpu_s": []} for name in ("baseline", "candidate")}
    with inference_context("cpu"):
        ref = baseline(x)  # warm-up (allocator, oneDNN primitive caches) for both
        out = candidate(x)
        max_diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(out, ref))
        pair = [("baseline", baseline), ("candidate", candidate)]
        for i in range(repeats):
            # ABBA order: whatever the second pass of a pair gains or loses (caches, a neighbour's
            # burst) falls on each module equally.
            for name, module in (pair if i % 2 == 0 else pair[::-1]):
                wall, cpu = time.perf_counter(), time.process_time()
                module(x)
                times[name]["cpu_s"].append(time.process_time() - cpu)
                times[name]["wall_s"].append(time.perf_counter() - wall)
    return times["baseline"], times["candidate"], max_diff


def write_result(path: Path, key: str, result: dict) -> None:
    """Keep the quick and the full run side by side in one file (temp file + rename)."""
    runs = {}
    if path.is_file():
        try:
            runs = json.loads(path.read_text()).get("runs", {})
        except (json.JSONDecodeError, AttributeError):
            runs = {}  # an unreadable old result is replaced, not merged
    runs[key] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": "encoders", "runs": runs}, indent=2))
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    size = tuple(args.size) if args.size else ((64, 128, 128) if args.quick else (128, 256, 256))
    repeats = args.repeats or 4
    torch.manual_seed(0)
    x = torch.rand(1, 1, *size)
    load_before = os.getloadavg()
    rows = []
    for variant in args.variants:
        model = dcformer(variant).eval()
        folded = fold_batchnorm(copy.deepcopy(model))
        base_t, fold_t, diff = time_pair(model, folded, x, repeats)
        base_wall, fold_wall = statistics.median(base_t["wall_s"]), statistics.median(fold_t["wall_s"])
        base_cpu, fold_cpu = statistics.median(base_t["cpu_s"]), statistics.median(fold_t["cpu_s"])
        rows.append({
            "variant": variant,
            "input": [1, 1, *size],
            "unfolded_vol_per_s": 1.0 / base_wall,
            "folded_vol_per_s": 1.0 / fold_wall,
            "speedup_folded_vs_unfolded": base_wall / fold_wall,
            "unfolded_cpu_s_per_vol": base_cpu,
            "folded_cpu_s_per_vol": fold_cpu,
            "cpu_speedup_folded_vs_unfolded": base_cpu / fold_cpu,
            "unfolded": base_t,
            "folded": fold_t,
            "max_rel_output_diff": diff,
        })
        print(f"  {variant}: done", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    header = (f"{'variant':<8} {'input':<16} {'unfolded vol/s':>15} {'folded vol/s':>13} {'ratio':>7} "
              f"{'unfolded cpu-s':>15} {'folded cpu-s':>13} {'cpu ratio':>9} {'max rel diff':>13}")
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = "x".join(str(s) for s in r["input"])
        print(f"{r['variant']:<8} {shape:<16} {r['unfolded_vol_per_s']:>15.3f} {r['folded_vol_per_s']:>13.3f} "
              f"{r['speedup_folded_vs_unfolded']:>6.2f}x {r['unfolded_cpu_s_per_vol']:>15.2f} "
              f"{r['folded_cpu_s_per_vol']:>13.2f} {r['cpu_speedup_folded_vs_unfolded']:>8.2f}x "
              f"{r['max_rel_output_diff']:>13.1e}")
    print(f"fp32 CPU, {args.threads} threads, median of {repeats}; cpu-s = process CPU seconds per volume; "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} cores")

    result = {
        "baseline": "same DCFormer module without BatchNorm folding, same process, alternating passes",
        "quick": args.quick,
        "repeats": repeats,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_before_after": [load_before[0], load_after[0]],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rows": rows,
    }
    write_result(args.out, "quick" if args.quick else "full", result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
