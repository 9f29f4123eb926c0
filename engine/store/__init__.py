"""The store: where requests, activities, attachments and the ledger live.

:mod:`engine.store.base` is the interface (a :class:`Store` and its :class:`Transaction`);
:mod:`engine.store.sqlite` implements it over SQLite and attachment files, and
:mod:`engine.store.postgres` over PostgreSQL for several replicas (imported only when
``--store`` names one: a SQLite user's start does not pay for asyncpg).
"""

from engine.passwords import hash_password, verify_password
from engine.store.base import RequestFilter, Store, Transaction
from engine.store.lock import DataDirLock, private_file, secure_data_dir
from engine.store.sqlite import SqliteStore, SqliteTransaction, open_store, store_error

__all__ = [
    "DataDirLock",
    "RequestFilter",
    "SqliteStore",
    "SqliteTransaction",
    "Store",
    "Transaction",
    "hash_password",
    "open_store",
    "private_file",
    "secure_data_dir",
    "store_error",
    "verify_password",
]
