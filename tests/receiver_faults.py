"""A broadcast Receiver that can fail like a real node: power off (kill) or hang (freeze). Test helper, not a test."""
from __future__ import annotations

from broadcast.receiver import Receiver


class FaultyReceiver(Receiver):
    """A Receiver whose node can die mid-session (kill) or wedge (freeze), for fault tests."""

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
