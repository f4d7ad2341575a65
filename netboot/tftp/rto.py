"""Adaptive retransmission timeout for one TFTP transfer: an RFC 6298 style estimator, pure (no clock, no I/O).

RFC 1350 leaves the timer to the implementation and RFC 7440 sec. 4 asks for one per window; a fixed 1 s
timer makes every lost datagram cost a second on a LAN whose round trip is well under a millisecond.
The estimator follows RFC 6298 sec. 2 (SRTT, RTTVAR, alpha 1/8, beta 1/4, K 4), with Karn's rule (sec. 3:
no sample from a retransmitted window; the caller decides) and a floor and a cap chosen for a boot LAN
instead of RFC 6298's 1 s minimum: the floor keeps scheduling jitter of a loaded server from causing
spurious retransmissions, the cap is the fixed timer the transfer would have used (never slower than it).
"""
from __future__ import annotations

ALPHA = 0.125  # RFC 6298 sec. 2.3
BETA = 0.25
K = 4.0
DEFAULT_FLOOR = 0.02  # seconds: above the jitter of a busy 2-core appliance serving hundreds of transfers


class RtoEstimator:
    """Smoothed RTT and its variation from samples; `rto` is the current retransmission timeout in seconds."""

    __slots__ = ("floor", "cap", "srtt", "rttvar", "rto", "samples")

    def __init__(self, initial: float, floor: float = DEFAULT_FLOOR, cap: float | None = None) -> None:
        self.floor = min(floor, initial)
        self.cap = initial if cap is None else cap
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = initial  # RFC 6298 sec. 2.1: before the first sample (1 s by default, TftpSettings.timeout)
        self.samples = 0

    def sample(self, rtt: float) -> None:
        """Fold one measured round trip (seconds, from a datagram sent once to its ACK) into the estimate."""
        if rtt < 0.0:
            rtt = 0.0
        srtt = self.srtt
        if srtt is None:  # RFC 6298 sec. 2.2
            self.srtt, self.rttvar = srtt, rttvar = rtt, rtt / 2
        else:  # RFC 6298 sec. 2.3: RTTVAR first, from the old SRTT
            self.rttvar = rttvar = (1 - BETA) * self.rttvar + BETA * abs(srtt - rtt)
            self.srtt = srtt = (1 - ALPHA) * srtt + ALPHA * rtt
        self.samples += 1
        rto = srtt + K * rttvar  # once per block in lock-step: the bounds without min() and max() calls
        self.rto = self.floor if rto < self.floor else self.cap if rto > self.cap else rto
