"""The store: where requests, activities, attachments and the ledger live.

The writer talks to it through :class:`SqliteStore`; a PostgreSQL store for several replicas
will implement the same methods.
"""

from engine.store.lock import DataDirLock, private_file, secure_data_dir
from engine.store.sqlite import (
    SqliteStore,
    hash_password,
    open_store,
    store_error,
    verify_password,
)

Store = SqliteStore

__all__ = [
    "DataDirLock",
    "SqliteStore",
    "Store",
    "hash_password",
    "open_store",
    "private_file",
    "secure_data_dir",
    "store_error",
    "verify_password",
]
