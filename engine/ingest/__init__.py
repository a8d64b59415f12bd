"""Getting messages in: the MLLP listener (frame, MSH, inbox, ACK), the processor that
hands stored messages to the routes, FHIR polling and subscriptions, SMART Backend
Services auth.

May import: the shared top-level modules, engine.hl7v2, engine.store, engine.routing,
engine.tracking, engine.timers.wheel and channels. Not web, app or cli.
"""
