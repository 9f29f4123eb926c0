"""The store: where requests, activities, attachments and the ledger live.

The writer talks to it through :class:`SqliteStore`; a PostgreSQL store for several replicas
will implement the same methods.
"""

from engine.store.lock import DataDirLock
from engine.store.sqlite import (
    CLOSED_STATUSES,
    LedgerRow,
    RequestRef,
    SqliteStore,
    Team,
    User,
    hash_password,
    open_store,
    verify_password,
)

Store = SqliteStore

__all__ = [
    "CLOSED_STATUSES",
    "DataDirLock",
    "LedgerRow",
    "RequestRef",
    "SqliteStore",
    "Store",
    "Team",
    "User",
    "hash_password",
    "open_store",
    "verify_password",
]
