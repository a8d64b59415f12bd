"""Outbound channel adapters and their pure helpers: SMS (``sms/``), Direct (``direct/``),
e-fax (``fax/``), signed webhooks, FHIR write-back, the specialist packet PDF, confirm
links. No database access.

May import from the engine only engine.model and engine.errors (and each other, and
their SDKs); the engine builds and calls them (engine.delivery.factory).
"""
