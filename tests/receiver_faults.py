"""A broadcast Receiver that can fail like a real node: power off (kill) or hang (freeze). Test helper, not a test."""
from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Any

from broadcast.receiver import Receiver
from broadcast.result import NodeResult
from broadcast.relay import Relay


class FaultyReceiver(Receiver):
    """A Receiver whose node can die mid-session (kill) or wedge (freeze), for fault tests."""

    freeze_at_result = False  # wedge once the node has its result, before its report leaves

    def session_result(self, session: str, result: NodeResult) -> None:
        """Take the node's result; wedge right then if asked to (its report is queued, not yet written)."""
        super().session_result(session, result)
        if self.freeze_at_result:
            self.freeze()

    def kill(self) -> None:
        """Die like a powered-off node: the listening socket and every connection reset, nothing reported."""
        self.stop_listening()
        for t in self.tasks():
            t.cancel()
        for relay in self.relays.values():
            for t in relay.tasks():
                t.cancel()
            for lk in relay.links:
                if lk.conn is not None:
                    lk.conn.close(reset=True)
                lk.cancel()
            if relay.upstream is not None:
                relay.upstream.close(reset=True)
            relay.reports.close()
            relay.close_pipes()

    def freeze(self) -> None:
        """Hang like a wedged node: nothing is read or sent any more; the sockets stay open."""
        for t in self.tasks():
            t.cancel()
        for relay in self.relays.values():
            for t in relay.tasks() + [t for lk in relay.links for t in lk.tasks()]:
                t.cancel()
            relay.reports.close()

    def lose_reports(self) -> None:
        """Its reports to the source are lost from now on (the node went on acknowledging, then died)."""
        for relay in self.relays.values():
            relay.reports.close()

    def lose_network(self) -> list[tuple[str, int]]:
        """Lose its address, as the vm-testbed's nodes that hang mid-broadcast do, while its code runs on: it sends
        nothing, hears nothing from its children, and every connect it tries fails for want of a route. Returns the
        list its connect attempts go to."""
        tried: list[tuple[str, int]] = []

        def no_route(addr_info: Any) -> socket.socket:
            tried.append(addr_info[4])
            raise OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))

        self.socket_factory = no_route
        for relay in self.relays.values():
            relay.socket_factory = no_route
            relay.reports.close()
            for t in [relay._acker] + [lk._tasks[0] for lk in relay.links if lk._tasks]:  # its acks, its children's
                if t is not None:
                    t.cancel()
        return tried

    def mute(self, seconds: float) -> None:
        """Stop acknowledging upstream for a while, as a node whose process is held (it goes on receiving)."""
        for relay in self.relays.values():
            if relay._acker is not None:
                relay._acker.cancel()
            relay._acker = asyncio.get_running_loop().create_task(_ack_later(relay, seconds))


async def _ack_later(relay: Relay, seconds: float) -> None:
    """The relay's acknowledger, started after a pause."""
    await asyncio.sleep(seconds)
    await relay._ack_loop()
