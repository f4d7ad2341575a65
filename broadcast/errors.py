"""Errors of the broadcast package (all under domain.errors.RackbootError), and how a failure reads in a report."""
from __future__ import annotations

import asyncio

from domain.errors import RackbootError


class ImageError(RackbootError):
    """An image stream could not be decompressed, written or verified (corrupt, truncated, mismatch, I/O)."""


class ProtocolError(RackbootError):
    """A peer broke the broadcast or tree-exec protocol (bad handshake, unexpected message)."""


class AgentError(RackbootError):
    """A deploy-agent operation failed (partitioning, post-install, kexec, callback)."""


class AgentMissing(AgentError):
    """The node answers SSH but runs no deploy agent (a stock installed system): its shell found no such command."""


def describe_error(exc: BaseException) -> str:
    """Return a short human reason for an exception: "timed out", the OS error text, or the message."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
