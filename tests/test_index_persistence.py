"""Saved index folders: round trip, checksum refusal, mismatch refusal, crash safety (a writer killed
halfway leaves the previous version loadable) and read-only memory-mapped loading."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from index_testlib import clustered_vectors
from voxsearch.common.hashing import sha256_file
from voxsearch.index import IndexConfig, IndexCorruptError, IndexFormatError, ReadOnlyIndexError, VectorIndex
from voxsearch.index import versions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data():
    return clustered_vectors(1200, 16, n_clusters=12, seed=5, noise=0.6)


@pytest.fixture
def saved(tmp_path, data):
    metadata = pa.table({"modality": ["CT" if i % 2 else "MR" for i in range(len(data))]})
    index = VectorIndex.build([f"s{i}" for i in range(len(data))], data, metadata,
                              IndexConfig(factory="IVF8,Flat", nprobe=8, recall_queries=50))
    directory = tmp_path / "idx"
    index.save(directory)
    return index, directory


def results(index, data):
    return [[(h.id, round(h.score, 5)) for h in row] for row in index.search(data[:20], k=5, filters={"modality": "CT"})]


def test_round_trip_keeps_everything(saved, data):
    index, directory = saved
    loaded = VectorIndex.load(directory)
    assert results(loaded, data) == results(index, data)
    m = loaded.manifest
    assert m["factory"] == "IVF8,Flat" and m["dim"] == 16 and m["count"] == 1200
    assert m["recall"]["recall_at_k"] == index.manifest["recall"]["recall_at_k"]
    assert m["search_defaults"] == {"nprobe": 8}
    assert set(m["files"]) == {"index.faiss", "ids.parquet", "vectors.npy", "metadata.parquet"}
    version = directory / (directory / "CURRENT").read_text().split()[0]
    for name, info in m["files"].items():
        assert sha256_file(version / name) == info["sha256"]
    on_disk = json.loads((version / "manifest.json").read_text())
    assert on_disk["format"] == "voxsearch-index" and on_disk["format_version"] == 1


def test_saving_twice_keeps_two_versions_and_no_temp(saved, data):
    index, directory = saved
    index.delete(["s1"])
    index.save(directory)
    index.save(directory)
    names = sorted(p.name for p in directory.iterdir())
    assert names == [versions.LOCK_FILE, "CURRENT", "v000002", "v000003"]
    assert len(VectorIndex.load(directory)) == 1199


@pytest.mark.parametrize("name", ["index.faiss", "ids.parquet", "vectors.npy", "metadata.parquet"])
def test_a_flipped_byte_is_refused_naming_the_file(saved, name):
    _, directory = saved
    path = directory / "v000001" / name
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexCorruptError, match=f"{name} is corrupt"):
        VectorIndex.load(directory)


def test_truncated_missing_and_mismatched_files_are_refused(saved, tmp_path):
    _, directory = saved
    version = directory / "v000001"
    ids_bytes = (version / "ids.parquet").read_bytes()
    (version / "ids.parquet").write_bytes(ids_bytes[:-10])
    with pytest.raises(IndexCorruptError, match="ids.parquet has .* bytes, the manifest says"):
        VectorIndex.load(directory)
    (version / "ids.parquet").unlink()
    with pytest.raises(IndexCorruptError, match="ids.parquet listed in the manifest is missing"):
        VectorIndex.load(directory)
    (version / "ids.parquet").write_bytes(ids_bytes)
    # A manifest that disagrees with the files (even with a consistent checksum chain) is refused.
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["dim"] = 99
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match="does not match its checksum"):
        VectorIndex.load(directory)
    (directory / "CURRENT").write_text(f"v000001 {sha256_file(version / 'manifest.json')}\n")
    with pytest.raises(IndexCorruptError, match="inconsistent: index.faiss has dimension 16, the manifest says 99"):
        VectorIndex.load(directory)
    manifest["dim"], manifest["format_version"] = 16, 99
    (version / "manifest.json").write_text(json.dumps(manifest))
    (directory / "CURRENT").write_text(f"v000001 {sha256_file(version / 'manifest.json')}\n")
    with pytest.raises(IndexFormatError, match="newer voxsearch"):
        VectorIndex.load(directory)
    with pytest.raises(IndexFormatError, match="not a voxsearch index folder"):
        VectorIndex.load(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(IndexFormatError, match="non-empty folder that holds no index"):
        VectorIndex.build(["a"], np.ones((1, 4)), config=IndexConfig(factory="Flat")).save(tmp_path)


def test_injected_failure_mid_save_leaves_previous_version(saved, data, monkeypatch):
    index, directory = saved
    before = results(VectorIndex.load(directory), data)
    index.delete([f"s{i}" for i in range(600)])
    import pyarrow.parquet as pq

    def broken_write(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(pq, "write_table", broken_write)
    with pytest.raises(OSError, match="injected"):
        index.save(directory)
    assert sorted(p.name for p in directory.iterdir()) == [versions.LOCK_FILE, "CURRENT", "v000001"]  # temp folder cleaned up
    assert results(VectorIndex.load(directory), data) == before


def test_writer_killed_halfway_leaves_previous_version_loadable(saved, data, tmp_path):
    """A real crash: a subprocess saving a new version SIGKILLs itself after its index file is written."""
    _, directory = saved
    before = results(VectorIndex.load(directory), data)
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        import numpy as np
        import pyarrow.parquet as pq
        from voxsearch.index import VectorIndex
        index = VectorIndex.load({str(directory)!r})
        index.delete([f"s{{i}}" for i in range(0, 1200, 3)])
        index.add(["new"], np.ones((1, 16), np.float32))
        def die(*args, **kwargs):   # the index file is already on disk: die before the id map
            os.kill(os.getpid(), signal.SIGKILL)
        pq.write_table = die
        index.save({str(directory)!r})
    """))
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    leftovers = [p for p in directory.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers and (leftovers[0] / "index.faiss").is_file()  # it really died mid-write
    loaded = VectorIndex.load(directory)
    assert len(loaded) == 1200 and "new" not in loaded
    assert results(loaded, data) == before
    loaded.save(directory)  # the next successful save clears the dead writer's leftovers
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp-")]


def test_mmap_load_is_read_only_and_searches_the_same(saved, data):
    index, directory = saved
    mapped = VectorIndex.load(directory, mmap=True)
    assert results(mapped, data) == results(index, data)
    with pytest.raises(ReadOnlyIndexError, match="mmap=True"):
        mapped.add(["z"], data[:1])
    with pytest.raises(ReadOnlyIndexError):
        mapped.delete(["s1"])
