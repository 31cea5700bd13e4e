"""`voxsearch synth`: write the seeded phantom archive."""

from __future__ import annotations


def register(sub):
    p = sub.add_parser(
        "synth",
        help="write a synthetic phantom archive (NIfTI + DICOM + M3D, reports, ground truth)",
        description="Write a seeded archive of CT/MR phantoms with findings and free-text reports.\n"
        "Example: voxsearch synth --n 200 --out data/synth --dicom-share 0.25 --bad-files 7",
    )
    p.add_argument("--n", type=int, default=200, help="number of good studies (default 200)")
    p.add_argument("--out", required=True, help="archive folder to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=["tiny", "small", "full"], default="small",
                   help="voxel grid: tiny ~40 px (tests), small ~96 px, full 256 px")
    p.add_argument("--dicom-share", type=float, default=0.25, help="share of studies written as DICOM series")
    p.add_argument("--m3d-share", type=float, default=0.0, help="share written M3D-style (.npy + M3D_Cap.json)")
    p.add_argument("--bad-files", type=int, default=0, help="planted defective inputs on top of --n")
    p.add_argument("--split-shares", type=float, nargs=3, metavar=("TRAIN", "VALIDATION", "TEST"),
                   default=(0.8, 0.1, 0.1), help="patient shares of the three splits (default 0.8 0.1 0.1)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from voxsearch.ingest import SynthConfig, generate_archive

    try:
        cfg = SynthConfig(n=args.n, seed=args.seed, out=args.out, size=args.size, dicom_share=args.dicom_share,
                          m3d_share=args.m3d_share, bad_files=args.bad_files, overwrite=args.overwrite,
                          split_shares=tuple(args.split_shares))
        path = generate_archive(cfg)
    except (ValueError, FileExistsError) as exc:
        print(f"voxsearch synth: {exc}")
        return 2
    print(f"wrote {args.n} studies (+{args.bad_files} planted bad inputs) to {path}")
    return 0
