"""Running the node's own tools (sfdisk, mkfs, blkid, grub-install, mount) from the agent's event loop."""
from __future__ import annotations

import asyncio
from typing import Sequence

from broadcast.errors import AgentError
from domain.aio import within


async def run_tool(argv: Sequence[str], stdin: bytes | None = None, timeout: float = 120.0) -> str:
    """Run a tool; return its stdout. Raise AgentError naming the command with the end of its output when it
    fails, or when it runs past timeout (then it is killed)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await within(proc.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AgentError(f"{argv[0]} timed out after {timeout:g} s") from None
    if proc.returncode != 0:
        text = (err or out).decode(errors="replace").strip()
        raise AgentError(f"{' '.join(argv)} failed ({proc.returncode}): {text[-1500:]}")
    return out.decode(errors="replace")
