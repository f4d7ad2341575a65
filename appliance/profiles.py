"""Per-MAC boot profiles: what a node boots next (deploy kernel, local disk, an installed kernel, nothing)."""
from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field

PROFILE_KINDS = ("none", "local", "deploy", "kernel", "discovery")


@dataclass(frozen=True)
class BootProfile:
    """What the per-MAC iPXE script makes a node do.

    kernel/initrds are URLs or paths under the HTTP files root; cmdline is passed to the kernel.
    """

    kind: str = "none"
    kernel: str = ""
    initrds: tuple[str, ...] = ()
    cmdline: str = ""
    env: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in PROFILE_KINDS:
            raise ValueError(f"unknown boot profile kind {self.kind!r}")
        if self.kind in ("deploy", "kernel", "discovery") and not self.kernel:
            raise ValueError(f"a {self.kind!r} profile needs a kernel")

    def to_json(self) -> dict[str, object]:
        """Return a JSON-ready dict."""
        d = asdict(self)
        d["initrds"] = list(self.initrds)
        return d

    @classmethod
    def from_json(cls, data: dict[str, object]) -> "BootProfile":
        """Build a profile from its JSON form; raise ValueError on bad input."""
        return cls(
            kind=str(data.get("kind", "none")),
            kernel=str(data.get("kernel", "")),
            initrds=tuple(str(x) for x in data.get("initrds", []) or []),  # type: ignore[union-attr]
            cmdline=str(data.get("cmdline", "")),
            env=str(data.get("env", "")),
            params={str(k): str(v) for k, v in (data.get("params") or {}).items()},  # type: ignore[union-attr]
        )


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

    def all(self) -> dict[str, BootProfile]:
        """Return every explicitly set profile."""
        return dict(self._cache)
