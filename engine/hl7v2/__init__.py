"""HL7 v2 on the wire: MLLP framing (bytes only), the lazy message reader, ACKs, the MLLP
client.

May import: the shared top-level modules (engine.model, errors, config, clock) only.
The only package that may read messages with python-hl7 (today none does).
"""
