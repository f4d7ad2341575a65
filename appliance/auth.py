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
        """Delete a user and its rights; AuthError 404 for no such user, 409 for the last admin (nobody could manage users)."""
        row = self._db.execute("SELECT admin FROM users WHERE name=?", (name,)).fetchone()
        if row is None:
            raise AuthError(f"no user {name!r}", 404)
        if row[0] and self._db.execute("SELECT COUNT(*) FROM users WHERE admin=1").fetchone()[0] <= 1:
            raise AuthError(f"{name!r} is the last admin: add another admin first", 409)
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

    def revoke(self, user: str, nodes: str) -> bool:
        """Remove a user's rights on exactly that node set (as granted); return whether there were some."""
        try:
            folded = str(NodeSet(nodes))
        except NodeSetParseError as exc:
            raise AuthError(f"bad node set {nodes!r}: {exc}", 400) from exc
        return self._db.execute("DELETE FROM rights WHERE user=? AND nodes=?", (user, folded)).rowcount > 0

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


@dataclass
class _Grant:
    """A node's token in one deployment: where its first claim may come from, and whether it was used."""

    deployment: str
    ip: str
    token: str | None = None   # None until the node's deploy agent claims it
    redeemed: bool = False      # the installed system's callback used it


class NodeTokens:
    """Per-node tokens of a deployment, bound at first use (as Ironic's agent token): no secret in a boot profile.

    The deploy environment's profile carries no token: its agent's first callback claims one, from the node's
    own address, and gets it in that answer only. The post-install writes it into the installed system over
    SSH, whose callback redeems it once. A token is never served by an unauthenticated answer and never
    travels in node records; a node cannot report for another, nor twice with the same token.
    """

    def __init__(self) -> None:
        self._grants: dict[str, _Grant] = {}  # mac -> grant

    def expect(self, mac: str, deployment: str, ip: str) -> None:
        """A node boots the deploy environment for a deployment: its agent may claim a token, from ip, once."""
        self._grants[mac.lower()] = _Grant(deployment, ip)

    def issue(self, mac: str, deployment: str, ip: str) -> str:
        """Bind a new token to a node now (handed over a private channel, e.g. the post-install over SSH)."""
        token = secrets.token_urlsafe(18)
        self._grants[mac.lower()] = _Grant(deployment, ip, token)
        return token

    def claim(self, mac: str, remote: str) -> tuple[str, str] | None:
        """The first callback of an expected node, from its own address: bind and return (deployment, token)."""
        grant = self._grants.get(mac.lower())
        if grant is None or grant.token is not None or not hmac.compare_digest(grant.ip, remote):
            return None
        grant.token = secrets.token_urlsafe(18)
        return grant.deployment, grant.token

    def check(self, mac: str, token: str | None, remote: str) -> str | None:
        """Return the deployment when token is the node's bound, unused token, presented from the node's address."""
        grant = self._grants.get(mac.lower())
        if (grant is None or grant.token is None or grant.redeemed or not token
                or not hmac.compare_digest(grant.token, token) or not hmac.compare_digest(grant.ip, remote)):
            return None
        return grant.deployment

    def redeem(self, mac: str, token: str | None, remote: str) -> str | None:
        """Like check(), and the token cannot be used again."""
        deployment = self.check(mac, token, remote)
        if deployment is not None:
            self._grants[mac.lower()].redeemed = True
        return deployment

    def rearm(self, mac: str, deployment: str) -> bool:
        """A new boot of the installed system was asked for: its token may be redeemed once more; False if none."""
        grant = self._grants.get(mac.lower())
        if grant is None or grant.deployment != deployment or grant.token is None:
            return False
        grant.redeemed = False
        return True

    def token_of(self, mac: str) -> str | None:
        """Return a node's bound token (for the installed system's stamp), if any."""
        grant = self._grants.get(mac.lower())
        return grant.token if grant is not None else None

    def revoke(self, mac: str, deployment: str | None = None) -> None:
        """Forget a node's token (of that deployment only, when given)."""
        grant = self._grants.get(mac.lower())
        if grant is not None and (deployment is None or grant.deployment == deployment):
            del self._grants[mac.lower()]
