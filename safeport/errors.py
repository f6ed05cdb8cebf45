"""Exceptions that mean "the user can fix this": the CLI prints them without a traceback."""

from __future__ import annotations

from safeport.catalog import CatalogError
from safeport.extractors.base import ExtractionError
from safeport.store.query import QueryError
from safeport.store.readers import DataFileError
from safeport.store.store import StoreError

USER_ERRORS: tuple[type[Exception], ...] = (
    CatalogError,
    DataFileError,
    ExtractionError,
    QueryError,
    StoreError,
)
