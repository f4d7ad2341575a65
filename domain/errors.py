"""One error hierarchy for rackboot: every package raises these (the bottom of the import graph)."""
from __future__ import annotations


class RackbootError(Exception):
    """Base class of every error rackboot raises on purpose."""


class ConfigError(RackbootError):
    """The configuration or the inventory is invalid; carries every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class BindError(RackbootError):
    """A service could not bind its socket (port taken, interface missing, no permission)."""


class MalformedPacket(RackbootError):
    """A codec met bytes it cannot decode; the transport drops and counts the packet."""
