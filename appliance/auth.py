"""Users, API tokens and rights of users on node sets; per-deployment, per-node one-time tokens for nodes."""
from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ClusterShell.NodeSet import NodeSet, NodeSetParseError

from domain.errors import RackbootError

PERMS = ("deploy", "reboot", "power", "console")


class AuthError(RackbootError):
    """Unknown token (401) or a right the user does not have (403)."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class User:
    """An API user."""

    name: str
    admin: bool = False


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    """Users (tokens stored hashed) and their rights, in the state database."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        db.execute("CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, token_sha256 TEXT UNIQUE, admin INTEGER)")
        db.execute("CREATE TABLE IF NOT EXISTS rights (user TEXT, nodes TEXT, perms TEXT, PRIMARY KEY (user, nodes))")

    def add(self, name: str, admin: bool = False) -> str:
        """Create a user; return its new API token (shown once, stored hashed)."""
        token = secrets.token_urlsafe(24)
        try:
            self._db.execute("INSERT INTO users VALUES (?, ?, ?)", (name, _digest(token), int(admin)))
        except sqlite3.IntegrityError as exc:
            raise AuthError(f"user {name!r} exists", 409) from exc
        return token

    def ensure_admin(self, token_file: Path) -> None:
        """Make sure an 'admin' user exists; write its token to token_file (mode 0600) when created."""
        if self._db.execute("SELECT 1 FROM users WHERE name='admin'").fetchone():
            return
        token = self.add("admin", admin=True)
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.touch(mode=0o600)
        token_file.write_text(token + "\n")

    def authenticate(self, token: str | None) -> User:
        """Return the user of an API token; AuthError(401) when unknown."""
        if not token:
            raise AuthError("an API token is required (Authorization: Bearer TOKEN)", 401)
        row = self._db.execute("SELECT name, admin FROM users WHERE token_sha256=?", (_digest(token),)).fetchone()
        if row is None:
            raise AuthError("unknown API token", 401)
        return User(row[0], bool(row[1]))

    def list(self) -> list[dict[str, object]]:
        """Return users with their rights."""
        out = []
        for name, admin in self._db.execute("SELECT name, admin FROM users ORDER BY name"):
            rights = [{"nodes": n, "perms": p.split(",")} for n, p in self._db.execute("SELECT nodes, perms FROM rights WHERE user=?", (name,))]
            out.append({"name": name, "admin": bool(admin), "rights": rights})
        return out

    def remove(self, name: str) -> None:
        """Delete a user and its rights."""
        self._db.execute("DELETE FROM users WHERE name=?", (name,))
        self._db.execute("DELETE FROM rights WHERE user=?", (name,))

    def grant(self, user: str, nodes: str, perms: list[str]) -> None:
        """Give a user rights on a node set."""
        bad = [p for p in perms if p not in PERMS]
        if bad:
            raise AuthError(f"unknown rights {bad} (expected {', '.join(PERMS)})", 400)
        try:
            folded = str(NodeSet(nodes))
        except NodeSetParseError as exc:
            raise AuthError(f"bad node set {nodes!r}: {exc}", 400) from exc
        if not self._db.execute("SELECT 1 FROM users WHERE name=?", (user,)).fetchone():
            raise AuthError(f"no user {user!r}", 404)
        self._db.execute("INSERT INTO rights VALUES (?, ?, ?) ON CONFLICT(user, nodes) DO UPDATE SET perms=excluded.perms",
                         (user, folded, ",".join(perms)))

    def revoke(self, user: str, nodes: str) -> None:
        """Remove a user's rights on exactly that node set."""
        self._db.execute("DELETE FROM rights WHERE user=? AND nodes=?", (user, str(NodeSet(nodes))))

    def may_add_environments(self, user: User) -> bool:
        """Admins, and users with the 'deploy' right on some nodes, may add environments to the catalog."""
        if user.admin:
            return True
        return any("deploy" in perms.split(",") for (perms,) in
                   self._db.execute("SELECT perms FROM rights WHERE user=?", (user.name,)))

    def check(self, user: User, perm: str, nodes: list[str]) -> None:
        """Raise AuthError(403) naming the nodes the user may not `perm`; admins may everything."""
        if user.admin:
            return
        allowed = NodeSet()
        for ns, perms in self._db.execute("SELECT nodes, perms FROM rights WHERE user=?", (user.name,)):
            if perm in perms.split(","):
                allowed.update(ns)
        denied = [n for n in nodes if n not in allowed]
        if denied:
            raise AuthError(f"{user.name} has no '{perm}' right on {NodeSet.fromlist(denied)}", 403)


class NodeTokens:
    """One-time tokens a deployment hands each node (in its boot cmdline); a node cannot report for another."""

    def __init__(self) -> None:
        self._by_mac: dict[str, tuple[str, str]] = {}  # mac -> (token, deployment id)

    def issue(self, mac: str, deployment: str) -> str:
        """Create the token of a node in a deployment (replacing any earlier one)."""
        token = secrets.token_urlsafe(18)
        self._by_mac[mac.lower()] = (token, deployment)
        return token

    def check(self, mac: str, token: str | None) -> str | None:
        """Return the deployment id when the token is the node's current one, else None."""
        entry = self._by_mac.get(mac.lower())
        if entry is None or token is None or not hmac.compare_digest(entry[0], token):
            return None
        return entry[1]

    def token_of(self, mac: str) -> str | None:
        """Return the current token of a node, if any."""
        entry = self._by_mac.get(mac.lower())
        return entry[0] if entry else None

    def revoke(self, mac: str, deployment: str | None = None) -> None:
        """Forget a node's token (of that deployment only, when given)."""
        entry = self._by_mac.get(mac.lower())
        if entry is not None and (deployment is None or entry[1] == deployment):
            del self._by_mac[mac.lower()]
