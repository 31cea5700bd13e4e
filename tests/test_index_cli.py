"""`voxsearch index ...` end to end on embedding Parquet shards in the embed stage's format and on .npy."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index_testlib import clustered_vectors
from voxsearch.cli import main
from voxsearch.index import VectorIndex

D = 16


def write_shard(path, ids, vectors, model_id="clip-abc", modality="CT"):
    n = len(ids)
    table = pa.table({
        "id": pa.array(ids),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), D),
        "model_id": [model_id] * n, "preprocess_id": ["pp1"] * n, "content_sha256": ["0" * 64] * n,
        "study_id": [f"st-{i}" for i in ids], "modality": [modality] * n, "body_part": ["head"] * n,
        "split": ["test"] * n, "study_date": pa.array([None] * n, pa.date32()), "abnormal": [False] * n,
    })
    pq.write_table(table, path)


@pytest.fixture
def shards(tmp_path):
    data = clustered_vectors(600, D, n_clusters=10, seed=8, noise=0.6)
    folder = tmp_path / "emb"
    folder.mkdir()
    write_shard(folder / "part-0.parquet", [f"s{i}" for i in range(300)], data[:300], modality="CT")
    write_shard(folder / "part-1.parquet", [f"s{i}" for i in range(300, 600)], data[300:], modality="MR")
    return folder, data


def test_build_info_search_delete_add_compact(shards, tmp_path, capsys):
    folder, data = shards
    out = tmp_path / "index"
    assert main(["index", "build", str(folder), "--out", str(out)]) == 0
    assert "built Flat over 600 x 16" in capsys.readouterr().out
    assert main(["index", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "recall@10    1.0" in info and "clip-abc" in info and "checksums    verified" in info

    assert main(["index", "search", str(out), "--id", "s5", "-k", "3", "--where", "modality=CT", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["query"] == "s5" and answer["hits"][0]["id"] == "s5"
    assert all(h["metadata"]["modality"] == "CT" for h in answer["hits"]) and len(answer["hits"]) == 3

    queries = tmp_path / "q.npy"
    np.save(queries, data[[10, 400]])
    assert main(["index", "search", str(out), "--query-file", str(queries), "-k", "2", "--where", "modality=MR,PET"]) == 0
    text = capsys.readouterr().out
    assert "query q.npy[1]: 2 hits" in text and " s400 " in text and "modality=MR" in text

    assert main(["index", "delete", str(out), "s5", "s6", "nope"]) == 0
    assert "deleted 2 of 3 ids; 598 remain" in capsys.readouterr().out
    extra = tmp_path / "extra"
    extra.mkdir()
    write_shard(extra / "p.parquet", ["s5", "t1"], data[[5, 7]])
    assert main(["index", "add", str(out), str(extra)]) == 0
    assert "the index now holds 600" in capsys.readouterr().out
    assert main(["index", "compact", str(out)]) == 0
    assert "compacted 602 rows -> 600" in capsys.readouterr().out
    assert len(VectorIndex.load(out)) == 600


def test_npy_input_forced_factory_and_clear_errors(tmp_path, capsys):
    data = clustered_vectors(400, D, n_clusters=8, seed=9, noise=0.6)
    np.save(tmp_path / "vecs.npy", data)
    (tmp_path / "ids.txt").write_text("\n".join(f"n{i}" for i in range(400)))
    out = tmp_path / "index"
    assert main(["index", "build", str(tmp_path / "vecs.npy"), "--ids", str(tmp_path / "ids.txt"),
                 "--out", str(out), "--factory", "IVF8,Flat"]) == 0
    assert "built IVF8,Flat over 400" in capsys.readouterr().out
    assert main(["index", "search", str(out), "--id", "missing"]) == 2
    assert "id 'missing' is not in the index" in capsys.readouterr().err
    assert main(["index", "search", str(out), "--id", "n1", "--where", "modality=CT"]) == 2
    assert "stores no metadata" in capsys.readouterr().err
    version = next(out.glob("v*"))
    (version / "index.faiss").write_bytes(b"garbage")
    assert main(["index", "info", str(out)]) == 2
    assert "index.faiss has 7 bytes" in capsys.readouterr().err
    assert main(["index", "build", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "embedding input not found" in capsys.readouterr().err


def test_mixed_models_and_duplicates_in_shards(shards, tmp_path):
    from voxsearch.index import read_embeddings

    folder, data = shards
    write_shard(folder / "part-2.parquet", ["s1"], data[[9]])  # a re-embedded row: the later shard wins
    emb = read_embeddings(folder)
    assert len(emb.ids) == 600 and emb.ids.count("s1") == 1
    assert np.allclose(emb.vectors[emb.ids.index("s1")], data[9])
    assert emb.source["model_id"] == "clip-abc" and "vector" not in emb.metadata.column_names
    write_shard(folder / "part-3.parquet", ["z"], data[[0]], model_id="other-model")
    with pytest.raises(ValueError, match="different models"):
        read_embeddings(folder)
