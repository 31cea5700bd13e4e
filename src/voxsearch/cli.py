"""The `voxsearch` command line: the top floor, importing the components (never the reverse)."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import signal
import sys

from voxsearch import __version__, commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxsearch",
        description="Search archives of 3D medical scans (CT, MRI) by free text and by example scan.",
    )
    parser.add_argument("--version", action="version", version=f"voxsearch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show Ray's logs and other libraries', at debug level (default: the project's "
                        "progress lines and results, and Ray's errors)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        # Import lazily by name so a command's heavy dependencies (torch, ray) load only when it runs.
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None, *, whole_process: bool = False) -> int:
    """Run one command. ``whole_process``: this process is the `voxsearch` program (entry), so it may also
    filter what native code writes to its stderr; callers inside a larger process (tests) leave that alone."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if whole_process and not args.verbose:
        from voxsearch.common.native_stderr import filter_native_stderr

        filter_native_stderr()  # before logging is set up, so that its handler writes to the real stderr
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("voxsearch").setLevel(logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from voxsearch.common.runtime import (Terminated, ray_initialized, show_ray_logs, shutdown_ray,
                                         sigterm_as_interrupt)

    show_ray_logs(args.verbose)
    ray_before = ray_initialized()  # called in a process that runs Ray already (tests): leave it be
    with sigterm_as_interrupt():
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt as stop:
            sig = signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT
            print(f"voxsearch: stopped by {sig.name}", file=sys.stderr, flush=True)
            return 128 + sig
        finally:
            if not ray_before:
                shutdown_ray()


def entry() -> int:
    """The `voxsearch` program: the console script and `python -m voxsearch.cli`."""
    return main(whole_process=True)


if __name__ == "__main__":
    sys.exit(entry())
