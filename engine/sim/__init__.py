"""``refloop simulate``: scenarios run through the real engine on a virtual clock.

May import: everything, engine.app included (it drives a real Engine). Nothing imports it
but the CLI.
"""
