"""Deterministic synthetic ``workers`` (staffing) table generator.

Rows are generated vectorised with numpy in bounded-size chunks and written to Parquet (zstd) or CSV.

Usage::

    python scripts/gen_workers.py OUT [--rows 500000] [--format parquet|csv] [--seed 42] [--batch-rows N]
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

__all__ = ["WORKERS_SCHEMA", "iter_worker_batches", "main", "write_workers"]

DEFAULT_ROWS = 500_000
DEFAULT_SEED = 42
DEFAULT_BATCH_ROWS = 100_000
FORMATS = ("parquet", "csv")
EMAIL_DOMAIN = "@staffing.example"


def _words(text: str) -> tuple[str, ...]:
    """The whitespace-separated words of ``text``."""
    return tuple(text.split())


FIRST_NAMES: tuple[str, ...] = _words(
    "James Mary John Patricia Robert Jennifer Michael Linda William Elizabeth David Barbara Richard "
    "Susan Joseph Jessica Thomas Sarah Carlos Karen Daniel Nancy Matthew Lisa Anthony Betty Mark "
    "Sandra Wei Ashley Steven Emily Andrew Maria Kenji Aisha Omar Priya Luis Fatima"
)
LAST_NAMES: tuple[str, ...] = _words(
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez "
    "Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris "
    "Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Nguyen Patel Kim Chen "
    "Okafor"
)

# (role, base hourly rate in USD)
ROLES: tuple[tuple[str, float], ...] = (
    ("Software Engineer", 75.0),
    ("Data Engineer", 72.0),
    ("Data Scientist", 78.0),
    ("DevOps Engineer", 70.0),
    ("QA Analyst", 45.0),
    ("Project Manager", 65.0),
    ("Business Analyst", 55.0),
    ("UX Designer", 58.0),
    ("Registered Nurse", 48.0),
    ("Electrician", 42.0),
    ("Plumber", 40.0),
    ("Welder", 32.0),
    ("Forklift Operator", 22.0),
    ("Warehouse Associate", 19.0),
    ("Customer Support", 24.0),
    ("Accountant", 50.0),
    ("Paralegal", 35.0),
    ("Administrative Assistant", 26.0),
    ("Security Guard", 21.0),
    ("Truck Driver", 30.0),
)

CITIES: tuple[tuple[str, str], ...] = (
    ("New York", "NY"), ("Los Angeles", "CA"), ("Chicago", "IL"), ("Houston", "TX"), ("Phoenix", "AZ"),
    ("Philadelphia", "PA"), ("San Antonio", "TX"), ("San Diego", "CA"), ("Dallas", "TX"), ("Austin", "TX"),
    ("Jacksonville", "FL"), ("San Jose", "CA"), ("Columbus", "OH"), ("Charlotte", "NC"),
    ("Indianapolis", "IN"), ("San Francisco", "CA"), ("Seattle", "WA"), ("Denver", "CO"),
    ("Washington", "DC"), ("Boston", "MA"), ("Nashville", "TN"), ("Detroit", "MI"), ("Portland", "OR"),
    ("Las Vegas", "NV"), ("Memphis", "TN"), ("Louisville", "KY"), ("Baltimore", "MD"), ("Milwaukee", "WI"),
    ("Albuquerque", "NM"), ("Tucson", "AZ"), ("Atlanta", "GA"), ("Kansas City", "MO"), ("Miami", "FL"),
    ("Raleigh", "NC"), ("Omaha", "NE"), ("Minneapolis", "MN"), ("Tulsa", "OK"), ("Cleveland", "OH"),
    ("New Orleans", "LA"), ("Salt Lake City", "UT"),
)  # fmt: skip

SKILLS: tuple[str, ...] = (
    "python", "sql", "java", "javascript", "go", "rust", "excel", "tableau", "aws", "azure",
    "gcp", "docker", "kubernetes", "linux", "networking", "project management", "scrum", "communication",
    "negotiation", "customer service", "forklift", "welding", "electrical wiring", "plumbing", "first aid",
    "patient care", "bookkeeping", "legal research", "scheduling", "inventory control",
)  # fmt: skip
CERTIFICATIONS: tuple[str, ...] = (
    "AWS Solutions Architect", "PMP", "CPA", "CISSP", "Scrum Master", "OSHA 30", "CDL Class A",
    "Journeyman Electrician", "BLS", "Six Sigma Green Belt", "CompTIA Security+", "Forklift Certified",
)  # fmt: skip

MIN_SKILLS, MAX_SKILLS = 1, 5
MAX_CERTIFICATIONS = 3
MAX_YEARS = 40
ACTIVE_SHARE = 0.85
RATING_NULL_SHARE = 0.02
DATE_START = (dt.date(2026, 1, 1) - dt.date(1970, 1, 1)).days
DATE_SPAN = (dt.date(2028, 1, 1) - dt.date(2026, 1, 1)).days  # every day of 2026-2027

_LIST_COLUMNS = ("skills", "certifications")

WORKERS_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("role", pa.string(), nullable=False),
        pa.field("city", pa.string(), nullable=False),
        pa.field("state", pa.string(), nullable=False),
        pa.field("skills", pa.list_(pa.string()), nullable=False),
        pa.field("certifications", pa.list_(pa.string()), nullable=False),
        pa.field("years_experience", pa.int32(), nullable=False),
        pa.field("hourly_rate", pa.float64(), nullable=False),
        pa.field("available_from", pa.date32(), nullable=False),
        pa.field("active", pa.bool_(), nullable=False),
        pa.field("email", pa.string(), nullable=False),
        pa.field("rating", pa.float32(), nullable=True),
    ],
    metadata={"generator": "scripts/gen_workers.py", "table": "workers"},
)


def _strings(values: Sequence[str]) -> pa.Array:
    """Arrow string array of a fixed vocabulary (used as a lookup table)."""
    return pa.array(values, type=pa.string())


def _random_subsets(rng: np.random.Generator, n: int, vocab: int, low: int, high: int) -> pa.ListArray:
    """Per row, ``low..high`` distinct indices into a vocabulary of size ``vocab`` (as list<int32>)."""
    counts = rng.integers(low, high + 1, size=n, dtype=np.int32)
    # The `high` smallest of `vocab` random keys form a uniform random subset; keep the first `count`.
    picks = np.argpartition(rng.random((n, vocab), dtype=np.float32), high - 1, axis=1)[:, :high]
    keep = np.arange(high, dtype=np.int32) < counts[:, None]
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(picks[keep].astype(np.int32)))


def _take_list(indices: pa.ListArray, vocab: pa.Array) -> pa.ListArray:
    """Map a list<int> array of vocabulary indices to list<string>."""
    return pa.ListArray.from_arrays(indices.offsets, vocab.take(indices.values))


def _hourly_rates(rng: np.random.Generator, role_idx: np.ndarray, years: np.ndarray) -> np.ndarray:
    """Role base rate, scaled up with experience, plus multiplicative noise; two decimals, >= 15."""
    base = np.array([rate for _, rate in ROLES])[role_idx]
    rate = base * (1.0 + 0.015 * years) * rng.normal(1.0, 0.12, size=role_idx.size)
    return np.round(np.maximum(rate, 15.0), 2)


def _ratings(rng: np.random.Generator, n: int) -> pa.Array:
    """Ratings in [1.0, 5.0] with one decimal, skewed high, with ~2% nulls."""
    values = np.round(np.clip(rng.normal(3.9, 0.7, size=n), 1.0, 5.0), 1).astype(np.float32)
    nulls = rng.random(n) < RATING_NULL_SHARE
    return pa.array(values, type=pa.float32(), mask=nulls)


def _emails(first: pa.Array, last: pa.Array, ids: np.ndarray) -> pa.Array:
    """``first.last.<id>@domain`` in lowercase (unique through the id)."""
    id_str = pc.cast(pa.array(ids), pa.string())
    local = pc.binary_join_element_wise(pc.utf8_lower(first), pc.utf8_lower(last), id_str, ".")
    return pc.binary_join_element_wise(local, EMAIL_DOMAIN, "")


def _make_batch(rng: np.random.Generator, start: int, n: int) -> pa.RecordBatch:
    """Generate rows ``start .. start + n - 1`` as one record batch."""
    ids = np.arange(start, start + n, dtype=np.int64)
    first = _strings(FIRST_NAMES).take(rng.integers(0, len(FIRST_NAMES), size=n))
    last = _strings(LAST_NAMES).take(rng.integers(0, len(LAST_NAMES), size=n))
    role_idx = rng.integers(0, len(ROLES), size=n)
    city_idx = rng.integers(0, len(CITIES), size=n)
    years = rng.integers(0, MAX_YEARS + 1, size=n, dtype=np.int32)
    skills = _random_subsets(rng, n, len(SKILLS), MIN_SKILLS, MAX_SKILLS)
    certs = _random_subsets(rng, n, len(CERTIFICATIONS), 0, MAX_CERTIFICATIONS)
    columns = [
        pa.array(ids),
        pc.binary_join_element_wise(first, last, " "),
        _strings([role for role, _ in ROLES]).take(role_idx),
        _strings([city for city, _ in CITIES]).take(city_idx),
        _strings([state for _, state in CITIES]).take(city_idx),
        _take_list(skills, _strings(SKILLS)),
        _take_list(certs, _strings(CERTIFICATIONS)),
        pa.array(years),
        pa.array(_hourly_rates(rng, role_idx, years)),
        pa.array(DATE_START + rng.integers(0, DATE_SPAN, size=n, dtype=np.int32), type=pa.date32()),
        pa.array(rng.random(n) < ACTIVE_SHARE),
        _emails(first, last, ids),
        _ratings(rng, n),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=WORKERS_SCHEMA)


def iter_worker_batches(
    rows: int, seed: int = DEFAULT_SEED, batch_rows: int = DEFAULT_BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """Yield ``rows`` worker rows as record batches of at most ``batch_rows`` rows (deterministic)."""
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    if batch_rows <= 0:
        raise ValueError(f"batch_rows must be > 0, got {batch_rows}")
    rng = np.random.default_rng(seed)
    for start in range(0, rows, batch_rows):
        yield _make_batch(rng, start, min(batch_rows, rows - start))


def csv_schema(schema: pa.Schema = WORKERS_SCHEMA) -> pa.Schema:
    """Schema for CSV output: list columns become ';'-joined strings."""
    for name in _LIST_COLUMNS:
        field = schema.field(name)
        schema = schema.set(schema.get_field_index(name), field.with_type(pa.string()))
    return schema


def to_csv_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Replace the list columns of a workers batch by ';'-joined strings."""
    columns = [
        pc.binary_join(batch.column(name), ";") if name in _LIST_COLUMNS else batch.column(name)
        for name in batch.schema.names
    ]
    return pa.RecordBatch.from_arrays(columns, schema=csv_schema(batch.schema))


def infer_format(path: str | Path) -> str:
    """``csv`` for a ``.csv`` suffix, ``parquet`` otherwise."""
    return "csv" if Path(path).suffix.lower() == ".csv" else "parquet"


def _write_parquet(path: Path, batches: Iterator[pa.RecordBatch]) -> int:
    """Stream batches into a zstd-compressed Parquet file (one row group per batch)."""
    rows = 0
    with pq.ParquetWriter(path, WORKERS_SCHEMA, compression="zstd") as writer:
        for batch in batches:
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


def _write_csv(path: Path, batches: Iterator[pa.RecordBatch]) -> int:
    """Stream batches into a CSV file with a header row."""
    rows = 0
    with pacsv.CSVWriter(path, csv_schema()) as writer:
        for batch in batches:
            writer.write_batch(to_csv_batch(batch))
            rows += batch.num_rows
    return rows


def write_workers(
    path: str | Path,
    rows: int = DEFAULT_ROWS,
    fmt: str = "parquet",
    seed: int = DEFAULT_SEED,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> int:
    """Write ``rows`` workers to ``path`` as ``parquet`` or ``csv``; return the number of rows written."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    batches = iter_worker_batches(rows, seed=seed, batch_rows=batch_rows)
    return _write_csv(out, batches) if fmt == "csv" else _write_parquet(out, batches)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse command-line arguments."""
    parser = argparse.ArgumentParser(description="Generate the synthetic `workers` staffing table.")
    parser.add_argument("out", type=Path, help="output file (.parquet or .csv)")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="number of rows (default %(default)s)")
    parser.add_argument("--format", choices=FORMATS, default=None, help="default: inferred from OUT suffix")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default %(default)s)")
    parser.add_argument(
        "--batch-rows", type=int, default=DEFAULT_BATCH_ROWS, help="rows per chunk (default %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.rows < 0:
        parser.error("--rows must be >= 0")
    if args.batch_rows <= 0:
        parser.error("--batch-rows must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: write the table and print ``rows path bytes`` on one line."""
    args = _parse_args(argv)
    fmt = args.format or infer_format(args.out)
    rows = write_workers(args.out, rows=args.rows, fmt=fmt, seed=args.seed, batch_rows=args.batch_rows)
    print(f"rows={rows} path={args.out} bytes={args.out.stat().st_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
