"""refloop engine: sources, inbox, router, tracker, timers, dispatch."""
