"""Referrals: the pure state machine (``states``), the correlation rule and parking
(``correlate``), applying events and their effects (``tracker``), operator actions
(``actions``), read views (``views``), the escalation policy (``escalation``), the
specialist directory (``specialists``) and the closure report arithmetic (``report``).

May import: the shared top-level modules, engine.store and the channels' pure helpers.
engine.routing imports it (the escalation policy), so it imports no engine.routing.
``states`` and ``escalation`` are pure and import no store.
"""
