"""One entry point for the controller: broadcast an image by method name, and fall back between methods.

    result = await run_broadcast(BroadcastJob(image=..., url=..., sha256=...), targets, method="chain", arm=arm)
    result = await broadcast_with_fallback(job, targets, methods=("chain", "star"), arm=arm)

`arm(target, session, token)` is how the caller tells a node to expect a session (the controller does it
over SSH through the deploy agent: `AgentClient.arm_receive`); nodes whose arming fails are reported
failed and left out of the topology. Every attempt uses a fresh session, so a fallback never mixes with
the stream of a failed attempt.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Sequence

from broadcast.errors import describe_error
from broadcast.params import ChainParams
from broadcast.result import SOURCE_NAME, BroadcastResult, NodeResult
from broadcast.source import Source, new_session
from broadcast.star import star_broadcast
from broadcast.topology import Target, forest_for
from broadcast.wire import ListenFactory, SocketFactory

METHODS = ("chain", "tree", "star")
ArmFn = Callable[[Target, str, str], Awaitable[None]]


@dataclass(frozen=True)
class BroadcastJob:
    """The image to send and how."""

    image: Path  # the compressed image file as published (chain and tree read it with sendfile)
    sha256: str | None  # the catalog's checksum of that file
    url: str | None = None  # where nodes download it (star)
    fanout: int = 2  # tree
    concurrency: int = 32  # star: downloads at once
    params: ChainParams = ChainParams()
    report_host: str = "127.0.0.1"  # the appliance address nodes report to (chain, tree)
    deadline: float | None = None  # seconds for the whole attempt
    socket_factory: SocketFactory | None = None
    listen_factory: ListenFactory | None = None


async def run_broadcast(job: BroadcastJob, targets: Sequence[Target], method: str = "chain",
                        arm: ArmFn | None = None, arm_concurrency: int = 64) -> BroadcastResult:
    """Broadcast job.image to targets with 'chain', 'tree' or 'star'; every target gets a NodeResult."""
    if method not in METHODS:
        raise ValueError(f"unknown broadcast method {method!r} (expected one of {', '.join(METHODS)})")
    session, token = new_session()
    failed: dict[str, NodeResult] = {}
    ready = list(targets)
    arming = time.monotonic()
    if arm is not None:
        sem = asyncio.Semaphore(arm_concurrency)

        async def arm_one(t: Target) -> str | None:
            async with sem:
                try:
                    await arm(t, session, token)
                    return None
                except Exception as exc:  # any failure to arm a node is that node's failure
                    return describe_error(exc)

        errors = await asyncio.gather(*(arm_one(t) for t in targets))
        ready = [t for t, e in zip(targets, errors) if e is None]
        failed = {t.name: NodeResult(name=t.name, reason=f"arm failed: {e}", reported_by=SOURCE_NAME)
                  for t, e in zip(targets, errors) if e is not None}
    arm_seconds = time.monotonic() - arming
    if method == "star":
        if not job.url:
            raise ValueError("star needs job.url")
        result = await star_broadcast(job.url, ready, session=session, token=token, size=job.image.stat().st_size,
                                      sha256=job.sha256, concurrency=job.concurrency, params=job.params,
                                      deadline=job.deadline, socket_factory=job.socket_factory)
    elif ready:
        source = Source(job.image, forest_for(method, ready, job.fanout), session=session, token=token, sha256=job.sha256,
                        params=job.params, report_host=job.report_host, method=method,
                        socket_factory=job.socket_factory, listen_factory=job.listen_factory)
        result = await source.run(job.deadline)
    else:
        result = BroadcastResult(method=method, size=job.image.stat().st_size, sha256=job.sha256, nodes={})
    result.nodes.update(failed)
    result.arm_seconds = arm_seconds
    return result


async def broadcast_with_fallback(job: BroadcastJob, targets: Sequence[Target], methods: Sequence[str] = ("chain", "star"),
                                  arm: ArmFn | None = None) -> BroadcastResult:
    """Try each method in turn for the nodes the previous one failed; return the merged result."""
    result: BroadcastResult | None = None
    todo = list(targets)
    for method in methods:
        if not todo:
            break
        attempt = await run_broadcast(job, todo, method, arm)
        result = attempt if result is None else result.merge(attempt)
        todo = [t for t in todo if not attempt.nodes[t.name].ok]
    assert result is not None or not targets
    return result or BroadcastResult(method="+".join(methods), size=0, sha256=job.sha256, nodes={})
