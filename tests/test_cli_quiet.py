"""The command line as a user meets it: the project's own lines without Ray's logs (unless --verbose),
and Ctrl-C or SIGTERM stop every process a command started.

Each test runs `voxsearch` as a subprocess in a session of its own; the processes of that session are
the ones the command started (Ray's workers change their process group, not their session), so other
Ray instances on the machine are neither counted nor touched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

# Lines that Ray's own loggers print in the driver (its format puts a tab before the level), Ray
# Data's execution reports, Serve's, worker output forwarded to the driver, and the line Ray's C++ core
# prints at error level for every Ray Data actor pool (ray-project/ray#57733), which the program filters
# from its native stderr (voxsearch.common.native_stderr).
RAY_NOISE = re.compile(
    r"\d,\d{3}\t(DEBUG|INFO|WARNING) |streaming_executor|Progress bars disabled|Started a local Ray"
    r"|Token authentication|Dataset job will hang|\((raylet|pid=\d+|\w+ pid=\d+)\)| serve \d+ -- "
    r"|faiss\.loader|has constructor arguments in the object store"
)


def _env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "voxsearch.cli", *args], env=_env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
            # A shell that starts a job in the background makes it ignore SIGINT; Ctrl-C is tested here.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def _session(sid: int) -> list[str]:
    """Live processes of session `sid`, as 'pid name'."""
    found = []
    for proc in psutil.process_iter(["name", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) == sid:
                found.append(f"{proc.pid} {proc.info['name']}")
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _left_behind(proc: subprocess.Popen, within_s: float = 10.0) -> list[str]:
    """What of the command's session still runs `within_s` after it exited; kills that too, so that
    a failing test leaves nothing running either."""
    deadline = time.monotonic() + within_s
    while (left := _session(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for entry in left:
        try:
            os.kill(int(entry.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _finish(proc: subprocess.Popen, timeout_s: float) -> list[str]:
    """Waits for the command (killing its session if it overruns); returns `_left_behind`."""
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    return _left_behind(proc)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    from voxsearch.ingest import SynthConfig, generate_archive

    out = tmp_path_factory.mktemp("quiet") / "archive"
    return generate_archive(SynthConfig(n=2, seed=11, out=out, size="tiny", dicom_share=0.5))


def _ingest(archive: Path, tmp_path: Path, *options: str) -> str:
    """`voxsearch [options] ingest` on Ray; its output. No process may outlive it (10 s allowed)."""
    log = tmp_path / "ingest.log"
    proc = _start([*options, "ingest", str(archive), "--out", str(tmp_path / "catalog"), "--engine", "ray",
                   "--workers", "1", "--no-progress"], log)
    left = _finish(proc, timeout_s=600)
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, output
    assert left == [], f"outlived `voxsearch ingest`: {left}"
    return output


def test_ingest_prints_the_projects_lines_not_rays(archive, tmp_path):
    output = _ingest(archive, tmp_path)
    assert "voxsearch.ingest.pipeline: ingest done: 2 added" in output and '"added": 2' in output, output
    assert not RAY_NOISE.search(output), RAY_NOISE.search(output).group(0)


@pytest.mark.slow  # a second local Ray; it shows the lines the test above finds missing are Ray's to print
def test_verbose_shows_rays_logs(archive, tmp_path):
    output = _ingest(archive, tmp_path, "--verbose")
    assert RAY_NOISE.search(output) and "ingest done: 2 added" in output, output


# --------------------------------------------------------------------------------------- signals
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servable(archive, tmp_path_factory) -> dict:
    """A catalog (ingested without Ray), a random nano CLIP model, an index and a light serve config."""
    import numpy as np
    import torch

    from voxsearch.encoders import ClipConfig, ClipModel, TextTowerConfig, save_clip
    from voxsearch.index import VectorIndex
    from voxsearch.ingest import IngestConfig, PreprocessConfig, read_catalog, run_ingest

    root = tmp_path_factory.mktemp("servable")
    size = (32, 64, 64)
    summary = run_ingest(IngestConfig(archive=archive, out=root / "catalog", engine="local", salt="s", progress=False))
    assert summary.added == 2
    torch.manual_seed(0)
    model = ClipModel(ClipConfig(vision_variant="nano", embed_dim=32, text=TextTowerConfig(max_length=32),
                                 image_size=size))
    save_clip(model, root / "ckpt", extra={"preprocess": PreprocessConfig(spatial_size=size).to_dict()})
    ids = read_catalog(root / "catalog").column("series_id").to_pylist()
    VectorIndex.build(ids, np.random.default_rng(0).normal(size=(len(ids), 32)).astype("float32")).save(root / "index")
    light = {"num_cpus": 0.05}
    names = ("ingress", "text_encoder", "image_encoder", "searcher", "studies", "reporter")
    (root / "serve.json").write_text(json.dumps({"deployments": {name: light for name in names}}))
    return {"index": root / "index", "checkpoint": root / "ckpt", "catalog": root / "catalog",
            "config": root / "serve.json"}


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"voxsearch serve exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(f"{url}/api/v1/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"voxsearch serve was not ready after {timeout_s:.0f}s:\n{log.read_text(errors='replace')}")


@pytest.mark.slow  # Serve's start-up: ~20 s per server on two cores, more when they are busy
@pytest.mark.parametrize("how", ["SIGTERM to the command", "Ctrl-C (SIGINT to its process group)"])
def test_serve_stops_with_every_process_it_started(servable, tmp_path, how):
    port = _free_port()
    log = tmp_path / "serve.log"
    proc = _start(["serve", "--index", str(servable["index"]), "--checkpoint", str(servable["checkpoint"]),
                   "--catalog", str(servable["catalog"]), "--config", str(servable["config"]),
                   "--port", str(port)], log)
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}", log)
        started = len(_session(proc.pid))
        if how.startswith("SIGTERM"):
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
    finally:
        left = _finish(proc, timeout_s=0)
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, f"after {how}, exit status {proc.returncode} (-9: still running at 20 s):\n{output}"
    assert "stopping" in output and "Traceback" not in output and "SIGTERM received" not in output, output
    assert not RAY_NOISE.search(output), RAY_NOISE.search(output).group(0)
    assert started > 5  # Ray's processes (GCS, raylet, agents) and Serve's were there to stop
    assert left == [], f"outlived `voxsearch serve` by 10 s: {left}"
