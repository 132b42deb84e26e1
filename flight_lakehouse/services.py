"""The composition root: storage, catalog, Lance tables, caches, search, index builds and the query engine,
built in one place from the settings."""

from __future__ import annotations

from dataclasses import dataclass

from flight_lakehouse.catalog import DatasetCatalog
from flight_lakehouse.query import QueryEngine
from flight_lakehouse.settings import Settings
from flight_lakehouse.storage import Storage, open_storage
from flight_lakehouse.vector_cache import VectorCache
from flight_lakehouse.vector_index import IndexBuilder
from flight_lakehouse.vector_search import VectorSearch
from flight_lakehouse.vectors import VectorTables


@dataclass(frozen=True)
class Services:
    """Everything the handlers use, built once per server."""

    settings: Settings
    storage: Storage
    catalog: DatasetCatalog
    vectors: VectorTables
    cache: VectorCache
    searcher: VectorSearch
    indexes: IndexBuilder
    engine: QueryEngine


def build_services(settings: Settings) -> Services:
    """Open the storage and build the services on it."""
    storage = open_storage(settings)
    catalog = DatasetCatalog(storage, settings.catalog_uri)
    vectors = VectorTables(storage, settings, catalog)
    catalog.other_names = vectors.names
    cache = VectorCache(vectors, settings)
    return Services(
        settings=settings,
        storage=storage,
        catalog=catalog,
        vectors=vectors,
        cache=cache,
        searcher=VectorSearch(vectors, cache),
        indexes=IndexBuilder(vectors, settings),
        engine=QueryEngine(catalog, settings, vectors),
    )
