"""The appliance's persistent state: one SQLite file in state_dir (leases, boot profiles, later deployments)."""
from __future__ import annotations

import sqlite3
from pathlib import Path


def open_state_db(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the state database in WAL mode; the caller's tables create themselves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn
