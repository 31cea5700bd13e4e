"""Metadata filters -> a boolean row mask, evaluated with pyarrow compute on the index's metadata table.

A filter is {"column": value | [values] | {"min": lo, "max": hi}}; conditions on several columns are
ANDed. Values are cast to the column's type, so "2021-03-01" matches a date column and "true" a bool.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _cast(value: Any, column: str, typ: pa.DataType) -> pa.Scalar:
    try:
        return pa.scalar(value).cast(typ) if not isinstance(value, pa.Scalar) else value.cast(typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise ValueError(f"filter on {column!r}: cannot compare {value!r} with a column of type {typ}") from exc


def _condition(array: pa.ChunkedArray, column: str, spec: Any) -> pa.ChunkedArray:
    typ = array.type
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"min", "max"}
        if unknown or not spec:
            raise ValueError(f"filter on {column!r}: a range is {{'min': .., 'max': ..}}, got keys {sorted(spec)}")
        result = None
        if spec.get("min") is not None:
            result = pc.greater_equal(array, _cast(spec["min"], column, typ))
        if spec.get("max") is not None:
            upper = pc.less_equal(array, _cast(spec["max"], column, typ))
            result = upper if result is None else pc.and_(result, upper)
        if result is None:
            raise ValueError(f"filter on {column!r}: range needs a non-null 'min' or 'max'")
        return result
    if isinstance(spec, (list, tuple, set, frozenset)):
        values = list(spec)
        wants_null = any(v is None for v in values)
        kept = [_cast(v, column, typ).as_py() for v in values if v is not None]
        result = pc.is_in(array, value_set=pa.array(kept, type=typ))
        return pc.or_(result, pc.is_null(array)) if wants_null else result
    if spec is None:
        return pc.is_null(array)
    return pc.equal(array, _cast(spec, column, typ))


def filter_mask(table: pa.Table | None, filters: Mapping[str, Any], rows: int) -> np.ndarray:
    """Rows of `table` passing every condition (null compares as not passing)."""
    if not isinstance(filters, Mapping):
        raise ValueError(f"filters must be a dict of column -> condition, got {type(filters).__name__}")
    if table is None:
        raise ValueError(f"filters {sorted(filters)} given but this index stores no metadata columns")
    mask = np.ones(rows, dtype=bool)
    for column, spec in filters.items():
        if column not in table.column_names:
            raise ValueError(f"unknown filter column {column!r}; metadata columns are {table.column_names}")
        cond = _condition(table.column(column), column, spec)
        mask &= pc.fill_null(cond, False).to_numpy(zero_copy_only=False).astype(bool)
    return mask
