"""HL7 v2 on the wire: MLLP framing (bytes only), the lazy message reader, ACKs, the MLLP client.

Imports only engine.model, engine.errors and engine.config; the only user of python-hl7.
"""
