"""Per-MAC boot profiles, cached in memory and persisted in the state database."""
from __future__ import annotations

import json
import sqlite3

from domain.profiles import BootProfile


class ProfileStore:
    """Boot profiles by MAC, cached in memory and persisted in the state database."""

    def __init__(self, db: sqlite3.Connection, default: BootProfile) -> None:
        self._db = db
        self.default = default
        db.execute("CREATE TABLE IF NOT EXISTS boot_profiles (mac TEXT PRIMARY KEY, profile TEXT NOT NULL)")
        self._cache: dict[str, BootProfile] = {
            mac: BootProfile.from_json(json.loads(text)) for mac, text in db.execute("SELECT mac, profile FROM boot_profiles")
        }

    def get(self, mac: str) -> BootProfile:
        """Return the profile of a MAC, or the default."""
        return self._cache.get(mac.lower(), self.default)

    def set(self, macs: list[str] | str, profile: BootProfile) -> None:
        """Switch one or many MACs to a profile, persistently."""
        macs = [macs] if isinstance(macs, str) else macs
        text = json.dumps(profile.to_json())
        with self._db:
            self._db.executemany(
                "INSERT INTO boot_profiles (mac, profile) VALUES (?, ?) ON CONFLICT(mac) DO UPDATE SET profile=excluded.profile",
                [(m.lower(), text) for m in macs],
            )
        for m in macs:
            self._cache[m.lower()] = profile

    def explicit(self, mac: str) -> BootProfile | None:
        """Return the profile set for a MAC, or None when it has none (no default)."""
        return self._cache.get(mac.lower())

    def all(self) -> dict[str, BootProfile]:
        """Return every explicitly set profile."""
        return dict(self._cache)
