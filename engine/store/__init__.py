"""The store: the only package that talks to the database (tests/test_layers.py).

``sql`` is the leaf: the connection (``Database``), transactions and SQL helpers. Each
table module (``inbox``, ``referrals``, ``outbox``, ``audit``, ``decisions``, ``report``,
``tasks``, ...) owns its table's schema and queries and imports only ``sql`` and its
sibling tables; ``migrations`` lists the schema steps and imports the table modules;
``db`` opens the file and migrates it. One connection, owned by the event loop thread.

May import: ``engine.model``, ``engine.errors``, ``engine.clock``, ``engine.canonical``,
SQLite, sqlite_utils, psycopg and psycopg_pool; never routing, tracking, ingest,
delivery, web or the CLI.
"""

from engine.store.db import Database, open_database
from engine.store.inbox import AddResult, Inbox

__all__ = ["AddResult", "Database", "Inbox", "open_database"]
