"""Getting messages out: the outbox dispatcher, renderer and retry policy (``dispatch``),
the channel factory (``factory``), the specialist packet (``packet``, ``packet_source``),
inbound Direct results (``direct_inbound``), provider webhooks (``webhooks``) and the
built-in coordinator task queue (``task_queue``).

May import: the shared top-level modules, engine.hl7v2, engine.store, engine.routing,
engine.tracking, engine.timers.wheel and channels. Not web, app or cli.
"""
