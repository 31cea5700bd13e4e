"""The installed distribution: only voxsearch.* modules, and a command line with a subcommand per stage."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    # --no-isolation: build with the venv's setuptools, so the test needs no registry.
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("voxsearch-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_wheel_installs_only_the_voxsearch_package(wheel_names):
    top_level = {name.split("/")[0] for name in wheel_names}
    assert top_level == {"voxsearch", "voxsearch-0.1.0.dist-info"}, top_level


@pytest.mark.parametrize("component", ["common", "ingest", "encoders", "index", "embed", "training", "reports", "sync", "serve"])
def test_wheel_maps_each_component_under_voxsearch(wheel_names, component):
    assert f"voxsearch/{component}/__init__.py" in wheel_names
    assert not any(name.startswith(f"{component}/") for name in wheel_names)


def test_wheel_has_no_tests_or_benchmarks(wheel_names):
    assert not any("/tests/" in n or n.startswith(("tests/", "bench/")) for n in wheel_names)


def test_command_line_lists_a_subcommand_per_stage():
    out = subprocess.run(
        [sys.executable, "-m", "voxsearch.cli", "--help"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    for command in ["synth", "ingest", "train", "embed", "index", "serve", "search", "demo"]:
        assert f"    {command}" in out, f"`voxsearch {command}` missing from --help:\n{out}"


def test_every_subcommand_explains_itself():
    from voxsearch.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sub.choices, "no subcommands registered"
    for name, subparser in sub.choices.items():
        text = subparser.format_help()
        assert subparser.description or any(h.dest == name and h.help for h in sub._choices_actions), name
        assert "usage:" in text
