"""The store: the only package that talks to the database (SQLite, one connection owned
by the event loop thread). ``db`` opens it and applies migrations; one module per table
family (``inbox``, ``decisions``, ``referrals``, ``timers``, ``outbox``, ``audit``,
``specialists``, ``packets``, ``users``, ``tasks``, ``report``) and the read-only queries
(``worklist``, ``views``, ``message_filter``).

May import: the shared top-level modules and engine.hl7v2 only; nothing that decides or
serves (routing, tracking, ingest, delivery, web, app, cli).
"""

from engine.store.db import Database, open_database
from engine.store.inbox import AddResult, Inbox

__all__ = ["AddResult", "Database", "Inbox", "open_database"]
