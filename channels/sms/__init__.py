"""SMS by Twilio: the adapter, webhook helpers and the PHI-free templates."""
