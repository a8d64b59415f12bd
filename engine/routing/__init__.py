"""routes.yaml → decisions: compiling the file (``compile`` with ``when``, ``extract``,
``actions``, ``channels``; the result in ``table``), the pure ``decide``, building events
(``events``), the path functions of expressions (``fields``), Jinja expressions
(``expressions``), the FHIR path subset (``fhirpath``), the processor's ``handler``, the
decision summaries replay compares (``summary``) and ``replay`` itself.

May import: the shared top-level modules, engine.hl7v2, engine.store, engine.tracking and
the channels' pure helpers (SMS template check, loopback test). Nothing of ingest,
delivery, web, app or cli.
"""
