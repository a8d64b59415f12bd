"""HTTP: the aiohttp server (health, readiness, metrics, admin), the JSON API and its
OpenAPI schema (``api``), the dashboard, users, sessions and tokens (``auth``).

May import: every stage below it (store, routing, tracking, timers, ingest, delivery)
and the shared modules. Not app or cli.
"""
