"""refloop outbound channel adapters (thin; no database access)."""
