"""The pipeline on a real two-node Ray cluster (tests/cluster_testlib.py), driven through the command line's
--ray-address, against the same stages on one node.

The cluster's nodes work in folders of their own (node_b with its own HOME too) and the commands run in a
third one with relative paths: a worker that resolved a path against its own folder would write or read
the wrong place. Placement is read from the cluster's actor table: ingest workers, model actors, index
shards, training ranks and serving replicas must have run on both nodes.

In the default suite: `index build --shards 2` and `index search` on the cluster against one index in
this process. Slow (minutes on a 2-core machine): ingest, embed, sharded index and search against the
same stages on one node; training (2 DDP ranks on 2 nodes); serving (replicas on both nodes); losing a
node mid-embed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cluster_testlib import LocalCluster
from embed_testlib import ids_of

from voxsearch.encoders import packaged_checkpoint

CLI_TIMEOUT_S = 600
SALT = "cluster-test-salt"
BOTH = {"node_a", "node_b"}


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _cli(cwd: Path, *args: str, timeout: float = CLI_TIMEOUT_S) -> str:
    done = subprocess.run([sys.executable, "-m", "voxsearch.cli", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, (f"voxsearch {' '.join(args)} exited {done.returncode}\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def _start_cli(cwd: Path, log: Path, *args: str) -> subprocess.Popen:
    """A command left running; its own session, so it and anything it starts can be stopped together.
    Output to a file: a pipe nobody reads could fill and stall it."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "voxsearch.cli", *args], cwd=cwd, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 60) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _wait_for(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = CLI_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if proc.poll() is not None:
            pytest.fail(f"the command exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            _stop(proc, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    return found


def _ids(cluster: LocalCluster) -> set[str]:
    return {a["id"] for a in cluster.actors()}


def _new(cluster: LocalCluster, before: set[str], fragment: str) -> set[str]:
    """Nodes of the actors started since `before` (actor ids) whose class name contains `fragment`."""
    return {a["node_name"] for a in cluster.actors() if a["id"] not in before and fragment in a["class"]}


def _vectors(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    table = pq.read_table(folder)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), f"{folder}: a series embedded twice"
    image, text = table.column("vector").to_pylist(), table.column("text_vector").to_pylist()
    return {i: (np.asarray(v, np.float32), None if t is None else np.asarray(t, np.float32))
            for i, v, t in zip(ids, image, text)}


def _catalog(folder: Path) -> dict[str, tuple]:
    from voxsearch.ingest import read_catalog

    rows = read_catalog(folder).select(["series_id", "content_sha256", "modality", "body_part", "split"]).to_pylist()
    return {r["series_id"]: (r["content_sha256"], r["modality"], r["body_part"], r["split"]) for r in rows}


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(nodes=2) as c:
        yield c


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    from voxsearch.ingest import SynthConfig, generate_archive

    root = tmp_path_factory.mktemp("cluster")
    (root / "salt").write_text(SALT)
    return generate_archive(SynthConfig(n=6, seed=11, out=root / "run" / "archive", size="tiny", dicom_share=0.34))


@pytest.fixture(scope="module")
def one_node(archive, ray_session, tmp_path_factory) -> dict[str, Path]:
    """Catalog, embeddings and index made on one node: this process and its in-process Ray."""
    from voxsearch.embed import EmbedConfig, run_embedding
    from voxsearch.ingest import IngestConfig, run_ingest

    root = tmp_path_factory.mktemp("one_node")
    run_ingest(IngestConfig(archive=archive, out=root / "catalog", engine="local", salt=SALT, progress=False))
    run_embedding(EmbedConfig(catalog=root / "catalog", checkpoint=packaged_checkpoint(), out=root / "emb",
                              index=root / "index", progress=False))
    return {"catalog": root / "catalog", "emb": root / "emb", "index": root / "index"}


@pytest.fixture(scope="module")
def two_nodes(cluster, archive) -> dict:
    """The same stages on the cluster, each a `voxsearch` command with --ray-address and relative paths,
    and the nodes each stage's actors ran on."""
    run, address = archive.parent, ["--ray-address", cluster.address]
    placed = {}
    before = _ids(cluster)
    _cli(run, "ingest", "archive", "--out", "catalog", "--salt-file", "../salt", "--workers", "2", "--no-progress",
         *address)
    placed["ingest"] = _new(cluster, before, "MapWorker")
    before = _ids(cluster)
    _cli(run, "embed", "--catalog", "catalog", "--checkpoint", str(packaged_checkpoint()), "--out", "emb",
         "--index", "index", "--concurrency", "2", "--batch-size", "1", "--no-progress", *address)
    placed["embed"] = _new(cluster, before, "MapWorker")
    before = _ids(cluster)
    _cli(run, "index", "build", "emb", "--out", "sharded", "--shards", "2", *address)
    placed["shards"] = _new(cluster, before, "_Shard")
    return {"run": run, "placed": placed, "address": address}


def test_sharded_index_on_two_nodes_equals_one_index(cluster, tmp_path):
    from voxsearch.index import IndexConfig, VectorIndex

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    ids = [f"series-{i:03d}" for i in range(len(vectors))]
    np.save(tmp_path / "vectors.npy", vectors)
    (tmp_path / "ids.txt").write_text("\n".join(ids))
    address = ["--ray-address", cluster.address]
    before = _ids(cluster)
    _cli(tmp_path, "index", "build", "vectors.npy", "--ids", "ids.txt", "--out", "sharded", "--shards", "2",
         "--factory", "Flat", *address)
    assert _new(cluster, before, "_Shard") == BOTH
    # Saved where the driver asked (relative to its folder), not in the folders the nodes work in.
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        "shard-00000-of-00002", "shard-00001-of-00002", "sharded.json"]

    queries = ids[::50]
    out = _cli(tmp_path, "index", "search", "sharded", *[a for q in queries for a in ("--id", q)], "-k", "5",
               "--json", *address)
    found = {row["query"]: row["hits"] for row in map(json.loads, out.splitlines())}
    single = VectorIndex.build(ids, vectors, None, IndexConfig(factory="Flat"))
    for query, expected in zip(queries, single.search(vectors[::50], k=5)):
        assert [h["id"] for h in found[query]] == [h.id for h in expected], query
        assert np.allclose([h["score"] for h in found[query]], [h.score for h in expected], atol=1e-5), query


@pytest.mark.slow
def test_pipeline_on_two_nodes_equals_one_node(two_nodes, one_node):
    from voxsearch.index import VectorIndex

    assert two_nodes["placed"] == {"ingest": BOTH, "embed": BOTH, "shards": BOTH}
    run = two_nodes["run"]
    assert _catalog(run / "catalog") == _catalog(one_node["catalog"])

    mine, theirs = _vectors(run / "emb"), _vectors(one_node["emb"])
    assert sorted(mine) == sorted(theirs) == sorted(_catalog(one_node["catalog"]))
    for series, (image, text) in theirs.items():
        assert np.allclose(mine[series][0], image, atol=1e-5), series
        assert (mine[series][1] is None) == (text is None), series
        assert text is None or np.allclose(mine[series][1], text, atol=1e-5), series

    single = VectorIndex.load(one_node["index"])
    queries = sorted(theirs)[:3]
    expected = {q: [h.id for h in single.search(theirs[q][0][None], k=4)[0]] for q in queries}
    built_there = VectorIndex.load(run / "index")
    assert {q: [h.id for h in built_there.search(theirs[q][0][None], k=4)[0]] for q in queries} == expected

    # Both shards where the driver asked for them (not in a node's own folder), searched on both nodes.
    assert sorted(p.name for p in (run / "sharded").iterdir()) == [
        "shard-00000-of-00002", "shard-00001-of-00002", "sharded.json"]
    out = _cli(run, "index", "search", "sharded", *[a for q in queries for a in ("--id", q)], "-k", "4", "--json",
               *two_nodes["address"])
    assert {row["query"]: [h["id"] for h in row["hits"]] for row in map(json.loads, out.splitlines())} == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_with_replicas_on_both_nodes_answers_as_one_node(cluster, two_nodes, one_node, tmp_path):
    import torch

    from voxsearch.encoders import load_clip
    from voxsearch.index import VectorIndex

    run, port = two_nodes["run"], _free_port()
    two = {"num_replicas": 2, "num_cpus": 0.2}
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"colocate_data": False, "deployments": {"text_encoder": two, "searcher": two}}))
    before, log = _ids(cluster), tmp_path / "serve.log"
    proc = _start_cli(run, log, "serve", "--index", "index", "--checkpoint", str(packaged_checkpoint()),
                      "--catalog", "catalog", "--port", str(port), "--config", str(config), *two_nodes["address"])
    try:
        _wait_for(lambda: "voxsearch is serving at" in log.read_text(), proc, log, "the server")
        query = "hypodense lesion in the liver"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/search/text", method="POST",
                                         data=json.dumps({"query": query, "k": 4}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            served = [hit["series_id"] for hit in json.load(response)["results"]]
        assert _new(cluster, before, "TextEncoder") == BOTH
        assert _new(cluster, before, "IndexSearcher") == BOTH
    finally:
        _stop(proc)
    assert proc.returncode == 0, log.read_text()[-4000:]
    with torch.inference_mode():
        vector = load_clip(packaged_checkpoint()).prepare_for_inference().encode_query([query]).numpy()
    assert served == [h.id for h in VectorIndex.load(one_node["index"]).search(vector, k=4)[0]]


def _train(cwd: Path, catalog: Path, out: str, address: list[str]) -> list[float]:
    """A tiny `voxsearch train clip` with 2 DDP ranks of 2 CPUs; its step-by-step losses."""
    _cli(cwd, "train", "clip", "--catalog", str(catalog), "--out", out, "--preset", "quick", "--workers", "2",
         "--cpus-per-worker", "2", "--epochs", "2", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2",
         "--seed", "0", *address)
    history = json.loads((cwd / out / "metrics.json").read_text())["history"]
    return [h["loss"] for h in history if h["kind"] == "step"]


@pytest.mark.slow
def test_train_clip_with_a_rank_on_each_node_equals_one_node(tiny_catalog, tmp_path):
    # Ranks of 2 CPUs: the head (3 CPUs) holds one, so the other must go to node_b. Both runs need
    # 4 CPUs for the ranks, more than this session's 2-CPU Ray: the single node is a 1-node cluster.
    with LocalCluster(nodes=2) as two:
        losses_two = _train(tmp_path, tiny_catalog, "two", ["--ray-address", two.address])
        placed = {a["node_name"] for a in two.actors() if "RayTrainWorker" in a["class"]}
    with LocalCluster(nodes=1) as one:
        losses_one = _train(tmp_path, tiny_catalog, "one", ["--ray-address", one.address])
    assert placed == BOTH
    assert len(losses_two) == len(losses_one) > 0
    assert np.allclose(losses_two, losses_one, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_embed_losing_a_node_mid_run_ends_with_every_series_once(tiny_catalog, tmp_path):
    from voxsearch.ingest import read_catalog

    catalog_ids = sorted(read_catalog(tiny_catalog).column("series_id").to_pylist())
    out, log = tmp_path / "emb", tmp_path / "embed.log"
    args = ["embed", "--catalog", str(tiny_catalog), "--checkpoint", str(packaged_checkpoint()), "--out", "emb",
            "--concurrency", "2", "--batch-size", "1", "--shard-rows", "1", "--no-progress"]
    with LocalCluster(nodes=2) as cluster:  # its own cluster: this one loses a node
        address = ["--ray-address", cluster.address]
        before = _ids(cluster)
        proc = _start_cli(tmp_path, log, *args, *address)
        try:
            def model_actor_on_b_and_a_shard_written():
                on_b = any(a["id"] not in before and "MapWorker" in a["class"] and a["node_name"] == "node_b"
                           and a["state"] == "ALIVE" for a in cluster.actors())
                return on_b and any(out.glob("part-*.parquet"))

            _wait_for(model_actor_on_b_and_a_shard_written, proc, log, "a model actor on node_b and a first shard")
            cluster.kill_node_b()
            assert 0 < len(ids_of(out)) < len(catalog_ids), "the node must die mid-run"
            proc.wait(timeout=CLI_TIMEOUT_S)
        finally:
            _stop(proc, signal.SIGKILL)
        if proc.returncode != 0:  # the run may give up on the lost node's work: a rerun finishes it
            _cli(tmp_path, *args, *address)
    final = ids_of(out) + ids_of(out, errors=True)
    assert len(final) == len(set(final)), "a series was written twice"
    assert sorted(ids_of(out)) == catalog_ids, (f"rc {proc.returncode}; errors: {ids_of(out, errors=True)}\n"
                                                f"{log.read_text()[-3000:]}")
