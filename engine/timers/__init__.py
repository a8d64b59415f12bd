"""The hierarchical timer wheel (pure, in memory) and the timer service that fires
escalation timers in durable transactions.
"""
