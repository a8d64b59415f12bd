"""engine.delivery.factory builds channels from a registry: one builder per channel type
routes.yaml accepts, so a type the compiler takes is never silently left unbuilt."""

from __future__ import annotations

from engine.delivery.factory import BUILDERS
from engine.routing.channels import CHANNEL_TYPES


def test_every_channel_type_routes_yaml_accepts_has_a_builder() -> None:
    assert set(BUILDERS) == set(CHANNEL_TYPES)


def test_the_mllp_channel_lives_with_the_channels() -> None:
    """channels/ holds every outbound adapter (issue 16); the factory only wires it."""
    from channels.mllp import MllpChannel

    assert BUILDERS["mllp"].__module__ == "engine.delivery.factory"
    assert MllpChannel.__module__ == "channels.mllp"
