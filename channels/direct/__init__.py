"""Direct secure messaging: outbound SMTP + S/MIME (``send``, ``smime``), inbound
classification, the aiosmtpd handler and the IMAP poller (``inbound``), a DER reader.

May import: engine.model, engine.errors and the other channels modules only.
"""
