"""Typed JSON commands, tickets and action bodies: every byte a client sends is parsed here.

Each model refuses unknown fields and wrong types; a refusal names the field and the offending value.
``scripts/gen_schemas.py`` writes the JSON Schemas of these models to ``schemas/``.
"""

from __future__ import annotations

import json
import reprlib
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from flight_lakehouse.errors import InvalidArgument

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
MAX_COMMAND_BYTES = 1 << 20
MAX_SQL_CHARS = 100_000
#: orjson's own nesting limit for JSON arrays and objects; deeper documents are refused.
MAX_JSON_DEPTH = 1024
#: How refusals show an offending value: a few levels of a nested one (a full repr of a deep one recurses).
VALUE_REPR = reprlib.Repr()
VALUE_REPR.maxlevel, VALUE_REPR.maxstring, VALUE_REPR.maxother = 4, 160, 160

DatasetName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
ColumnName = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
SqlText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SQL_CHARS)]
Metric = Literal["cosine", "l2", "dot"]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class Command(BaseModel):
    """Base of every client-sent JSON object: strict types, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class EmbedSpec(Command):
    """``"embed": {"from": "body", "into": "vec"}``: embed the text column ``from`` into the vector column
    ``into`` with the server's embedder."""

    from_: ColumnName = Field(alias="from")
    into: ColumnName


class IngestOptions(Command):
    """How a DoPut stream is written."""

    dataset: DatasetName
    mode: Literal["append", "overwrite", "create", "upsert"] = "append"
    key: ColumnName | None = None
    format: Literal["parquet", "lance"] | None = None
    schema_mode: Literal["strict", "evolve"] = "strict"
    #: Lance tables: the metric set when the table is created (searches and indexes default to it).
    metric: Metric | None = None
    #: Lance tables: a ``list<float>`` column to store as the vector column.
    vector_column: ColumnName | None = None
    #: The upload's size: it commits only when exactly this many rows arrived (a client that gave up
    #: midway ends its stream as cleanly as one that finished).
    expected_rows: int | None = Field(default=None, ge=0)
    #: Embed a text column into a vector column with the server's embedder (the dataset remembers it).
    embed: EmbedSpec | None = None


class IngestCommand(Command):
    """DoPut descriptor command: ``{"ingest": {...}}``."""

    ingest: IngestOptions


class Part(Command):
    """One part of a split result (see ``partitions.py``): the dataset's files of one snapshot, every
    ``count``-th from ``index``."""

    dataset: DatasetName
    snapshot_id: Int64
    index: Annotated[int, Field(ge=0)]
    count: Annotated[int, Field(ge=2)]

    @model_validator(mode="after")
    def _index_in_range(self) -> Part:
        if self.index >= self.count:
            raise ValueError(f"part index {self.index} is not below the part count {self.count}")
        return self

    def files(self, files: tuple[str, ...]) -> tuple[str, ...]:
        """This part's share of a snapshot's (sorted) files; the parts of one count are disjoint and
        together hold every file once."""
        return files[self.index :: self.count]


class SqlQuery(Command):
    """DoGet ticket or GetFlightInfo command: ``{"sql": "SELECT ..."}``; the tickets of a split result name
    their ``part`` too."""

    sql: SqlText
    part: Part | None = None


class ScanRequest(Command):
    """DoGet ticket scanning one dataset: projection, filter, limit and time travel."""

    dataset: DatasetName
    columns: list[ColumnName] | None = Field(default=None, max_length=10_000)
    filter: SqlText | None = None
    limit: Annotated[int, Field(ge=0)] | None = None
    snapshot_id: int | None = None


MAX_SEARCH_K = 10_000
MAX_QUERY_DIMENSION = 65_536
MAX_QUERY_TEXT = 100_000
MAX_EMBED_TEXTS = 10_000
Positive = Annotated[int, Field(ge=1, le=1_000_000)]


class SearchRequest(Command):
    """Body of ``vector_search`` and of ``{"search": ...}`` tickets and DoExchange commands."""

    dataset: DatasetName
    #: The vector column to search, when the table has several.
    column: ColumnName | None = None
    vector: list[float] | None = Field(default=None, min_length=1, max_length=MAX_QUERY_DIMENSION)
    k: Annotated[int, Field(ge=1, le=MAX_SEARCH_K)] = 10
    metric: Metric | None = None
    filter: SqlText | None = None
    columns: list[ColumnName] | None = Field(default=None, max_length=10_000)
    text: Annotated[str, StringConstraints(min_length=1, max_length=10_000)] | None = None
    #: Free text embedded with the dataset's model, in place of ``vector``.
    query: Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUERY_TEXT)] | None = None
    nprobes: Positive | None = None
    refine_factor: Annotated[int, Field(ge=1, le=1000)] | None = None
    ef: Positive | None = None


class SearchCommand(Command):
    """DoGet ticket, GetFlightInfo and DoExchange command: ``{"search": {...}}``."""

    search: SearchRequest


class CreateIndex(Command):
    """Body of ``create_index``."""

    dataset: DatasetName
    column: ColumnName
    kind: Literal["ivf_pq", "ivf_hnsw_sq", "fts", "btree", "bitmap"]
    metric: Metric | None = None
    num_partitions: Annotated[int, Field(ge=1, le=65_536)] | None = None
    num_sub_vectors: Annotated[int, Field(ge=1, le=65_536)] | None = None
    m: Annotated[int, Field(ge=2, le=512)] | None = None
    ef_construction: Annotated[int, Field(ge=1, le=100_000)] | None = None
    replace: bool = False


class EmbedTexts(Command):
    """Body of ``embed``: texts to embed (with the model of ``dataset``, when given)."""

    texts: list[Annotated[str, StringConstraints(max_length=MAX_QUERY_TEXT)]] = Field(
        min_length=1, max_length=MAX_EMBED_TEXTS
    )
    dataset: DatasetName | None = None


class Reembed(Command):
    """Body of ``reembed``: embed the text column ``from`` of a dataset again with the server's embedder,
    into a new column ``into`` of the same dataset or into a new dataset ``target_dataset``."""

    dataset: DatasetName
    from_: ColumnName | None = Field(default=None, alias="from")
    into: ColumnName | None = None
    #: The model the caller expects the server to embed with (refused when it embeds with another).
    model: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = None
    target_dataset: DatasetName | None = None


class DeleteRows(Command):
    """Body of ``delete_rows``."""

    dataset: DatasetName
    where: SqlText


class Optimize(Command):
    """Body of ``optimize``: compaction, index update, and removal of versions older than the retention
    (Lance); expiry of the snapshots older than it beyond the newest ``snapshot_keep_last`` (Iceberg)."""

    dataset: DatasetName
    older_than_seconds: Annotated[float, Field(ge=0, le=10 * 365 * 86_400)] = 7 * 86_400.0


class ExpireSnapshots(Command):
    """Body of ``expire_snapshots``: keep the newest ``keep_last`` snapshots (Lance: versions) and those
    newer than ``older_than_seconds``, let go of the others; the server's settings where absent."""

    dataset: DatasetName
    keep_last: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    older_than_seconds: Annotated[float, Field(ge=0, le=10 * 365 * 86_400)] | None = None


class EmptyBody(Command):
    """Body of actions without parameters (``health``, ``list_datasets``)."""


class DatasetRef(Command):
    """Body naming one dataset (``describe_dataset``, ``dataset_history``)."""

    dataset: DatasetName


class DropDataset(Command):
    """Body of ``drop_dataset``."""

    dataset: DatasetName
    if_exists: bool = False


M = TypeVar("M", bound=Command)

#: Models whose JSON Schemas are published in ``schemas/``.
PUBLISHED_MODELS: dict[str, type[Command]] = {
    "ingest_command": IngestCommand,
    "sql_query": SqlQuery,
    "scan_request": ScanRequest,
    "empty_body": EmptyBody,
    "dataset_ref": DatasetRef,
    "drop_dataset": DropDataset,
    "search_command": SearchCommand,
    "vector_search": SearchRequest,
    "create_index": CreateIndex,
    "delete_rows": DeleteRows,
    "optimize": Optimize,
    "embed_texts": EmbedTexts,
    "reembed": Reembed,
    "expire_snapshots": ExpireSnapshots,
}


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming the first offending field and value."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    if first["type"] == "extra_forbidden":
        return f"unknown field {where!r}"
    if first["type"] == "missing":
        return f"missing field {where!r}"
    value = VALUE_REPR.repr(first.get("input"))
    if len(value) > 80:
        value = value[:77] + "..."
    message = first["msg"]
    if first["type"] == "string_pattern_mismatch" and where.endswith("dataset"):
        message = f"invalid dataset name (must match {NAME_PATTERN})"
    return f"{where}: {message}: {value}"


def decode_json_object(raw: bytes | str, what: str) -> dict[str, Any]:
    """Decode client bytes into a JSON object, refusing anything else with one clear line."""
    if len(raw) > MAX_COMMAND_BYTES:
        raise InvalidArgument(f"{what} is too large ({len(raw)} bytes, limit {MAX_COMMAND_BYTES})")
    if not raw:
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise too_deep(what) from None
        value = decode_json_leniently(raw, what)
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def decode_json_leniently(raw: bytes | str, what: str) -> Any:
    """Python's own JSON reading of what orjson refused: it accepts ``NaN``/``Infinity`` tokens, so a
    query vector holding one is refused by the vector checks, naming the value."""
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{what} is not valid UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise too_deep(what) from None


def too_deep(what: str) -> InvalidArgument:
    """The refusal of a JSON document nested past :data:`MAX_JSON_DEPTH`."""
    return InvalidArgument(f"{what} is nested too deeply (JSON depth limit {MAX_JSON_DEPTH})")


def parse_model(model: type[M], payload: dict[str, Any]) -> M:
    """Validate ``payload`` as ``model``; a refusal becomes :class:`InvalidArgument`."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise InvalidArgument(describe_validation_error(exc)) from None


def parse_body(model: type[M], raw: bytes | str, what: str) -> M:
    """Decode and validate a JSON body in one step."""
    return parse_model(model, decode_json_object(raw, what))


def validate_dataset_name(name: str | bytes) -> str:
    """Check a dataset name from a path descriptor (before any storage is touched)."""
    if isinstance(name, bytes):
        try:
            name = name.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"invalid dataset name {name!r}: not UTF-8") from None
    return parse_model(DatasetRef, {"dataset": name}).dataset
