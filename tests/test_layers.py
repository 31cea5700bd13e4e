"""The import rules of README's "How it fits together", checked by import-linter on every test run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _lint_imports() -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is not installed (it is in the dev extra)"
    return subprocess.run([exe, "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_components_import_only_downwards():
    run = _lint_imports()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout and "Contracts: 3 kept" in run.stdout, run.stdout


def test_the_contract_catches_a_component_importing_the_command_line(tmp_path):
    """The rule has teeth: a copy of the package where ingest imports the CLI breaks the contract."""
    shutil.copytree(REPO / "src" / "voxsearch", tmp_path / "src" / "voxsearch",
                    ignore=shutil.ignore_patterns("__pycache__", "pretrained"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "src" / "voxsearch" / "ingest" / "__init__.py", "a") as fh:
        fh.write("\nfrom voxsearch import cli  # planted: a component reaching up\n")
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    run = subprocess.run([exe, "--config", str(tmp_path / "pyproject.toml"), "--no-cache"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(tmp_path / "src"), "PATH": str(Path(sys.executable).parent)})
    assert run.returncode != 0, run.stdout
    assert "voxsearch.ingest -> voxsearch.cli" in run.stdout, run.stdout
