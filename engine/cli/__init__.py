"""The `refloop` command: one module per command group, shared options and the one
database opener in common.py.
"""
