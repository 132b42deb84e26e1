"""What the CLI prints: tables that fit the terminal (columns left out with a note, or one field per line),
JSON for scripts, and result files (CSV, JSON lines, Parquet, Arrow IPC) written batch by batch.

CSV cannot hold lists, structs or maps: such cells become JSON text, and binary cells base64."""

from __future__ import annotations

import datetime
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import click
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.flight as flight
import pyarrow.parquet as pq
from rich.cells import cell_len, set_cell_size
from rich.console import Console
from rich.table import Table

from flight_lakehouse.text_values import csv_batch, csv_schema, is_json_value, json_default, json_text

#: The longest cell of a table (a longer value ends in an ellipsis; ``--vertical`` or JSON show more).
MAX_CELL = 60
#: A result of at most this many rows that does not fit is shown one field per line.
AUTO_VERTICAL_ROWS = 3
#: How many left-out column names the note lists.
LISTED_NAMES = 6
#: Width of the output when it is neither a terminal nor told by ``COLUMNS``: no fitting.
UNLIMITED = 1_000_000
#: Result formats: ``table`` is printed; the others are written (Parquet and Arrow IPC need a file).
FORMATS = ("table", "csv", "json", "parquet", "arrow")
FILE_ONLY_FORMATS = ("parquet", "arrow")
ELLIPSIS = "…"


# -- values --------------------------------------------------------------------------------------------


def cell_text(value: Any, null: str = "NULL") -> str:
    """One table cell on one line: lists and structs as JSON, bytes as base64, ``null`` for None."""
    if value is None:
        return null
    if isinstance(value, str):
        return value.replace("\r", "\\r").replace("\n", "\\n")
    if is_json_value(value):
        return json_text(value)
    if isinstance(value, bytes):
        return json_default(value)  # type: ignore[no-any-return]
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    return str(value)


def cut(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal cells (wide characters take two), ending in an ellipsis when cut."""
    return text if cell_len(text) <= width else set_cell_size(text, max(width - 1, 0)) + ELLIPSIS


# -- human output ----------------------------------------------------------------------------------------


def terminal_width() -> int | None:
    """The width to fit: ``COLUMNS``, else the terminal's; None when the output goes to neither."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def fitting_columns(header: Sequence[str], rows: Sequence[Sequence[str]], width: int | None) -> int:
    """How many leading columns of a table fit in ``width`` (at least one), each at most :data:`MAX_CELL`
    characters wide."""
    if width is None:
        return len(header)
    used = 1  # the left border; each column adds its text, a space either side and a border
    for count, name in enumerate(header):
        used += min(max([cell_len(name), *(cell_len(row[count]) for row in rows)]), MAX_CELL) + 3
        if used > width:
            return max(count, 1)
    return len(header)


def print_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    vertical: bool = False,
    title: str | None = None,
    wrap: bool = False,
) -> None:
    """A table of text cells fitted to the terminal: the columns that fit and a note naming the rest, or
    (``vertical``, or only a few rows that do not fit) one field per line. Cells longer than
    :data:`MAX_CELL` are cut, or with ``wrap`` folded over several lines."""
    width = terminal_width()
    if not wrap:
        rows = [[cut(cell, MAX_CELL) for cell in row] for row in rows]
    shown = fitting_columns(header, rows, width)
    if vertical or (shown < len(header) and len(rows) <= AUTO_VERTICAL_ROWS):
        print_vertical(header, rows, width, title)
        return
    if title:
        click.echo(title)
    table = Table()
    for name in header[:shown]:
        table.add_column(name, no_wrap=not wrap, overflow="fold" if wrap else "ellipsis")
    for row in rows:
        table.add_row(*row[:shown])
    # cells are plain text: no markup ("[b]"), emoji codes (":x:") or highlighting
    Console(width=width or UNLIMITED, markup=False, emoji=False, highlight=False).print(table)
    left_out = header[shown:]
    if left_out:
        names = ", ".join(left_out[:LISTED_NAMES]) + (", ..." if len(left_out) > LISTED_NAMES else "")
        click.echo(
            f"({len(left_out)} of {len(header)} columns left out to fit {width} characters: {names}; "
            "--vertical shows every column)",
            err=True,
        )


def print_vertical(
    header: Sequence[str], rows: Sequence[Sequence[str]], width: int | None, title: str | None = None
) -> None:
    """One field per line (``name | value``), a ruler before each row; values cut to the width."""
    if title:
        click.echo(title)
    label = max(map(cell_len, header), default=0)
    room = UNLIMITED if width is None else max(width - label - 3, 8)
    for number, row in enumerate(rows, start=1):
        click.echo(cut(f"-[ {number} ]" + "-" * max(label + 2, 0), width or UNLIMITED))
        for name, value in zip(header, row, strict=True):
            click.echo(f"{name:<{label}} | {cut(value, room)}")


def print_records(
    records: Sequence[dict[str, Any]],
    columns: Sequence[str] | None = None,
    title: str | None = None,
    null: str = "",
) -> None:
    """JSON objects as a fitted table: ``columns``, else every key in the order first seen."""
    if columns is None:
        columns = list(dict.fromkeys(key for record in records for key in record))
    print_table(
        columns, [[cell_text(record.get(c), null) for c in columns] for record in records], title=title
    )


def print_facts(facts: dict[str, Any], title: str | None = None) -> None:
    """A JSON object as a two-column table of its keys and values."""
    cells = [[key, cell_text(value, "")] for key, value in facts.items()]
    print_table(["fact", "value"], cells, title=title, wrap=True)


def print_json(value: Any) -> None:
    """One JSON document on stdout."""
    click.echo(json_text(value, indent=True))


# -- result rows -----------------------------------------------------------------------------------------


@dataclass
class Rows:
    """A streamed result: its schema, its batches, and how to stop the rest being sent."""

    schema: pa.Schema
    batches: Iterable[pa.RecordBatch]
    stop: Callable[[], None] = field(default=lambda: None)

    @classmethod
    def of(cls, reader: flight.FlightStreamReader) -> Rows:
        """The rows of a DoGet."""
        return cls(reader.schema, (chunk.data for chunk in reader), reader.cancel)


def check_format(fmt: str, output: Path | None) -> None:
    """Refuse a binary format without ``--output`` (one line, before anything is asked of the server)."""
    if fmt in FILE_ONLY_FORMATS and output is None:
        raise click.ClickException(f"--format {fmt} needs --output FILE")


def show_rows(rows: Rows, fmt: str, output: Path | None, max_rows: int, vertical: bool = False) -> int:
    """Print (``table``) or write the rows; how many."""
    if fmt == "table":
        return print_rows(rows, max_rows, vertical)
    return write_rows(rows, fmt, output)


def print_rows(rows: Rows, max_rows: int, vertical: bool = False) -> int:
    """The first ``max_rows`` rows as a fitted table; the server stops sending the rest."""
    cells: list[list[str]] = []
    more = False
    for batch in rows.batches:
        part = batch.slice(0, max_rows + 1 - len(cells))
        cells.extend([cell_text(value) for value in row] for row in batch_rows(part))
        if len(cells) > max_rows:
            more = True
            rows.stop()  # no need to read what is not shown
            break
    print_table(rows.schema.names, cells[:max_rows], vertical)
    if more:
        click.echo(f"(first {max_rows} rows shown)", err=True)
    return min(len(cells), max_rows)


def batch_rows(batch: pa.RecordBatch) -> Iterator[tuple[Any, ...]]:
    """The rows of a batch as tuples of Python values (columns of equal names kept apart)."""
    return zip(*(column.to_pylist() for column in batch.columns), strict=True)


def write_rows(rows: Rows, fmt: str, output: Path | None) -> int:
    """Write every row to ``output`` (stdout when None) as CSV, JSON lines, Parquet or Arrow IPC."""
    with open_sink(output) as sink:
        if fmt == "json":
            return write_json_lines(rows, sink)
        if fmt == "parquet":
            writer: Any = pq.ParquetWriter(sink, rows.schema, compression="zstd")
        elif fmt == "arrow":
            writer = pa.ipc.new_file(sink, rows.schema)
        else:
            writer = pacsv.CSVWriter(sink, csv_schema(rows.schema))
        count = 0
        with writer:
            for batch in rows.batches:
                writer.write_batch(csv_batch(batch) if fmt == "csv" else batch)
                count += batch.num_rows
        return count


@contextmanager
def open_sink(output: Path | None) -> Iterator[BinaryIO]:
    """The file to write, or stdout's bytes (flushed, left open)."""
    if output is None:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    try:
        file = output.open("wb")
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from None
    with file:
        yield file


def write_json_lines(rows: Rows, sink: BinaryIO) -> int:
    """One JSON object per row."""
    count = 0
    for batch in rows.batches:
        names = batch.schema.names
        for values in batch_rows(batch):
            sink.write(json_text(dict(zip(names, values, strict=True))).encode() + b"\n")
        count += batch.num_rows
    return count
