"""safeport: store.

``connect(store)`` is the one way in for other tools (pandas, notebooks): a read-only DuckDB
connection to a store's metadata that waits for writers' short transactions.
"""

from safeport.store.db import connect

__all__ = ["connect"]
