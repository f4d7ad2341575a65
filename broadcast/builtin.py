"""Commands an agent may answer in process instead of spawning a shell: a seam for emulators (the vm-testbed).

A `Builtin` is given the command line exactly as the client sent it and returns a `BuiltinAnswer` (exit status and
output) for a command it knows, or None to have the command run through the shell as usual. A real deploy
environment never sets one: every command then runs through the shell.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class BuiltinAnswer:
    """What an in-process command returns: its exit status and its output."""

    status: int
    stdout: bytes = b""
    stderr: bytes = b""


Builtin = Callable[[str], "BuiltinAnswer | None"]
