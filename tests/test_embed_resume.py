"""Kill a real `voxsearch embed` mid-run (the driver, or a model worker) and check the end state:
every catalog row exactly once, nothing lost, nothing doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from embed_testlib import ids_of, make_checkpoint

from voxsearch.embed import EmbedConfig, run_embedding
from voxsearch.common.runtime import RayConfig

WAIT_S = 300


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.getbasetemp() / "embed_checkpoint")


@pytest.fixture(scope="module")
def catalog_ids(tiny_catalog):
    from voxsearch.ingest import read_catalog

    return sorted(read_catalog(tiny_catalog).column("series_id").to_pylist())


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process we can see."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        table[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    return table


def _descendants(root: int) -> dict[int, str]:
    procs = _processes()
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, cmd) in procs.items():
            if ppid == parent and pid not in found:
                found[pid] = cmd
                frontier.append(pid)
    return found


def _start_embed(ray, catalog, checkpoint, out: Path) -> subprocess.Popen:
    """`voxsearch embed` as a separate driver on the test's Ray cluster (as on a real cluster: the driver
    can die while the cluster lives on)."""
    cmd = [sys.executable, "-m", "voxsearch.cli", "embed", "--catalog", str(catalog), "--checkpoint", str(checkpoint),
           "--out", str(out), "--shard-rows", "1", "--batch-size", "1", "--no-progress",
           "--ray-address", ray.get_runtime_context().gcs_address]
    env = dict(os.environ)
    # Own session: the driver and anything it starts can be killed together, by group id.
    # Output to a file: a pipe nobody reads could fill and stall the run.
    with open(out.parent / "embed.log", "wb") as log:
        return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)


def _log(out: Path) -> str:
    return (out.parent / "embed.log").read_text(errors="replace")[-3000:]


def _wait_for(predicate, proc: subprocess.Popen, out: Path, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"embed exited (rc {proc.returncode}) before {what}:\n{_log(out)}")
        if time.monotonic() > deadline:
            _kill_tree(proc)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's process group, then anything it started in a session of its own."""
    family = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def _raylet_pid(ray) -> int:
    """The raylet of the test's Ray cluster (found by its GCS address): parent of the cluster's workers."""
    gcs = ray.get_runtime_context().gcs_address
    raylets = [pid for pid, (_, cmd) in _processes().items()
               if cmd.split(" ")[0].endswith("/raylet") and f"--gcs-address={gcs}" in cmd]
    assert len(raylets) == 1, f"expected one raylet for {gcs}, found {raylets}"
    return raylets[0]


def _config(catalog, checkpoint, out: Path, **kw) -> EmbedConfig:
    return EmbedConfig(catalog=catalog, checkpoint=checkpoint, out=out, shard_rows=1, batch_size=1, progress=False,
                       ray=RayConfig(num_cpus=2), **kw)


def test_driver_killed_mid_run_then_rerun_completes_exactly_once(ray_session, tiny_catalog, checkpoint, catalog_ids,
                                                                  tmp_path):
    out = tmp_path / "emb"
    proc = _start_embed(ray_session, tiny_catalog, checkpoint, out)
    _wait_for(lambda: any(out.glob("part-*.parquet")), proc, out, "the first shard")
    _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL
    done_before = ids_of(out) + ids_of(out, errors=True)
    assert 0 < len(done_before) < len(catalog_ids), "the kill must land mid-run"
    assert (out / ".lock").exists()  # the killed run never released its lock

    summary = run_embedding(_config(tiny_catalog, checkpoint, out, index=tmp_path / "idx"))
    assert summary.skipped == len(done_before)
    assert summary.embedded + summary.failed == len(catalog_ids) - len(done_before)
    final = ids_of(out) + ids_of(out, errors=True)
    assert len(final) == len(set(final)), "a row was written twice"
    assert sorted(final) == catalog_ids, "a catalog row is missing"
    assert set(done_before) <= set(final) and not (out / ".lock").exists()
    assert not list(out.rglob(".*.tmp"))

    from voxsearch.index import VectorIndex

    assert sorted(VectorIndex.load(tmp_path / "idx").ids()) == sorted(ids_of(out))


@pytest.mark.slow
def test_model_worker_killed_mid_run_is_restarted_and_the_run_completes_exactly_once(ray_session, tiny_catalog,
                                                                                     checkpoint, catalog_ids, tmp_path):
    out = tmp_path / "emb"
    proc = _start_embed(ray_session, tiny_catalog, checkpoint, out)
    _wait_for(lambda: any(out.glob("part-*.parquet")), proc, out, "the first shard")
    # The test's raylet started every worker of this cluster; this run's model actor is the only one alive.
    workers = [pid for pid, cmd in _descendants(_raylet_pid(ray_session)).items()
               if "BulkEncoder" in cmd or "ReadAndEncode" in cmd]
    assert len(workers) == 1, f"expected one model actor process, found {workers}"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    try:
        proc.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        pytest.fail("the run did not finish after its model worker was killed")
    assert proc.returncode == 0, _log(out)
    final = ids_of(out) + ids_of(out, errors=True)
    assert len(final) == len(set(final)) and sorted(final) == catalog_ids
