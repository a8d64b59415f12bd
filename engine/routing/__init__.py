"""routes.yaml compiled into a frozen RouteTable; the pure decide(); Jinja expressions; the
FHIR path subset; replay of stored messages through the current routes.
"""
