"""The messages between the TFTP service and its data-plane worker processes: pure encoding, no I/O.

They travel one a datagram over a SOCK_SEQPACKET socketpair, as JSON. Service -> worker: `AddTransfer` (sent with
two descriptors by SCM_RIGHTS: the transfer's socket, its TID of RFC 1350 sec. 4, and a memfd holding the file)
and `RemoveTransfer`. Worker -> service: `TransferDone`, the transfer's TransferResult.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, fields
from typing import Union

from domain.errors import MalformedPacket
from netboot.tftp.datapath import TransferResult
from netboot.tftp.session import Outcome, SessionLimits

MAX_MESSAGE = 1 << 16  # an RRQ's options fit in a datagram (RFC 1350 sec. 5), so a message does too
ADD_FDS = 2  # the transfer socket, the file's memfd


@dataclass(frozen=True)
class AddTransfer:
    """Run a transfer: its id in the service, the client's TID, the RRQ's options and the service's limits."""

    transfer_id: int
    client: tuple[str, int]
    options: dict[str, str]
    limits: SessionLimits


@dataclass(frozen=True)
class RemoveTransfer:
    """Stop a transfer without an outcome (superseded, or the service closing)."""

    transfer_id: int


@dataclass(frozen=True)
class TransferDone:
    """A transfer ended in the worker; how."""

    transfer_id: int
    result: TransferResult


Message = Union[AddTransfer, RemoveTransfer, TransferDone]


_RESULT_FIELDS = tuple(f.name for f in fields(TransferResult))


@functools.lru_cache(maxsize=16)
def _limits_body(limits: SessionLimits) -> dict[str, object]:
    # The service's limits are one object for every transfer: converted once, not asdict() a transfer.
    return asdict(limits)


@functools.lru_cache(maxsize=16)
def _limits(items: tuple[tuple[str, object], ...]) -> SessionLimits:
    return SessionLimits(**dict(items))  # type: ignore[arg-type]


def encode(message: Message) -> bytes:
    """One message as a datagram."""
    if isinstance(message, AddTransfer):
        body = {"op": "add", "id": message.transfer_id, "client": list(message.client), "options": message.options,
                "limits": _limits_body(message.limits)}
    elif isinstance(message, RemoveTransfer):
        body = {"op": "remove", "id": message.transfer_id}
    else:
        result = {name: getattr(message.result, name) for name in _RESULT_FIELDS}  # flat: no asdict() deep copy
        result["outcome"] = message.result.outcome.value if message.result.outcome else None
        body = {"op": "done", "id": message.transfer_id, "result": result}
    return json.dumps(body, separators=(",", ":")).encode()


def decode(data: bytes) -> Message:
    """Parse one datagram; raise MalformedPacket when it is not a message of this module."""
    try:
        body = json.loads(data)
        op, transfer_id = body["op"], int(body["id"])
        if op == "add":
            host, port = body["client"]
            return AddTransfer(transfer_id, (str(host), int(port)), {str(k): str(v) for k, v in body["options"].items()},
                               _limits(tuple(body["limits"].items())))
        if op == "remove":
            return RemoveTransfer(transfer_id)
        if op == "done":
            fields = dict(body["result"])
            outcome = fields.pop("outcome")
            return TransferDone(transfer_id, TransferResult(outcome=Outcome(outcome) if outcome else None, **fields))
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedPacket(f"data-plane message: {exc}") from exc
    raise MalformedPacket(f"data-plane message: unknown op {op!r}")
