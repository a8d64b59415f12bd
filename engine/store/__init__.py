"""The store: the only package that talks to the database.

``db`` opens SQLite and applies migrations; ``inbox`` holds received messages and
group-commits them. Later modules (referrals, timers, outbox, audit) live beside them
and share one connection owned by the event loop thread.
"""

from engine.store.db import Database, open_database
from engine.store.inbox import AddResult, Inbox

__all__ = ["AddResult", "Database", "Inbox", "open_database"]
