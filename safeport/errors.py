"""Exceptions that mean "the user can fix this": the CLI prints them without a traceback."""

from __future__ import annotations

from extractors.base import ExtractionError
from safeport.catalog import CatalogError
from store.query import QueryError
from store.readers import DataFileError
from store.store import StoreError

USER_ERRORS: tuple[type[Exception], ...] = (
    CatalogError,
    DataFileError,
    ExtractionError,
    QueryError,
    StoreError,
)
