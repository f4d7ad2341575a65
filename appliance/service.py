"""The contract every boot service of the appliance keeps."""
from __future__ import annotations

from typing import Protocol


class Service(Protocol):
    """A network service owned by the Appliance: bind first (fail fast), then serve until cancelled."""

    name: str

    async def start(self) -> None:
        """Bind sockets; raise domain.errors.BindError with a clear message when that fails."""

    async def serve(self) -> None:
        """Serve until cancelled; a malformed packet is dropped and counted, never ends this."""

    async def close(self) -> None:
        """Release sockets and tasks; safe to call twice and after a failed start."""

    def stats(self) -> dict[str, int]:
        """Return counters (received, sent, dropped_malformed, ...)."""
