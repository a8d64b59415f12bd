"""e-fax (Phaxio): the adapter and status rules (``phaxio``), its signed callback
(``webhook``).

May import: engine.model, engine.errors and the other channels modules only.
"""
