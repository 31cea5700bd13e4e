"""DCFormer image-feature throughput on CPU (fp32): the unoptimised module against the inference paths.

    python bench/encoders.py            # 1x1x128x256x256, the Med3DVLM input size
    python bench/encoders.py --quick    # 1x1x64x128x128

Baseline: the module computing as the published Med3DVLM implementation does (BatchNorm unfolded,
contiguous layout, eager; each decomposed convolution's three branches summed into a new tensor, the
layer-scaled MLP output added as a new tensor), which times like it. Candidates, all in this process:
  module     voxsearch's module as built (sums accumulated in place), BatchNorm unfolded: training's
  folded     + BatchNorm folded into the convolutions
  eager      + channels-last layout: ClipModel.prepare_for_inference(), serving's default
  compiled   eager + torch.compile (Inductor, frozen weights): measured, not used (no gain over eager
             once the sums are in place, and seconds of compiling per process)

Every module computes the pooled last-stage features (what the image embedding is made from) of the
same input. Passes rotate through the modules so that load from other processes and order effects hit
all alike; ratios come from wall time and from process CPU seconds (steadier on a shared machine).
The compute floor is the model's FLOPs over this machine's measured fp32 matrix-multiply rate.
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
import types
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from voxsearch.encoders import dcformer, fold_batchnorm, inference_context
from voxsearch.encoders.dcformer import ConvBlock, DecompConv3d

RESULTS = Path(__file__).resolve().parent / "results" / "encoders.json"
TARGET = 2.0  # issue 18: >= 2x the published implementation
TOLERANCE = 1e-4  # relative to the unoptimised module's output


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small input (1x1x64x128x128)")
    p.add_argument("--variants", nargs="+", default=["nano", "small"])
    p.add_argument("--size", type=int, nargs=3, metavar=("D", "H", "W"), help="override the input size")
    p.add_argument("--repeats", type=int, default=4, help="timed passes per module")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled candidate")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def _published_sum(self, x):
    return self.c1(x) + self.c2(x) + self.c3(x)


def _published_block(self, x):
    if self.downsample:
        x = self.proj(self.pool(x))
    y = self.scale * self.mlp(self.dwconv(x).permute(0, 2, 3, 4, 1))
    return x + y.permute(0, 4, 1, 2, 3)


def as_published(model):
    """The same weights computing in the published order and allocation pattern."""
    for m in model.modules():
        if isinstance(m, DecompConv3d):
            m.forward = types.MethodType(_published_sum, m)
        elif isinstance(m, ConvBlock):
            m.forward = types.MethodType(_published_block, m)
    return model


def pooled(module):
    return lambda x: module.feature_maps(x)[-1].mean(dim=(2, 3, 4))


def matmul_gflops(seconds: float = 1.0) -> float:
    """fp32 GEMM rate this process reaches now (2048^3): the practical compute peak."""
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return n * 2 * 2048 ** 3 / (time.perf_counter() - start) / 1e9


def model_gflop(model, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        pooled(model)(x)
    return counter.get_total_flops() / 1e9


def time_modules(candidates: dict, x: torch.Tensor, repeats: int) -> tuple[dict, dict]:
    """Per-pass wall and CPU seconds of each function, passes rotated; largest relative output
    difference of each against the first (the baseline)."""
    times = {name: {"wall_s": [], "cpu_s": []} for name in candidates}
    names = list(candidates)
    with inference_context("cpu"):
        outputs = {name: fn(x) for name, fn in candidates.items()}  # warm-up (and compilation)
        ref = outputs[names[0]]
        diffs = {name: float((out - ref).abs().max() / ref.abs().max()) for name, out in outputs.items()}
        for i in range(repeats):
            for name in names[i % len(names):] + names[:i % len(names)]:
                wall, cpu = time.perf_counter(), time.process_time()
                candidates[name](x)
                times[name]["cpu_s"].append(time.process_time() - cpu)
                times[name]["wall_s"].append(time.perf_counter() - wall)
    return times, diffs


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
    torch.manual_seed(0)
    x = torch.rand(1, 1, *size)
    load_before = os.getloadavg()
    peak = matmul_gflops()
    rows = []
    for variant in args.variants:
        model = dcformer(variant).eval()
        # Random BatchNorm statistics, so that folding has something to fold (fresh modules hold 0 and 1).
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm3d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        published = as_published(copy.deepcopy(model))
        folded = fold_batchnorm(copy.deepcopy(model))
        eager = fold_batchnorm(copy.deepcopy(model)).use_channels_last()
        candidates = {"baseline": pooled(published), "module": pooled(model), "folded": pooled(folded),
                      "eager": pooled(eager)}
        compile_s = None
        if not args.no_compile:
            compiled = torch.compile(pooled(eager), options={"freezing": True})
            start = time.perf_counter()
            with inference_context("cpu"):
                compiled(x)
            compile_s = time.perf_counter() - start
            candidates["compiled"] = compiled
        gflop = model_gflop(model, x)
        times, diffs = time_modules(candidates, x, args.repeats)
        base_wall = statistics.median(times["baseline"]["wall_s"])
        base_cpu = statistics.median(times["baseline"]["cpu_s"])
        row = {"variant": variant, "input": [1, 1, *size], "gflop_per_volume": gflop,
               "floor_s_per_volume": gflop / peak, "compile_s": compile_s, "modules": {}}
        for name, t in times.items():
            wall, cpu = statistics.median(t["wall_s"]), statistics.median(t["cpu_s"])
            row["modules"][name] = {
                "vol_per_s": 1.0 / wall, "speedup": base_wall / wall, "cpu_s_per_volume": cpu,
                "cpu_speedup": base_cpu / cpu, "max_rel_diff": diffs[name], "within_tolerance": diffs[name] <= TOLERANCE,
                "achieved_gflops": gflop / wall, **t,
            }
        rows.append(row)
        print(f"  {variant}: done", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    header = (f"{'variant':<7} {'input':<15} {'module':<9} {'vol/s':>7} {'speedup':>8} {'cpu-s/vol':>10} "
              f"{'cpu speedup':>12} {'GFLOP/s':>8} {'max rel diff':>13}")
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = "x".join(str(s) for s in r["input"])
        for name, m in r["modules"].items():
            print(f"{r['variant']:<7} {shape:<15} {name:<9} {m['vol_per_s']:>7.2f} {m['speedup']:>7.2f}x "
                  f"{m['cpu_s_per_volume']:>10.2f} {m['cpu_speedup']:>11.2f}x {m['achieved_gflops']:>8.0f} "
                  f"{m['max_rel_diff']:>13.1e}")
        floor = f"floor {r['floor_s_per_volume']:.3f} s/volume ({r['gflop_per_volume']:.1f} GFLOP)"
        compiled = f", compiling took {r['compile_s']:.1f} s" if r["compile_s"] is not None else ""
        print(f"{'':<7} {'':<15} {floor}{compiled}")
    print(f"fp32 CPU, {args.threads} threads, median of {args.repeats}; target >= {TARGET:g}x the baseline "
          f"within {TOLERANCE:g} relative; fp32 matmul peak measured {peak:.0f} GFLOP/s; "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} cores")

    result = {
        "baseline": "DCFormer computing as published (BatchNorm unfolded, contiguous, eager, branch sums out of place), same process, rotated passes",
        "target_speedup": TARGET,
        "tolerance": TOLERANCE,
        "quick": args.quick,
        "repeats": args.repeats,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "matmul_peak_gflops": peak,
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
