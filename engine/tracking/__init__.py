"""Referrals: the pure state machine, correlation and applying events (the tracker), the
escalation policy, the specialist directory, the closure report arithmetic.
"""
