"""SMS by Twilio: the adapter and webhook helpers (``twilio``), the PHI-free templates
(``templates``).

May import: engine.model, engine.errors and the other channels modules only.
"""
