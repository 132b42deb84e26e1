"""Arrow values as text where a format has no type for them: nested cells (lists, structs, maps,
vectors) as JSON, binary as base64, decimals, durations and intervals as their text. The CLI's tables
and files and the HTTP port's CSV follow the same rules."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson
import pyarrow as pa


def json_default(value: Any) -> Any:
    """What orjson cannot write by itself: bytes as base64, anything else (decimals, durations, intervals)
    as its text."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)


def json_text(value: Any, indent: bool = False) -> str:
    """``value`` as JSON (NaN and infinities as null; maps, which Arrow gives as pairs, as pairs)."""
    option = orjson.OPT_INDENT_2 if indent else 0
    return orjson.dumps(value, default=json_default, option=option | orjson.OPT_NON_STR_KEYS).decode()


def is_json_value(value: Any) -> bool:
    """Whether a cell is written as JSON: a boolean, a list, a struct or a map (not an interval, which
    Arrow gives as a named tuple)."""
    return isinstance(value, bool | list | tuple | dict) and not isinstance(value, pa.MonthDayNano)


# -- CSV -------------------------------------------------------------------------------------------------


def as_text_in_csv(data_type: pa.DataType) -> bool:
    """Whether a column of ``data_type`` goes into CSV as text: nested (JSON), binary (base64) and interval
    ones (which Arrow's CSV writer cannot write)."""
    return pa.types.is_nested(data_type) or is_binary(data_type) or pa.types.is_interval(data_type)


def is_binary(data_type: pa.DataType) -> bool:
    """Any of Arrow's binary types."""
    return (
        pa.types.is_binary(data_type)
        or pa.types.is_large_binary(data_type)
        or pa.types.is_fixed_size_binary(data_type)
        or pa.types.is_binary_view(data_type)
    )


def csv_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the columns CSV cannot hold as strings."""
    return pa.schema(
        [field.with_type(pa.string()) if as_text_in_csv(field.type) else field for field in schema],
        metadata=schema.metadata,
    )


def csv_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with its list, struct, map and vector cells as JSON text and binary cells base64."""
    if not any(as_text_in_csv(field.type) for field in batch.schema):
        return batch
    columns = [csv_text_column(column) if as_text_in_csv(column.type) else column for column in batch.columns]
    return pa.RecordBatch.from_arrays(columns, schema=csv_schema(batch.schema))


def csv_text_column(column: pa.Array) -> pa.Array:
    """A column CSV cannot hold, as text: vectors through numpy (about 8 times faster than cell by cell,
    and float32 values in their own shortest form), the rest value by value."""
    if pa.types.is_fixed_size_list(column.type) and pa.types.is_floating(column.type.value_type):
        return vector_texts(column)
    return pa.array([None if v is None else as_csv_text(v) for v in column.to_pylist()], pa.string())


def vector_texts(column: pa.FixedSizeListArray) -> pa.Array:
    """Each vector of a ``fixed_size_list<float>`` column as a JSON list (null stays null)."""
    size = column.type.list_size
    values = column.values.slice(column.offset * size, len(column) * size)
    matrix = values.to_numpy(zero_copy_only=False).reshape(len(column), size)
    if matrix.dtype == np.float16:
        matrix = matrix.astype(np.float32)  # orjson writes float32 and float64 arrays
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    texts = [
        orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY).decode() if ok else None
        for row, ok in zip(matrix, valid, strict=True)
    ]
    return pa.array(texts, pa.string())


def as_csv_text(value: Any) -> str:
    """A nested value as JSON text, a binary one as base64, an interval as its text."""
    if is_json_value(value):
        return json_text(value)
    return json_default(value)  # type: ignore[no-any-return]
