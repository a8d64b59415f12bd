"""HTTP: the aiohttp server (health, readiness, metrics, admin), the JSON API, the
dashboard, users, sessions and tokens.
"""
