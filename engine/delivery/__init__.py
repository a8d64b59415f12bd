"""Getting messages out: the outbox dispatcher and renderer, the channel factory, the
specialist packet, inbound Direct results, provider webhooks.
"""
