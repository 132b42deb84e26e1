"""``flight-lakehouse ingest`` on real-world files (issue 17): every accepted suffix, compressed text, TSV,
nulls, column types, headerless CSV, a directory or a glob as one upload, and one-line errors.

The command runs against one real server (local root: storage does not matter here), in this process
through click's runner (a child process costs a second of imports), and as a child process where the
process itself matters: the progress bar, and an upload cut off when a file fails in its middle. What it
uploaded is read back through Flight and compared row by row and type by type.
"""

from __future__ import annotations

import datetime
import decimal
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from flight_lakehouse.cli import main
from flight_lakehouse.local_files import ACCEPTED_SUFFIXES, BLOCK_BYTES
from tests.conftest import ServerProcess, running_server

ROWS = 300
NAMES = [
    'Zoë "Zed" O\'Brien',
    "Müller, Jürgen",
    "東京タワー",
    "two\nlines",
    "emoji 🚀, comma",
    "plain",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module."""
    with running_server(str(tmp_path_factory.mktemp("files") / "lakehouse")) as process:
        yield process


def people(rows: int = ROWS, first_id: int = 0) -> pa.Table:
    """Rows with quoted fields, embedded commas, quotes and line breaks, and non-ASCII text."""
    ids = range(first_id, first_id + rows)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "name": [NAMES[i % len(NAMES)] for i in ids],
            "amount": [i * 1.25 for i in ids],
            "active": [i % 3 == 0 for i in ids],
            "day": pa.array([datetime.date(2024, 1, 1) + datetime.timedelta(days=i % 400) for i in ids]),
        }
    )


def write(table: pa.Table, path: Path) -> Path:
    """``table`` as the file its suffix names (IPC: ``.ipc`` in the stream format, the others as files)."""
    suffix = "".join(path.suffixes[-2:]) if path.suffix in (".gz", ".zst") else path.suffix
    codec = {".gz": "gzip", ".zst": "zstd"}.get(path.suffix)
    if suffix in (".parquet", ".pq"):
        pq.write_table(table, path)
    elif suffix == ".feather":
        feather.write_feather(table, path)  # version 2: an IPC file, lz4-compressed
    elif suffix in (".arrow", ".ipc"):
        new = pa.ipc.new_file if suffix == ".arrow" else pa.ipc.new_stream
        with pa.OSFile(str(path), "wb") as sink, new(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=70)
    else:
        with pa.output_stream(str(path), compression=codec) as sink:
            if suffix.startswith((".jsonl", ".ndjson")):
                for row in table.to_pylist():
                    line = json.dumps(row, ensure_ascii=False, default=str) + "\n"
                    sink.write(line.encode())
            else:
                delimiter = "\t" if suffix.startswith(".tsv") else ","
                pacsv.write_csv(table, sink, pacsv.WriteOptions(delimiter=delimiter))
    return path


@dataclass(frozen=True)
class Ran:
    """How a command ended."""

    code: int
    stdout: str
    stderr: str


def cli(*args: str) -> Ran:
    """``flight-lakehouse ARGS`` in this process; an exception the command did not turn into its one-line
    error fails the test."""
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return Ran(result.exit_code, result.stdout, result.stderr)


def cli_process(*args: str) -> Ran:
    """``flight-lakehouse ARGS`` in a child process."""
    command = [sys.executable, "-m", "flight_lakehouse", *args]
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    return Ran(done.returncode, done.stdout, done.stderr)


def ingest(server: ServerProcess, path: Path | str, dataset: str, *flags: str) -> list[str]:
    """The arguments of ``ingest PATH --dataset DATASET FLAGS`` against the server."""
    return ["ingest", str(path), "--dataset", dataset, "--server", server.location, *flags]


def error_line(result: Ran) -> str:
    """The one line a failed command printed."""
    assert result.code == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def succeeded(result: Ran, rows: int, dataset: str) -> None:
    assert result.code == 0, result.stderr
    assert f"{rows} rows into {dataset} " in result.stdout, result.stdout


def stored(server: ServerProcess, dataset: str) -> pa.Table:
    """The dataset as a scan reads it, in id order (every column nullable, as stored)."""
    return server.ticket({"dataset": dataset}).sort_by("id")


def snapshots(server: ServerProcess, dataset: str) -> int:
    return len(server.action("dataset_history", {"dataset": dataset}))  # type: ignore[arg-type]


def datasets(server: ServerProcess) -> set[str]:
    return {entry["name"] for entry in server.action("list_datasets")}  # type: ignore[union-attr]


def nullable(schema: pa.Schema) -> pa.Schema:
    return pa.schema([field.with_nullable(True) for field in schema])


# -- formats -------------------------------------------------------------------------------------------


def test_every_accepted_suffix_in_one_directory_upload(server: ServerProcess, tmp_path: Path) -> None:
    """A file of each suffix (with a hidden file and a _SUCCESS marker beside them, as Spark leaves them)
    read to the same rows and types: one upload, one snapshot; ``--types`` applies to every format."""
    folder = tmp_path / "all"
    folder.mkdir()
    source = people()
    for number, suffix in enumerate(ACCEPTED_SUFFIXES):
        write(people(ROWS, number * ROWS), folder / f"part-{number:02d}{suffix}")
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-00.csv.crc").write_text("not data")
    result = cli_process(*ingest(server, folder, "every_suffix", "--types", "day=date32"))
    total = ROWS * len(ACCEPTED_SUFFIXES)
    succeeded(result, total, "every_suffix")
    assert f"ingest part-{len(ACCEPTED_SUFFIXES) - 1:02d}" in result.stderr  # the progress names the file
    table = stored(server, "every_suffix")
    assert table.schema == nullable(source.schema)
    assert table.num_rows == total and snapshots(server, "every_suffix") == 1
    for number, suffix in enumerate(ACCEPTED_SUFFIXES):
        part = table.slice(number * ROWS, ROWS)
        assert part.to_pylist() == people(ROWS, number * ROWS).to_pylist(), suffix


def test_inferred_types_of_each_format(server: ServerProcess, tmp_path: Path) -> None:
    """Without --types: CSV and TSV infer a date, JSON a timestamp, Parquet and IPC keep their types."""
    source = people()
    names = ["csv.gz", "tsv", "jsonl.zst", "parquet", "feather"]
    paths = [write(source, tmp_path / f"people.{name}") for name in names]
    datasets_ = [f"inferred_{name.replace('.', '_')}" for name in names]
    for path, dataset in zip(paths, datasets_, strict=True):
        succeeded(cli(*ingest(server, path, dataset)), ROWS, dataset)
    for name, dataset in zip(names, datasets_, strict=True):
        table = stored(server, dataset)
        expected = source
        if name.startswith("jsonl"):
            midnight = pa.array(
                [datetime.datetime.combine(d, datetime.time()) for d in source["day"].to_pylist()]
            )
            expected = source.set_column(4, "day", midnight.cast(pa.timestamp("us")))
        assert table.schema == nullable(expected.schema), name
        assert table.to_pylist() == expected.to_pylist(), name


def test_types_are_inferred_from_more_than_the_first_parse_block(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Whole numbers for the first 2 MB, then a fraction: the column is inferred as a double from the first
    16 MB, though files are parsed in 1 MB blocks, in CSV and in JSON."""
    rows = 300_000
    csv, jsonl = tmp_path / "late.csv", tmp_path / "late.jsonl"
    csv.write_text("id,rate\n" + "".join(f"{i},{i % 97}\n" for i in range(rows)) + f"{rows},0.5\n")
    jsonl.write_text(
        "".join(f'{{"id": {i}, "rate": {i % 97}}}\n' for i in range(rows))
        + f'{{"id": {rows}, "rate": 0.5}}\n'
    )
    assert csv.stat().st_size > 2 * BLOCK_BYTES and jsonl.stat().st_size > 2 * BLOCK_BYTES
    for path in (csv, jsonl):
        dataset = f"late_{path.suffix[1:]}"
        succeeded(cli(*ingest(server, path, dataset)), rows + 1, dataset)
        table = server.sql(f"select rate from {dataset} where id >= {rows - 1} order by id")
        assert table.schema.field("rate").type == pa.float64(), path
        assert table["rate"].to_pylist() == [(rows - 1) % 97, 0.5], path


# -- CSV options ---------------------------------------------------------------------------------------

MESSY_CSV = '''id,city,zip,price,score,seen_at,note
1,"Zürich, CH",08001,12.50,NA,2024-03-01 10:00:00,"said ""hi"""
2,NA,00123,7.25,3,2024-03-02 11:30:00,NULL
3,Tōkyō,99999,NA,4,NA,"multi
line"
4,,10001,0.10,,2024-03-04 00:00:00,plain
'''


def test_null_values_types_and_delimiters(server: ServerProcess, tmp_path: Path) -> None:
    """``--null-values NA,NULL`` makes NA null in string columns too; ``--types`` keeps a zip code's
    leading zero and sets decimals and timestamps; ``;`` and a typed ``\\t`` as delimiters."""
    messy = tmp_path / "messy.csv"
    messy.write_text(MESSY_CSV, encoding="utf-8")
    semicolons = tmp_path / "semicolons.csv"
    semicolons.write_text(
        MESSY_CSV.replace(",", ";").replace('"Zürich; CH"', '"Zürich, CH"'), encoding="utf-8"
    )
    tabs = tmp_path / "tabs.txt"
    tabs.write_text(MESSY_CSV.replace(",", "\t").replace('"Zürich\t CH"', '"Zürich, CH"'), encoding="utf-8")
    types = "zip=string,price=decimal128(10,2),seen_at=timestamp[us],score=int32"
    commands = [
        ingest(server, messy, "nulls_default"),
        ingest(server, messy, "nulls_na", "--null-values", "NA,NULL", "--types", types),
        ingest(server, semicolons, "nulls_semicolon", "--delimiter", ";", "--null-values", "NA,NULL"),
        ingest(server, tabs, "nulls_tab", "--delimiter", "\\t", "--null-values", "NA,NULL"),
    ]
    for command in commands:
        result = cli(*command)
        succeeded(result, 4, command[3])

    default = stored(server, "nulls_default")  # pyarrow's defaults: NA is null in numbers, not in text
    assert default["city"].to_pylist() == ["Zürich, CH", "NA", "Tōkyō", ""]
    assert default["score"].to_pylist() == [None, 3, 4, None]
    assert default["zip"].type == pa.int64() and default["zip"].to_pylist() == [8001, 123, 99999, 10001]

    typed = stored(server, "nulls_na")
    assert typed.schema.field("zip").type == pa.string()
    assert typed.schema.field("price").type == pa.decimal128(10, 2)
    assert typed.schema.field("seen_at").type == pa.timestamp("us")
    assert typed.schema.field("score").type == pa.int32()
    assert typed.to_pylist()[:3] == [
        {
            "id": 1,
            "city": "Zürich, CH",
            "zip": "08001",
            "price": decimal.Decimal("12.50"),
            "score": None,
            "seen_at": datetime.datetime(2024, 3, 1, 10),
            "note": 'said "hi"',
        },
        {
            "id": 2,
            "city": None,
            "zip": "00123",
            "price": decimal.Decimal("7.25"),
            "score": 3,
            "seen_at": datetime.datetime(2024, 3, 2, 11, 30),
            "note": None,
        },
        {
            "id": 3,
            "city": "Tōkyō",
            "zip": "99999",
            "price": None,
            "score": 4,
            "seen_at": None,
            "note": "multi\nline",
        },
    ]
    assert typed["city"].to_pylist()[3] is None  # an empty field is null too, with --null-values
    for dataset in ("nulls_semicolon", "nulls_tab"):
        table = stored(server, dataset)
        assert table.select(["city", "note"]) == typed.select(["city", "note"]), dataset


def test_headerless_csv(server: ServerProcess, tmp_path: Path) -> None:
    """``--no-header`` names the columns column_1, column_2, ...; ``--column-names`` names them, replacing
    a header line, or naming a headerless file's."""
    bare = tmp_path / "bare.tsv.gz"
    with pa.output_stream(str(bare), compression="gzip") as sink:
        sink.write("1\tÅsa\t2.5\n2\tBjörn\t3.5\n".encode())
    headed = tmp_path / "headed.csv"
    headed.write_text("a,b,c\n1,Åsa,2.5\n2,Björn,3.5\n", encoding="utf-8")
    commands = [
        ingest(server, bare, "bare_default", "--no-header", "--types", "column_3=float32"),
        ingest(server, bare, "bare_named", "--no-header", "--column-names", "id,name,rate"),
        ingest(server, headed, "headed_renamed", "--column-names", "id,name,rate"),
    ]
    for command in commands:
        result = cli(*command)
        succeeded(result, 2, command[3])
    default = server.ticket({"dataset": "bare_default"})
    assert default.schema == pa.schema(
        [("column_1", pa.int64()), ("column_2", pa.string()), ("column_3", pa.float32())]
    )
    assert default.sort_by("column_1").to_pylist()[0] == {"column_1": 1, "column_2": "Åsa", "column_3": 2.5}
    for dataset in ("bare_named", "headed_renamed"):
        assert stored(server, dataset).to_pylist() == [
            {"id": 1, "name": "Åsa", "rate": 2.5},
            {"id": 2, "name": "Björn", "rate": 3.5},
        ], dataset


# -- several files -------------------------------------------------------------------------------------


def test_glob_and_directory_are_one_upload(server: ServerProcess, tmp_path: Path) -> None:
    """A quoted glob of 3 gzip CSVs (a file beside them it does not match left out), then the directory of
    them appended: each one snapshot, the rows adding up, in file order."""
    folder = tmp_path / "daily"
    folder.mkdir()
    for day in range(3):
        write(people(100 + day, day * 1000), folder / f"part-{day}.csv.gz")
    write(people(5, 99_000), folder / "notes.parquet")  # not matched by the glob
    pattern = str(folder / "part-*.csv.gz")
    succeeded(cli(*ingest(server, pattern, "daily", "--mode", "create")), 303, "daily")
    assert snapshots(server, "daily") == 1
    expected = pa.concat_tables([people(100 + day, day * 1000) for day in range(3)])
    assert stored(server, "daily").to_pylist() == expected.to_pylist()

    succeeded(cli(*ingest(server, folder, "daily")), 308, "daily")  # appended: the 3 files and notes
    assert snapshots(server, "daily") == 2
    assert stored(server, "daily").num_rows == 2 * 303 + 5


def test_files_of_another_schema_commit_nothing(server: ServerProcess, tmp_path: Path) -> None:
    """A file whose columns differ from the first file's is named with the column, before anything is
    sent; a value that fails --types in the middle of an upload aborts it: nothing committed either."""
    renamed, retyped, casts = tmp_path / "renamed", tmp_path / "retyped", tmp_path / "casts"
    for folder in (renamed, retyped, casts):
        folder.mkdir()
    for folder in (renamed, retyped):
        write(people(50), folder / "a.csv")
    write(people(50).rename_columns(["id", "name", "amount", "is_active", "day"]), renamed / "b.csv")
    (retyped / "b.csv").write_text("id,name,amount,active,day\n1,x,cheap,true,2024-01-01\n")
    numbered = people(400).set_column(1, "name", pa.array([str(i) for i in range(400)]))
    write(numbered, casts / "a.parquet")  # names that are numbers: 400 rows sent, then b.parquet fails
    write(numbered.slice(0, 2).set_column(1, "name", pa.array(["7", "x"])), casts / "b.parquet")
    cast = ingest(
        server, str(casts / "*.parquet"), "mismatch_cast", "--types", "name=int64", "--batch-rows", "64"
    )
    results = [
        cli(*ingest(server, renamed, "mismatch_names")),
        cli(*ingest(server, retyped, "mismatch_types")),
    ]
    results.append(cli_process(*cast))
    assert error_line(results[0]) == (
        f"Error: {renamed / 'b.csv'}: no column 'active', which {renamed / 'a.csv'} has"
    )
    assert error_line(results[1]) == (
        f"Error: {retyped / 'b.csv'}: column 'amount' is string, but double in {retyped / 'a.csv'} "
        "(--types can set one type for all files)"
    )
    line = error_line(results[2])
    assert line.startswith(f"Error: {casts / 'b.parquet'}: ") and line.endswith("; nothing was committed"), (
        line
    )
    assert not datasets(server) & {"mismatch_names", "mismatch_types", "mismatch_cast"}


# -- errors --------------------------------------------------------------------------------------------


def test_bad_paths_and_options_are_one_line_errors(server: ServerProcess, tmp_path: Path) -> None:
    data = write(people(10), tmp_path / "data.csv")
    parquet = write(people(10), tmp_path / "data.parquet")
    jsonl = write(people(10), tmp_path / "data.jsonl")
    sheet = tmp_path / "report.xlsx"
    sheet.write_bytes(b"PK")
    (tmp_path / "empty").mkdir()
    cases = {
        "unknown_suffix": (
            ingest(server, sheet, "e1"),
            f"Error: {sheet}: unknown file type; accepted suffixes: {', '.join(ACCEPTED_SUFFIXES)}",
        ),
        "unknown_type": (
            ingest(server, data, "e2", "--types", "id=int65"),
            "Error: --types: unknown type 'int65' for column 'id' "
            "(Arrow names: int64, float64, string, bool, date32, timestamp[us], decimal128(10,2))",
        ),
        "bad_pair": (
            ingest(server, data, "e3", "--types", "id"),
            "Error: --types: expected COLUMN=TYPE, not 'id'",
        ),
        "unknown_column": (
            ingest(server, data, "e4", "--types", "amount=float32,iid=int32"),
            f"Error: --types: {data} has no column 'iid' (its columns: id, name, amount, active, day)",
        ),
        "unknown_json_column": (
            ingest(server, jsonl, "e5", "--types", "iid=int32"),
            f"Error: --types: {jsonl} has no column 'iid' (its columns: id, name, amount, active, day)",
        ),
        "delimiter_on_parquet": (
            ingest(server, parquet, "e6", "--delimiter", ";"),
            f"Error: --delimiter applies to CSV and TSV files only, not {parquet}",
        ),
        "header_on_json": (
            ingest(server, jsonl, "e7", "--no-header"),
            f"Error: --no-header applies to CSV and TSV files only, not {jsonl}",
        ),
        "long_delimiter": (
            ingest(server, data, "e8", "--delimiter", ";;"),
            "Error: --delimiter must be one character (or \\t), not ';;'",
        ),
        "empty_glob": (
            ingest(server, f"{tmp_path}/*.csv.zst", "e9"),
            f"Error: no files match '{tmp_path}/*.csv.zst'",
        ),
        "empty_directory": (
            ingest(server, tmp_path / "empty", "e10"),
            f"Error: {tmp_path / 'empty'}: no files in this directory "
            f"(subdirectories: use a glob, '{tmp_path / 'empty' / '**' / '*.csv'}')",
        ),
        "missing": (
            ingest(server, tmp_path / "nope.csv", "e11"),
            f"Error: {tmp_path / 'nope.csv'}: no such file or directory",
        ),
    }
    for case, (command, message) in cases.items():
        assert error_line(cli(*command)) == message, case
    assert not datasets(server) & {f"e{number}" for number in range(1, 12)}
