"""An embed output folder (embedding shards beside `_errors/` and temp files) reads as its embeddings alone."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def test_build_from_an_embed_folder_skips_error_tables_and_temp_files(tmp_path):
    from voxsearch.index import build_from_embeddings

    vectors = np.eye(4, 8, dtype=np.float32)
    table = pa.table({"id": [f"s{i}" for i in range(4)],
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 8)})
    pq.write_table(table, tmp_path / "part-0.parquet")
    (tmp_path / "_errors").mkdir()
    pq.write_table(pa.table({"id": ["bad"], "error": ["corrupt"]}), tmp_path / "_errors" / "part-0.parquet")
    pq.write_table(pa.table({"id": ["half"]}), tmp_path / ".part-1.parquet.tmp.parquet")
    index = build_from_embeddings(tmp_path)
    assert sorted(index.ids()) == ["s0", "s1", "s2", "s3"]
    assert index.search(vectors[2:3], k=1)[0][0].id == "s2"
