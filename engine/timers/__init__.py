"""Timers: the hierarchical timer wheel (``wheel``: pure, in memory) and the timer service
that fills it from the store and fires escalation timers in durable transactions
(``service``).

May import: ``wheel`` only the shared modules; ``service`` also engine.store, tracking,
delivery and channels (it fires through the Direct fallback and packet resend).
"""
