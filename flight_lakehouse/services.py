"""The composition root: storage, catalog, the datasets registry, caches, search, index builds and the query
engine, built in one place from the settings."""

from __future__ import annotations

from dataclasses import dataclass

from flight_lakehouse.catalog import DatasetCatalog
from flight_lakehouse.datasets.base import Retention
from flight_lakehouse.datasets.iceberg import IcebergTables
from flight_lakehouse.datasets.lance import LanceTables
from flight_lakehouse.datasets.registry import Datasets
from flight_lakehouse.embeddings import open_embedder
from flight_lakehouse.errors import InvalidArgument
from flight_lakehouse.limits import Slots
from flight_lakehouse.peers import Peers
from flight_lakehouse.query import QueryEngine
from flight_lakehouse.semantic import TextEmbedding
from flight_lakehouse.settings import Settings, SettingsError
from flight_lakehouse.sql_search import SqlSearch
from flight_lakehouse.storage import Storage, open_storage
from flight_lakehouse.vector_cache import VectorCache
from flight_lakehouse.vector_index import IndexBuilder
from flight_lakehouse.vector_search import VectorSearch


@dataclass(frozen=True)
class Services:
    """Everything the handlers use, built once per server."""

    settings: Settings
    storage: Storage
    datasets: Datasets
    cache: VectorCache
    searcher: VectorSearch
    indexes: IndexBuilder
    engine: QueryEngine
    texts: TextEmbedding
    #: The live servers of the root (started by the server once it knows its port)
    peers: Peers


def build_services(settings: Settings) -> Services:
    """Open the storage and build the services on it."""
    storage = open_storage(settings)
    retention = Retention(settings.snapshot_keep_last, settings.snapshot_keep_seconds)
    catalog = DatasetCatalog(storage, settings.catalog_uri, retention)
    iceberg = IcebergTables(catalog, settings)
    ingests = Slots(settings.max_concurrent_ingests, "uploads", "max_concurrent_ingests")
    datasets = Datasets(iceberg, LanceTables(storage, settings), ingests)
    cache = VectorCache(datasets.lance, settings)
    try:
        embedder = open_embedder(
            settings.embedder, settings.embedder_model, settings.embedder_timeout_seconds
        )
    except InvalidArgument as exc:
        raise SettingsError(str(exc)) from None
    texts = TextEmbedding(embedder, datasets)
    searcher = VectorSearch(datasets, cache, texts)
    return Services(
        settings=settings,
        storage=storage,
        datasets=datasets,
        cache=cache,
        searcher=searcher,
        indexes=IndexBuilder(datasets.lance, settings),
        engine=QueryEngine(datasets, settings, SqlSearch(searcher)),
        texts=texts,
        peers=Peers(settings, catalog.iceberg.engine),
    )
