"""Local files as one stream of record batches: what ``flight-lakehouse ingest`` uploads.

What to read is a file, a directory (its files in sorted order; names starting with ``.`` or ``_``, as
Spark and Hive write beside their data, left out; subdirectories not read) or a glob (``**`` included).
Each file's format comes from its suffix (:data:`ACCEPTED_SUFFIXES`): CSV (``.csv``, ``.txt``), TSV
(``.tsv``), newline-delimited JSON (``.jsonl``, ``.ndjson``), each of them also gzip (``.gz``) or zstd
(``.zst``) compressed; Parquet (``.parquet``, ``.pq``); Arrow IPC, file or stream format (``.arrow``,
``.feather``, ``.ipc``). Every file must read to the first one's schema (columns in another order are put
in its order).

``--types`` sets the type of a CSV column as it is parsed, and casts the column of the other formats
(Arrow's cast: ``"2024-01-31"`` read by JSON as a timestamp becomes a date32, but a value that does not
convert fails the upload, which then commits nothing).

Nothing is read whole into memory. The row count comes from the footer of a Parquet or IPC file, or from a
first streaming pass over the others, with the very options of the upload, so that a value that does not
parse fails before anything is sent (about 1 s per million CSV rows). The column types of a CSV or JSON
file (and a JSON file's columns) are inferred from its first :data:`INFER_BYTES`, then the file is parsed
in blocks of :data:`BLOCK_BYTES`. pyarrow's streaming readers cannot change a type once chosen: a value
further on that does not fit it (a fraction in a column of whole numbers), or a JSON field first seen
there, is an error naming the file; ``--types`` sets such a CSV column's type.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from flight_lakehouse.schema_types import canonical_type

# CSV and JSON: types are inferred from a first block of INFER_BYTES, then the file is parsed in blocks of
# BLOCK_BYTES, as pyarrow's streaming readers keep many blocks in flight (1M-row, 176 MB CSV, counting pass:
# 16 MB blocks 484 MB peak RSS, 4 MB 313 MB, 1 MB 143 MB, and no slower).
INFER_BYTES = 16 << 20
BLOCK_BYTES = 1 << 20
FORMATS = {  # suffix -> format
    ".csv": "csv",
    ".txt": "csv",
    ".tsv": "tsv",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "ipc",
    ".feather": "ipc",
    ".ipc": "ipc",
}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}  # suffix -> pyarrow codec, for the text formats
TEXT_FORMATS = ("csv", "tsv", "json")
CSV_FORMATS = ("csv", "tsv")
ACCEPTED_SUFFIXES = tuple(
    suffix + compressed
    for suffix, kind in FORMATS.items()
    for compressed in ("", *(COMPRESSIONS if kind in TEXT_FORMATS else ()))
)
LEFT_OUT_PREFIXES = (".", "_")  # in a directory: hidden files, _SUCCESS and the like
TYPE_EXAMPLES = "int64, float64, string, bool, date32, timestamp[us], decimal128(10,2)"
DECIMAL = re.compile(r"decimal(?:128)?\(\s*(\d+)\s*,\s*(-?\d+)\s*\)", re.IGNORECASE)
TIMESTAMP = re.compile(r"timestamp\[\s*(s|ms|us|ns)\s*(?:,\s*tz\s*=\s*([^\]]+?)\s*)?\]", re.IGNORECASE)
GLOB_CHARACTERS = re.compile(r"[*?\[]")


class LocalFileError(ValueError):
    """A file that cannot be read as asked, or a bad reading option (a one-line message)."""


# -- options -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadOptions:
    """How to read the files. The CSV options (None: the format's default) apply to CSV and TSV only."""

    delimiter: str | None = None
    null_values: tuple[str, ...] | None = None
    header: bool | None = None
    column_names: tuple[str, ...] | None = None
    types: Mapping[str, pa.DataType] = field(default_factory=dict)
    batch_rows: int = 65_536

    @classmethod
    def from_flags(
        cls,
        *,
        delimiter: str | None = None,
        null_values: str | None = None,
        header: bool | None = None,
        column_names: str | None = None,
        types: str | None = None,
        batch_rows: int = 65_536,
    ) -> ReadOptions:
        """Options from the command line's texts (``--types id=int64,price=decimal128(10,2)``...)."""
        if batch_rows < 1:
            raise LocalFileError(f"--batch-rows must be at least 1, not {batch_rows}")
        return cls(
            delimiter=None if delimiter is None else parse_delimiter(delimiter),
            null_values=None
            if null_values is None
            else tuple(value.strip() for value in null_values.split(",")),
            header=header,
            column_names=None if column_names is None else parse_names(column_names),
            types={} if types is None else parse_types(types),
            batch_rows=batch_rows,
        )

    def csv_flags(self) -> list[str]:
        """The flags given that apply to CSV and TSV files only."""
        flags = {
            "--delimiter": self.delimiter,
            "--null-values": self.null_values,
            "--header" if self.header else "--no-header": self.header,
            "--column-names": self.column_names,
        }
        return [flag for flag, value in flags.items() if value is not None]


def parse_delimiter(text: str) -> str:
    """One character; ``\\t`` (backslash and t, as typed in a shell) or ``tab`` is a tab."""
    delimiter = {"\\t": "\t", "tab": "\t"}.get(text.lower(), text)
    if len(delimiter) != 1 or delimiter in '\r\n"':
        raise LocalFileError(f"--delimiter must be one character (or \\t), not {text!r}")
    return delimiter


def parse_names(text: str) -> tuple[str, ...]:
    """Comma-separated column names, none empty or repeated."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise LocalFileError(f"--column-names: an empty name in {text!r}")
    if len(set(names)) != len(names):
        raise LocalFileError(f"--column-names: a name given twice in {text!r}")
    return names


def parse_types(text: str) -> dict[str, pa.DataType]:
    """``COLUMN=TYPE,...`` (commas inside a type's brackets, as in ``decimal128(10,2)``, stay in it)."""
    types: dict[str, pa.DataType] = {}
    for item in _split_outside_brackets(text):
        column, equals, type_name = (part.strip() for part in item.partition("="))
        if not equals or not column or not type_name:
            raise LocalFileError(f"--types: expected COLUMN=TYPE, not {item.strip()!r}")
        if column in types:
            raise LocalFileError(f"--types: column {column!r} given twice")
        types[column] = parse_type(type_name, column)
    if not types:
        raise LocalFileError("--types: expected COLUMN=TYPE,...")
    return types


def _split_outside_brackets(text: str) -> list[str]:
    """``text`` split at the commas that are not inside ``(...)`` or ``[...]``; blank items left out."""
    items, depth, start = [], 0, 0
    for index, character in enumerate(text):
        depth += (character in "([") - (character in ")]")
        if character == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    items.append(text[start:])
    return [item for item in items if item.strip()]


def parse_type(text: str, column: str) -> pa.DataType:
    """An Arrow type from its name (pyarrow's aliases, ``timestamp[us, tz=UTC]``, ``decimal128(10,2)``)."""
    try:
        if match := DECIMAL.fullmatch(text):
            return pa.decimal128(int(match[1]), int(match[2]))
        if match := TIMESTAMP.fullmatch(text):
            data_type = pa.timestamp(match[1].lower(), tz=match[2])
            pa.array([0], data_type).cast(pa.string())  # an unknown time zone fails here, not at the cast
            return data_type
        return pa.type_for_alias(text.lower())
    except (ValueError, pa.ArrowException) as exc:
        reason = "" if "alias" in str(exc) else f": {str(exc).splitlines()[0]}"
        raise LocalFileError(
            f"--types: unknown type {text!r} for column {column!r}{reason} (Arrow names: {TYPE_EXAMPLES})"
        ) from None


# -- one file ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalFile:
    """A file to read, with the format and compression its suffix says."""

    path: Path
    kind: str  # a value of FORMATS
    compression: str | None  # a value of COMPRESSIONS

    @classmethod
    def of(cls, path: Path) -> LocalFile:
        """The file at ``path``; an unknown suffix is an error listing every accepted one."""
        suffixes = [suffix.lower() for suffix in path.suffixes]
        compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
        base = suffixes[-2:-1] if compression else suffixes[-1:]
        kind = FORMATS.get(base[0]) if base else None
        if kind is None or (compression and kind not in TEXT_FORMATS):
            accepted = ", ".join(ACCEPTED_SUFFIXES)
            raise LocalFileError(f"{path}: unknown file type; accepted suffixes: {accepted}")
        return cls(path, kind, compression)

    def check(self, options: ReadOptions) -> None:
        """Refuse the options that do not apply to this file's format."""
        flags = options.csv_flags()
        if flags and self.kind not in CSV_FORMATS:
            raise LocalFileError(f"{flags[0]} applies to CSV and TSV files only, not {self.path}")

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Arrow and OS errors within the block become a :class:`LocalFileError` naming the file."""
        try:
            yield
        except (pa.ArrowException, OSError) as exc:
            reason = (str(exc).split(". Detail:")[0].splitlines() or [type(exc).__name__])[0]
            raise LocalFileError(f"{self.path}: {reason}") from None

    @contextlib.contextmanager
    def open(self, options: ReadOptions) -> Iterator[tuple[pa.RecordBatchReader, int | None]]:
        """A reader of the file's batches (column types of ``options`` applied to CSV and JSON) and its row
        count when the file's metadata has it; closed at the end of the block."""
        with self.reading(), contextlib.ExitStack() as stack:
            yield OPENERS[self.kind](self, options, stack)


Opened = tuple[pa.RecordBatchReader, int | None]


def _open_parquet(file: LocalFile, options: ReadOptions, stack: contextlib.ExitStack) -> Opened:
    parquet = stack.enter_context(pq.ParquetFile(file.path))
    batches = parquet.iter_batches(batch_size=options.batch_rows)
    return pa.RecordBatchReader.from_batches(parquet.schema_arrow, batches), parquet.metadata.num_rows


def _open_ipc(file: LocalFile, options: ReadOptions, stack: contextlib.ExitStack) -> Opened:
    """An IPC file (counted from its batches' headers, without decompressing them) or stream."""
    source = stack.enter_context(pa.memory_map(str(file.path)))
    is_file_format = source.read(6) == b"ARROW1"
    source.seek(0)
    if not is_file_format:
        return pa.ipc.open_stream(source), None
    ipc = pa.ipc.open_file(source)
    batches = (ipc.get_batch(index) for index in range(ipc.num_record_batches))
    return pa.RecordBatchReader.from_batches(ipc.schema, batches), ipc.count_rows()


def _open_csv(file: LocalFile, options: ReadOptions, stack: contextlib.ExitStack) -> Opened:
    """A streaming CSV reader: types inferred from the first :data:`INFER_BYTES` (but for ``--types``)."""
    parse = pacsv.ParseOptions(
        delimiter=options.delimiter or ("\t" if file.kind == "tsv" else ","),
        newlines_in_values=True,  # line breaks in quoted fields; no slower when there are none
    )
    convert = pacsv.ConvertOptions()
    if options.null_values is not None:
        convert.null_values = [*options.null_values, ""]
        convert.strings_can_be_null = True
    numbered = options.column_names is None and options.header is False
    read = pacsv.ReadOptions(
        block_size=INFER_BYTES,
        column_names=options.column_names,
        autogenerate_column_names=numbered,
        skip_rows=1 if options.column_names and options.header is not False else 0,  # the header replaced
    )
    inferred = _first_block_schema(file, lambda source: pacsv.open_csv(source, read, parse, convert))
    names = [f"column_{number}" for number in range(1, len(inferred) + 1)] if numbered else inferred.names
    if numbered:
        read.column_names, read.autogenerate_column_names = names, False
    convert.column_types = {**dict(zip(names, inferred.types, strict=True)), **options.types}
    read.block_size = BLOCK_BYTES
    source = stack.enter_context(pa.input_stream(str(file.path), compression=file.compression))
    return pacsv.open_csv(source, read_options=read, parse_options=parse, convert_options=convert), None


def _open_json(file: LocalFile, options: ReadOptions, stack: contextlib.ExitStack) -> Opened:
    """A streaming reader of newline-delimited JSON: columns and types inferred from the first
    :data:`INFER_BYTES` (``--types`` cast after, see the module's docstring)."""
    first_block = pajson.ReadOptions(block_size=INFER_BYTES)
    inferred = _first_block_schema(file, lambda source: pajson.open_json(source, first_block))
    parse = pajson.ParseOptions(explicit_schema=inferred)
    source = stack.enter_context(pa.input_stream(str(file.path), compression=file.compression))
    return pajson.open_json(source, pajson.ReadOptions(block_size=BLOCK_BYTES), parse), None


def _first_block_schema(
    file: LocalFile, open_reader: Callable[[pa.NativeFile], pa.RecordBatchReader]
) -> pa.Schema:
    """The schema a reader infers from the file's first block, given no more than two blocks to read (it
    reads ahead, many blocks when it can)."""
    with pa.input_stream(str(file.path), compression=file.compression) as source:
        start = source.read(2 * INFER_BYTES)
    return open_reader(pa.BufferReader(start)).schema


OPENERS: dict[str, Callable[[LocalFile, ReadOptions, contextlib.ExitStack], Opened]] = {
    "csv": _open_csv,
    "tsv": _open_csv,
    "json": _open_json,
    "parquet": _open_parquet,
    "ipc": _open_ipc,
}


# -- several files as one upload -----------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One file of an upload: its rows, and the schema its reader gives."""

    file: LocalFile
    rows: int
    schema: pa.Schema


@dataclass(frozen=True)
class LocalUpload:
    """Files read as one upload: the schema (the first file's, with ``--types``) and the total row count."""

    parts: tuple[Part, ...]
    schema: pa.Schema
    rows: int
    options: ReadOptions

    @property
    def paths(self) -> list[Path]:
        return [part.file.path for part in self.parts]

    def batches(self, on_file: Callable[[int, Path], None] | None = None) -> Iterator[pa.RecordBatch]:
        """The batches of every file in turn, in the upload's schema, at most ``batch_rows`` rows each;
        ``on_file(number, path)`` is called as each file (numbered from 1) starts."""
        for number, part in enumerate(self.parts, start=1):
            if on_file is not None:
                on_file(number, part.file.path)
            with part.file.open(self.options) as (reader, _):
                conformed = (conform(batch, self.schema) for batch in reader)
                yield from rechunk(conformed, self.options.batch_rows)


def open_upload(spec: str | Path, options: ReadOptions) -> LocalUpload:
    """The files ``spec`` names (:func:`expand`), checked and counted; errors are :class:`LocalFileError`."""
    files = [LocalFile.of(path) for path in expand(str(spec))]
    for file in files:  # every cheap check before the first counting pass
        file.check(options)
    parts = [_inspect(file, options) for file in files]
    first = parts[0]
    schema = typed_schema(first.schema, options.types)
    for part in parts[1:]:
        check_same_columns(typed_schema(part.schema, options.types), schema, part.file.path, first.file.path)
    return LocalUpload(tuple(parts), schema, sum(part.rows for part in parts), options)


def expand(spec: str) -> list[Path]:
    """The files of a path: the file itself, a directory's files (sorted; see the module's docstring), or
    the files a glob matches (sorted). No file at all is an error."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(LEFT_OUT_PREFIXES))
        if not files:
            example = os.path.join(spec, "**", "*.csv")
            raise LocalFileError(
                f"{spec}: no files in this directory (subdirectories: use a glob, '{example}')"
            )
        return files
    if path.is_file():
        return [path]
    if path.exists():
        raise LocalFileError(f"{spec}: not a file or directory")
    if not GLOB_CHARACTERS.search(spec):
        raise LocalFileError(f"{spec}: no such file or directory")
    files = sorted(Path(match) for match in glob.glob(os.path.expanduser(spec), recursive=True))
    files = [file for file in files if file.is_file()]
    if not files:
        raise LocalFileError(f"no files match {spec!r}")
    return files


def _inspect(file: LocalFile, options: ReadOptions) -> Part:
    """The file's schema and row count; a typed column the file lacks is an error. Without a count in the
    file's metadata, a streaming pass counts the rows, casting them to ``--types`` as the upload will."""
    with file.open(options) as (reader, rows):
        schema = reader.schema
        missing = [column for column in options.types if column not in schema.names]
        if missing:
            shown = ", ".join(schema.names[:20]) + (", ..." if len(schema) > 20 else "")
            raise LocalFileError(f"--types: {file.path} has no column {missing[0]!r} (its columns: {shown})")
        if rows is None:
            typed = typed_schema(schema, options.types)
            rows = sum(conform(batch, typed).num_rows for batch in reader)
    return Part(file, rows, schema)


def typed_schema(schema: pa.Schema, types: Mapping[str, pa.DataType]) -> pa.Schema:
    """``schema`` with the columns of ``types`` set to their type."""
    fields = [column.with_type(types[column.name]) if column.name in types else column for column in schema]
    return pa.schema(fields, metadata=schema.metadata)


def check_same_columns(schema: pa.Schema, first: pa.Schema, path: Path, first_path: Path) -> None:
    """Refuse a file whose columns are not those of the first file, by name and type (the order, and
    differences that do not matter in storage, such as string and large_string, may differ)."""
    types = {column.name: column.type for column in schema}
    for column in first:
        if column.name not in types:
            raise LocalFileError(f"{path}: no column {column.name!r}, which {first_path} has")
        if canonical_type(types[column.name]) != canonical_type(column.type):
            raise LocalFileError(
                f"{path}: column {column.name!r} is {types[column.name]}, but {column.type} in {first_path} "
                f"(--types can set one type for all files)"
            )
    extra = [name for name in types if name not in set(first.names)]
    if extra:
        raise LocalFileError(f"{path}: column {extra[0]!r} is not in {first_path}")


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with the columns of ``schema``, in its order and of its types."""
    if batch.schema.equals(schema):
        return batch
    return batch.select(schema.names).cast(schema)


def rechunk(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Slice batches to at most ``rows`` rows each (zero-copy)."""
    for batch in batches:
        for offset in range(0, batch.num_rows, rows):
            yield batch.slice(offset, rows)
