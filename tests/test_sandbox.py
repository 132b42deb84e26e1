"""SQL is read-only and sandboxed: user SQL reads the registered datasets and nothing else."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import (
    BUCKET,
    STORAGE_KINDS,
    ServerProcess,
    data_files,
    is_s3,
    make_root,
    root_forms,
    root_listing,
    running_server,
    s3_root,
)

T = pa.table({"x": [1, 2, 3], "s": ["a", "b", "c"]})
U = pa.table({"x": [3, 4], "y": ["three", "four"]})
SECRET = pa.table({"secret": ["do-not-read"]})
OTHER_BUCKET = "lakehouse-other"
# Objects outside the root that a query must not read (written for real on the S3 root), nor write.
S3_OTHER_KEY = f"s3://{BUCKET}/other/x.parquet"
S3_OTHER_BUCKET_KEY = f"s3://{OTHER_BUCKET}/x.parquet"
S3_WRITE_TARGET = f"s3://{BUCKET}/other/copy.parquet"


@dataclass
class Sandbox:
    """One server with datasets ``t`` and ``u``, and the places an escape would read from or write to."""

    server: ServerProcess
    root: str
    data_file: str
    catalog: str
    escape: Path
    before: set[str]
    outside_before: set[str]

    def fill(self, sql: str) -> str:
        """Substitute the ``{file}``, ``{root}``, ``{catalog}`` and ``{escape}`` placeholders of a case."""
        return sql.format(file=self.data_file, root=self.root, catalog=self.catalog, escape=self.escape)

    def outside(self) -> set[str]:
        """On S3: the objects outside the root a query could reach (``other/`` keys, the other bucket)."""
        if not is_s3(self.root):
            return set()
        client = s3_root(self.root).s3.boto3_client()
        keys: set[str] = set()
        for bucket, prefix in ((BUCKET, "other/"), (OTHER_BUCKET, "")):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys.update(f"{bucket}/{item['Key']}" for item in page.get("Contents", ()))
        return keys


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as a Parquet file."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@pytest.fixture(scope="module", params=STORAGE_KINDS)
def sandbox(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A module-wide server per storage kind (one per case would be slow) holding two small datasets.

    On S3, objects a query must never read exist for real: another key of the bucket and a key of
    another bucket, both readable with the server's credentials.
    """
    base = tmp_path_factory.mktemp("sandbox")
    root, escape = make_root(request, request.param, base, "sandbox"), base / "escape"
    escape.mkdir()
    catalog = f"{root}/catalog.db"
    if is_s3(root):
        entry = s3_root(root)
        catalog = f"{entry.state_dir}/catalog.db"
        client = entry.s3.boto3_client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=OTHER_BUCKET)
        for url in (S3_OTHER_KEY, S3_OTHER_BUCKET_KEY):
            bucket, key = url.removeprefix("s3://").split("/", 1)
            client.put_object(Bucket=bucket, Key=key, Body=parquet_bytes(SECRET))
    with running_server(root) as server:
        server.put("t", T)
        server.put("u", U)
        files = sorted(data_files(root))
        assert files, "the ingest wrote no Parquet file"
        box = Sandbox(server, root, files[0], catalog, escape, root_listing(root), set())
        box.outside_before = box.outside()
        yield box


# (id, SQL template, expected exception, regex that the message must match, case-insensitively)
REFUSED: list[tuple[str, str, type[Exception], str | None]] = [
    ("read_csv_passwd", "select * from read_csv('/etc/passwd')", pa.ArrowInvalid, r"read_csv"),
    ("read_csv_auto_passwd", "select * from read_csv_auto('/etc/passwd')", pa.ArrowInvalid, r"read_csv"),
    ("read_parquet_passwd", "select * from read_parquet('/etc/passwd')", pa.ArrowInvalid, r"read_parquet"),
    ("read_json_passwd", "select * from read_json('/etc/passwd')", pa.ArrowInvalid, r"read_json"),
    ("read_text_passwd", "select * from read_text('/etc/passwd')", pa.ArrowInvalid, r"read_text"),
    ("read_blob_passwd", "select * from read_blob('/etc/passwd')", pa.ArrowInvalid, r"read_blob"),
    ("read_csv_datafile", "select * from read_csv('{file}')", pa.ArrowInvalid, r"read_csv"),
    ("read_parquet_datafile", "select * from read_parquet('{file}')", pa.ArrowInvalid, r"read_parquet"),
    ("read_json_datafile", "select * from read_json('{file}')", pa.ArrowInvalid, r"read_json"),
    ("read_text_datafile", "select * from read_text('{file}')", pa.ArrowInvalid, r"read_text"),
    ("read_blob_datafile", "select * from read_blob('{file}')", pa.ArrowInvalid, r"read_blob"),
    ("read_parquet_root_glob", "select * from read_parquet('{root}/**/*.parquet')", pa.ArrowInvalid, None),
    ("parquet_scan_datafile", "select * from parquet_scan('{file}')", pa.ArrowInvalid, r"parquet_scan"),
    ("replacement_scan_datafile", "select * from '{file}'", pa.ArrowInvalid, None),
    ("replacement_scan_from_first", "from '{file}'", pa.ArrowInvalid, None),
    ("replacement_scan_root_glob", "select * from '{root}/tables/t/data/*.parquet'", pa.ArrowInvalid, None),
    ("replacement_scan_passwd", "select * from '/etc/passwd'", pa.ArrowInvalid, r"/etc/passwd"),
    ("replacement_scan_catalog_db", "select * from '{catalog}'", pa.ArrowInvalid, None),
    ("describe_datafile", "describe '{file}'", pa.ArrowInvalid, None),
    ("summarize_passwd", "summarize '/etc/passwd'", pa.ArrowInvalid, r"/etc/passwd"),
    ("glob", "select * from glob('/etc/*')", pa.ArrowInvalid, r"glob"),
    ("glob_root", "select * from glob('{root}/**')", pa.ArrowInvalid, r"glob"),
    ("copy_to_tmp", "copy t to '{escape}/copy.csv'", pa.ArrowInvalid, r"\bcopy\b"),
    (
        "copy_query_to_root",
        "copy (select * from t) to '{root}/tables/t/data/evil.parquet'",
        pa.ArrowInvalid,
        r"\bcopy\b",
    ),
    ("copy_from_passwd", "copy t from '/etc/passwd'", pa.ArrowInvalid, r"\bcopy\b"),
    ("export_database", "export database '{escape}/export'", pa.ArrowInvalid, r"\bexport\b"),
    ("attach_tmp", "attach '{escape}/attached.db' as a", pa.ArrowInvalid, r"\battach\b"),
    ("attach_root", "attach '{root}/evil.db' as evil", pa.ArrowInvalid, r"\battach\b"),
    ("attach_catalog", "attach '{catalog}' as cat (type sqlite)", pa.ArrowInvalid, r"\battach\b"),
    ("detach", "detach memory", pa.ArrowInvalid, r"\bdetach\b"),
    ("install", "install httpfs", pa.ArrowInvalid, r"\b(install|load)\b"),
    ("force_install", "force install httpfs", pa.ArrowInvalid, r"\b(install|load)\b"),
    ("load", "load httpfs", pa.ArrowInvalid, r"\bload\b"),
    ("load_path", "load '{escape}/x.duckdb_extension'", pa.ArrowInvalid, r"\bload\b"),
    ("set", "set threads = 1", pa.ArrowInvalid, r"\bset\b"),
    ("set_external_access", "set enable_external_access = true", pa.ArrowInvalid, r"\bset\b"),
    ("reset", "reset threads", pa.ArrowInvalid, r"\b(reset|set)\b"),
    ("use", "use memory", pa.ArrowInvalid, r"\b(use|set)\b"),
    ("pragma", "pragma version", pa.ArrowInvalid, r"\bpragma\b"),
    ("create_table", "create table z as select 1 as a", pa.ArrowInvalid, r"\bcreate\b"),
    ("create_view", "create view v as select * from t", pa.ArrowInvalid, r"\bcreate\b"),
    ("create_macro", "create macro m(a) as a + 1", pa.ArrowInvalid, r"\bcreate\b"),
    ("insert", "insert into t values (4, 'd')", pa.ArrowInvalid, r"\binsert\b"),
    ("update", "update t set x = 0", pa.ArrowInvalid, r"\bupdate\b"),
    ("delete", "delete from t", pa.ArrowInvalid, r"\bdelete\b"),
    ("drop", "drop view t", pa.ArrowInvalid, r"\bdrop\b"),
    ("call", "call pragma_version()", pa.ArrowInvalid, r"\bcall\b"),
    ("checkpoint", "checkpoint", pa.ArrowInvalid, r"\b(checkpoint|call)\b"),
    ("two_statements", "select 1; select 2", pa.ArrowInvalid, r"statement"),
    ("select_then_copy", "select 1; copy t to '{escape}/second.csv'", pa.ArrowInvalid, r"statement"),
    ("duckdb_settings", "select * from duckdb_settings()", pa.ArrowInvalid, r"duckdb_settings"),
    ("duckdb_views", "select * from duckdb_views()", pa.ArrowInvalid, r"duckdb_views"),
    ("duckdb_tables", "select * from duckdb_tables()", pa.ArrowInvalid, r"duckdb_tables"),
    ("duckdb_secrets", "select * from duckdb_secrets()", pa.ArrowInvalid, r"duckdb_secrets"),
    (
        "pragma_table_function",
        "select * from pragma_database_list()",
        pa.ArrowInvalid,
        r"pragma_database_list",
    ),
    ("current_setting", "select current_setting('temp_directory')", pa.ArrowInvalid, r"current_setting"),
    ("getenv", "select getenv('HOME')", pa.ArrowInvalid, r"getenv"),
    (
        "information_schema_views",
        "select * from information_schema.views",
        pa.ArrowInvalid,
        r"information_schema",
    ),
    (
        "information_schema_tables",
        "select * from information_schema.tables",
        pa.ArrowInvalid,
        r"information_schema",
    ),
    ("pg_catalog_pg_class", "select * from pg_catalog.pg_class", pa.ArrowInvalid, r"pg_catalog"),
    ("pg_catalog_pg_settings", "select * from pg_catalog.pg_settings", pa.ArrowInvalid, r"pg_catalog"),
    ("system_catalog", "select * from system.main.t", pa.ArrowInvalid, r"system"),
    (
        "query_function",
        "select * from query('select * from read_csv(''/etc/passwd'')')",
        pa.ArrowInvalid,
        r"query",
    ),
    ("query_table", "select * from query_table('t')", pa.ArrowInvalid, r"query_table"),
    ("sniff_csv", "select * from sniff_csv('/etc/passwd')", pa.ArrowInvalid, r"sniff_csv"),
    ("parquet_metadata", "select * from parquet_metadata('{file}')", pa.ArrowInvalid, r"parquet_metadata"),
    ("parquet_schema", "select * from parquet_schema('{file}')", pa.ArrowInvalid, r"parquet_schema"),
    ("s3_replacement_scan", "select * from 's3://bucket/key.parquet'", pa.ArrowInvalid, r"s3://bucket"),
    (
        "s3_read_parquet",
        "select * from read_parquet('s3://bucket/key.parquet')",
        pa.ArrowInvalid,
        r"read_parquet",
    ),
    ("s3_other_key_read_parquet", f"select * from read_parquet('{S3_OTHER_KEY}')", pa.ArrowInvalid, None),
    ("s3_other_key_replacement_scan", f"select * from '{S3_OTHER_KEY}'", pa.ArrowInvalid, None),
    ("s3_other_key_from_first", f"from '{S3_OTHER_KEY}'", pa.ArrowInvalid, None),
    ("s3_other_bucket_replacement_scan", f"select * from '{S3_OTHER_BUCKET_KEY}'", pa.ArrowInvalid, None),
    (
        "s3_other_bucket_read_parquet",
        f"select * from parquet_scan('{S3_OTHER_BUCKET_KEY}')",
        pa.ArrowInvalid,
        None,
    ),
    ("s3_other_key_glob", f"select * from glob('s3://{BUCKET}/**')", pa.ArrowInvalid, r"glob"),
    ("s3_copy_to_other_key", f"copy t to '{S3_WRITE_TARGET}'", pa.ArrowInvalid, r"\bcopy\b"),
    (
        "s3_copy_query_to_other_bucket",
        f"copy (select * from t) to 's3://{OTHER_BUCKET}/copy.parquet' (format parquet)",
        pa.ArrowInvalid,
        r"\bcopy\b",
    ),
    ("http_replacement_scan", "select * from 'http://127.0.0.1:9/x.csv'", pa.ArrowInvalid, r"http://"),
    ("https_read_csv", "select * from read_csv('https://example.com/x.csv')", pa.ArrowInvalid, r"read_csv"),
    (
        "cte_scope_escape_datafile",
        'select * from (with "{file}" as (select 1 as x) select x from "{file}") a, \'{file}\' b',
        pa.ArrowInvalid,
        None,
    ),
    (
        "cte_scope_escape_in_subquery",
        'select * from \'{file}\' where 1 in (with "{file}" as (select 1) select * from "{file}")',
        pa.ArrowInvalid,
        None,
    ),
    (
        "cte_scope_escape_passwd",
        "select * from '/etc/passwd' where 1 in "
        '(with "/etc/passwd" as (select 1) select * from "/etc/passwd")',
        pa.ArrowInvalid,
        None,
    ),
    (
        "cte_named_like_a_path",  # CTE names must be plain identifiers, so a path never resolves as one
        'with "/etc/passwd" as (select 42 as a) select * from "/etc/passwd"',
        pa.ArrowInvalid,
        r"/etc/passwd",
    ),
    (
        "cte_hiding_read_csv",
        "with p as (select * from read_csv('/etc/passwd')) select * from p",
        pa.ArrowInvalid,
        r"read_csv",
    ),
    (
        "subquery_in",
        "select * from t where x in (select * from read_csv('/etc/passwd'))",
        pa.ArrowInvalid,
        r"read_csv",
    ),
    ("subquery_scalar_getenv", "select x, (select getenv('HOME')) from t", pa.ArrowInvalid, r"getenv"),
    (
        "subquery_exists_settings",
        "select * from t where exists (select * from duckdb_settings())",
        pa.ArrowInvalid,
        r"duckdb_settings",
    ),
    ("derived_table_glob", "select * from (select * from glob('/etc/*')) g", pa.ArrowInvalid, r"glob"),
    (
        "union_read_text",
        "select s from t union all select content from read_text('/etc/passwd')",
        pa.ArrowInvalid,
        r"read_text",
    ),
    (
        "range_arg_subquery",
        "select * from range((select count(*) from read_csv('/etc/passwd')))",
        pa.ArrowInvalid,
        r"read_csv",
    ),
    ("describe_query", "describe select * from read_csv('/etc/passwd')", pa.ArrowInvalid, r"read_csv"),
    (
        "lateral_read_csv",
        "select * from t, lateral (select * from read_csv('/etc/passwd')) p",
        pa.ArrowInvalid,
        r"read_csv",
    ),
    ("join_read_csv", "select * from t join read_csv('/etc/passwd') p on true", pa.ArrowInvalid, r"read_csv"),
    ("join_datafile", "select * from t join '{file}' f using (x)", pa.ArrowInvalid, None),
    ("unknown_view_sqlite_master", "select * from sqlite_master", pa.ArrowKeyError, r"sqlite_master"),
    ("unknown_view_duckdb_tables", "select * from duckdb_tables", pa.ArrowKeyError, r"duckdb_tables"),
    ("unknown_view_pg_class", "select * from pg_class", pa.ArrowKeyError, r"pg_class"),
]


def assert_clean_refusal(exc: BaseException, root: str, pattern: str | None, sent: str) -> None:
    """The message names the problem and leaks neither a traceback nor the server root.

    The storage root is never shown, even when the query spelled it out; the local state directory of
    an S3 root may be, when (and only when) the query itself named it (the offending value is echoed).
    """
    message = str(exc)
    assert "Traceback" not in message
    forms = root_forms(root)
    if is_s3(root):
        forms = [form for form in forms if form != str(s3_root(root).state_dir) or form not in sent]
    for form in forms:
        assert form not in message, message
    if pattern is not None:
        assert re.search(pattern, message, re.IGNORECASE), message


def run_refused(box: Sandbox, sql: str, expected: type[Exception], pattern: str | None) -> None:
    """Run one refused case and check its error."""
    sent = box.fill(sql)
    with pytest.raises(expected) as info:
        box.server.sql(sent)
    if expected is pa.ArrowInvalid:  # ArrowKeyError is not an ArrowInvalid; keep the two apart
        assert not isinstance(info.value, pa.ArrowKeyError)
    assert_clean_refusal(info.value, box.root, pattern, sent)


@pytest.mark.parametrize(
    ("sql", "expected", "pattern"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_refused(sandbox: Sandbox, sql: str, expected: type[Exception], pattern: str | None) -> None:
    """Every way out of the datasets is refused with a clean one-line error."""
    run_refused(sandbox, sql, expected, pattern)


def test_refused_attempts_leave_no_files(sandbox: Sandbox) -> None:
    """After every attempt (run again here; their errors are checked above), no file was written."""
    for _, sql, _, _ in REFUSED:
        with contextlib.suppress(pa.ArrowException):
            sandbox.server.sql(sandbox.fill(sql))
    assert root_listing(sandbox.root) == sandbox.before
    assert sandbox.outside() == sandbox.outside_before
    assert list(sandbox.escape.iterdir()) == []
    assert sandbox.server.sql("select count(*) as n, sum(x) as s from t").to_pylist() == [{"n": 3, "s": 6}]


ALLOWED: list[tuple[str, str, list[dict[str, object]]]] = [
    ("select_1_no_table", "select 1 as one", [{"one": 1}]),
    ("plain", "select x, s from t order by x", T.to_pylist()),
    ("from_first", "from t select sum(x) as s", [{"s": 6}]),
    ("cte", "with big as (select x from t where x > 1) select sum(x) as s from big", [{"s": 5}]),
    (
        "recursive_cte",
        "with recursive r(i) as (select 1 union all select i + 1 from r where i < 4) "
        "select list(i) as l from r",
        [{"l": [1, 2, 3, 4]}],
    ),
    ("join", "select t.s, u.y from t join u on t.x = u.x", [{"s": "c", "y": "three"}]),
    (
        "left_join",
        "select t.x, u.y from t left join u using (x) order by t.x",
        [{"x": 1, "y": None}, {"x": 2, "y": None}, {"x": 3, "y": "three"}],
    ),
    (
        "window",
        "select x, sum(x) over (order by x) as run, row_number() over (order by x desc) as rn "
        "from t order by x",
        [{"x": 1, "run": 1, "rn": 3}, {"x": 2, "run": 3, "rn": 2}, {"x": 3, "run": 6, "rn": 1}],
    ),
    ("range", "select sum(range) as s, count(*) as n from range(10)", [{"s": 45, "n": 10}]),
    ("generate_series", "select list(generate_series) as l from generate_series(1, 3)", [{"l": [1, 2, 3]}]),
    ("unnest_scalar", "select unnest([1, 2, 3]) as v", [{"v": 1}, {"v": 2}, {"v": 3}]),
    ("unnest_table", "select sum(unnest) as s from unnest([4, 5])", [{"s": 9}]),
    ("range_join_dataset", "select count(*) as n from range(5) r(i) join t on t.x = r.i", [{"n": 3}]),
    ("subquery_in", "select x from t where x in (select x from u)", [{"x": 3}]),
    ("scalar_subquery", "select (select max(x) from u) - (select min(x) from t) as d", [{"d": 3}]),
    ("union", "select x from t union select x from u order by x", [{"x": 1}, {"x": 2}, {"x": 3}, {"x": 4}]),
    ("union_all", "select count(*) as n from (select x from t union all select x from u)", [{"n": 5}]),
    ("case_insensitive_name", "select count(*) as n from T", [{"n": 3}]),
]


@pytest.mark.parametrize(("sql", "rows"), [c[1:] for c in ALLOWED], ids=[c[0] for c in ALLOWED])
def test_allowed(sandbox: Sandbox, sql: str, rows: list[dict[str, object]]) -> None:
    """Ordinary read-only SQL over the datasets works and returns the right values."""
    assert sandbox.server.sql(sql).to_pylist() == rows


def test_describe_dataset_view(sandbox: Sandbox) -> None:
    """``DESCRIBE t`` lists the dataset's columns and types."""
    result = sandbox.server.sql("describe t").to_pylist()
    assert [(row["column_name"], row["column_type"]) for row in result] == [("x", "BIGINT"), ("s", "VARCHAR")]
