"""Errors of the broadcast package (all under domain.errors.RackbootError)."""
from __future__ import annotations

from domain.errors import RackbootError


class ImageError(RackbootError):
    """An image stream could not be decompressed, written or verified (corrupt, truncated, mismatch, I/O)."""


class ProtocolError(RackbootError):
    """A peer broke the broadcast or tree-exec protocol (bad handshake, unexpected message)."""


class AgentError(RackbootError):
    """A deploy-agent operation failed (partitioning, post-install, kexec, callback)."""
