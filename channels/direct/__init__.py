"""Direct secure messaging: outbound SMTP + S/MIME, inbound classification, a DER reader."""
