"""Arrow types as the lakehouse stores them: what Iceberg can hold, and how two schemas are compared."""

from __future__ import annotations

import pyarrow as pa

from flight_lakehouse.errors import InvalidArgument


def storage_schema(schema: pa.Schema) -> pa.Schema:
    """The schema an upload is stored with: Iceberg-compatible types, every column nullable.

    Refuses (naming the column) what an Iceberg table cannot hold, and duplicate or empty column names.
    """
    names = [field.name for field in schema]
    if not names:
        raise InvalidArgument("the upload has no columns")
    seen: set[str] = set()
    for name in names:
        if not name or "\x00" in name:
            raise InvalidArgument(f"invalid column name {name!r}")
        if name.lower() in seen:
            raise InvalidArgument(f"duplicate column name {name!r} (column names are case-insensitive)")
        seen.add(name.lower())
    return pa.schema([pa.field(f.name, storage_type(f.type, f.name), nullable=True) for f in schema])


def storage_type(data_type: pa.DataType, column: str) -> pa.DataType:
    """The Iceberg-compatible Arrow type ``data_type`` is stored as."""
    t = pa.types
    if t.is_dictionary(data_type):
        return storage_type(data_type.value_type, column)
    if t.is_uint8(data_type) or t.is_uint16(data_type) or t.is_int8(data_type) or t.is_int16(data_type):
        return pa.int32()
    if t.is_uint32(data_type):
        return pa.int64()
    if t.is_float16(data_type):
        return pa.float32()
    if t.is_large_string(data_type) or t.is_string_view(data_type):
        return pa.string()
    if t.is_large_binary(data_type) or t.is_binary_view(data_type):
        return pa.binary()
    if t.is_timestamp(data_type):
        return pa.timestamp("us", tz="UTC" if data_type.tz else None)
    if t.is_time(data_type):
        return pa.time64("us")
    if t.is_date64(data_type):
        return pa.date32()
    if t.is_list(data_type) or t.is_large_list(data_type) or t.is_fixed_size_list(data_type):
        return pa.list_(pa.field("element", storage_type(data_type.value_type, f"{column}.element")))
    if t.is_struct(data_type):
        fields = [pa.field(f.name, storage_type(f.type, f"{column}.{f.name}")) for f in data_type]
        return pa.struct(fields)
    if t.is_map(data_type):
        key = storage_type(data_type.key_type, f"{column}.key")
        return pa.map_(key, storage_type(data_type.item_type, f"{column}.value"))
    if (
        t.is_boolean(data_type)
        or t.is_int32(data_type)
        or t.is_int64(data_type)
        or t.is_float32(data_type)
        or t.is_float64(data_type)
        or t.is_decimal128(data_type)
        or t.is_string(data_type)
        or t.is_binary(data_type)
        or t.is_fixed_size_binary(data_type)
        or t.is_date32(data_type)
    ):
        return data_type
    raise InvalidArgument(f"column {column!r} has type {data_type}, which a dataset cannot store")


def canonical_type(data_type: pa.DataType) -> str:
    """A spelling of a type that ignores storage-irrelevant differences (large vs small, field names)."""
    t = pa.types
    if t.is_list(data_type) or t.is_large_list(data_type) or t.is_fixed_size_list(data_type):
        return f"list<{canonical_type(data_type.value_type)}>"
    if t.is_struct(data_type):
        return "struct<" + ", ".join(f"{f.name}: {canonical_type(f.type)}" for f in data_type) + ">"
    if t.is_map(data_type):
        return f"map<{canonical_type(data_type.key_type)}, {canonical_type(data_type.item_type)}>"
    if t.is_large_string(data_type) or t.is_string_view(data_type):
        return "string"
    if t.is_large_binary(data_type) or t.is_binary_view(data_type):
        return "binary"
    if t.is_timestamp(data_type):
        return f"timestamp[{data_type.unit}{', tz' if data_type.tz else ''}]"
    return str(data_type)
