"""refloop: an HL7 v2 / FHIR closed-loop referral tracking daemon.

One package per stage of the data flow (docs/architecture.md): hl7v2 → ingest → routing →
tracking → timers → delivery, with store under all of them and web, cli and sim on top.
The top level keeps only what every stage shares: ``model`` (the frozen values stages hand
each other), ``errors``, ``clock``, ``config``, ``canonical``, ``metrics``, and ``app``
(the composition root). The shared modules import nothing else of the engine;
tests/test_layers.py enforces the order.
"""
