"""The ``refloop`` command: ``main`` (the root group and run, send, messages, routes,
replay, simulate), one module per command group (``tracker``: referrals, parked, audit;
``timers``, ``outbox``, ``specialists``, ``users``, ``report``, ``tasks``), and
``common``: the shared options, the error mapper and the one database opener.

May import: everything, engine.app included. Command modules import ``common``, never
each other; ``main`` imports the command modules (imports run downward).
"""
