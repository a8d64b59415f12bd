"""Getting messages in: the MLLP listener (frame, MSH, inbox, ACK), the processor that routes
stored messages, FHIR polling and subscriptions, SMART Backend Services auth.
"""
