"""The fields a log record about a node carries (`extra=fields(...)`), which the journal gets as NODE=, MAC=, ...

Plain attributes of the LogRecord: the text log ignores them, the systemd journal handler
(appliance/logs.py) sends each as a field of its own, so `journalctl MAC=52:54:00:77:00:01` finds a node's lines.
"""
from __future__ import annotations

# LogRecord attribute -> journal field name (systemd.journal-fields(7): upper case, digits, underscores).
JOURNAL_FIELDS = {"node": "NODE", "mac": "MAC", "deployment": "DEPLOYMENT", "step": "STEP"}


def fields(*, node: str | None = None, mac: str | None = None, deployment: str | None = None,
           step: str | None = None) -> dict[str, str]:
    """The `extra=` mapping of a log call about a node (only the fields given, and not empty)."""
    given = {"node": node, "mac": mac, "deployment": deployment, "step": step}
    return {key: value for key, value in given.items() if value}
