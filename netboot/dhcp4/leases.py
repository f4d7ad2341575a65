"""Dynamic DHCPv4 leases: an in-memory pool allocator, durable before an ACK leaves, batched into SQLite.

Addresses are ints internally (cheap to compare and hash). Offers are held in memory only
(RFC 2131 4.3.1: the server SHOULD reserve an offered address). Every change of a bound lease is
appended at once to a journal file (one `write()` of one line, as Kea's memfile appends to its CSV): it
is in the kernel before the ACK is sent, so a crash of the process loses no lease and gives no address
out twice. The `dhcp4_leases` table gets the changes in batches: `take_batch()` hands the changed rows
over and starts a new journal file (the old one is kept as JOURNAL.old), `write_batch()` commits them,
in the service's writer thread with a connection of its own, so that the event loop never waits on
SQLite, and `batch_done()` removes JOURNAL.old once its changes are in the table. At start-up what
JOURNAL.old and JOURNAL hold is replayed onto the table, in that order. A lease costs a dict update and
a write() on the hot path instead of a SQLite transaction. (Like Kea's memfile, the journal is not fsync'ed: a power cut may
lose the last leases; a process crash does not.)
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sqlite3
import struct
from collections import deque
from pathlib import Path
from typing import Iterable

log = logging.getLogger("rackboot.dhcp")

OFFER_HOLD_S = 60.0      # how long an offered address stays reserved for the client it was offered to
DECLINE_HOLD_S = 600.0   # RFC 2131 4.3.3: a declined address is marked unavailable for a while

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dhcp4_leases (
    mac TEXT PRIMARY KEY,
    ip TEXT NOT NULL UNIQUE,
    expires REAL NOT NULL,
    hostname TEXT NOT NULL DEFAULT ''
)
"""


def ip_to_int(packed: bytes) -> int:
    """Return a packed IPv4 address as an int."""
    return struct.unpack("!I", packed)[0]


def int_to_ip(value: int) -> bytes:
    """Return an int IPv4 address packed in 4 bytes."""
    return value.to_bytes(4, "big")


class Lease:
    """One bound lease: client MAC, address (int), absolute expiry (epoch seconds), host name."""

    __slots__ = ("mac", "ip", "expires", "hostname")

    def __init__(self, mac: str, ip: int, expires: float, hostname: str = "") -> None:
        self.mac = mac
        self.ip = ip
        self.expires = expires
        self.hostname = hostname

    def __repr__(self) -> str:
        return f"Lease({self.mac} {socket.inet_ntoa(int_to_ip(self.ip))} expires={self.expires:.0f})"


class LeaseTable:
    """The dynamic pool: who holds which address, offers in flight, declined addresses; persisted lazily."""

    def __init__(self, db: sqlite3.Connection | None,
                 pool: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None,
                 reserved: Iterable[ipaddress.IPv4Address] = (), journal: Path | None = None) -> None:
        self._db = db
        self._journal_path = journal
        self._journal: int | None = None  # file descriptor, O_APPEND
        self.first = int(pool[0]) if pool else 0
        self.last = int(pool[1]) if pool else -1
        self._reserved = {int(a) for a in reserved}
        self._leases: dict[str, Lease] = {}
        self._lease_ip: dict[int, str] = {}
        self._offers: dict[str, tuple[int, float]] = {}
        self._offer_ip: dict[int, str] = {}
        self._declined: dict[int, float] = {}
        self._cursor = self.first          # next never-handed-out address of the pool
        self._recycled: deque[int] = deque()  # addresses freed by reclaim, handed out before scanning again
        self._dirty: dict[str, Lease | None] = {}
        self._next_reclaim = 0.0          # an exhausted pool is rescanned at most once a second
        if db is not None:
            db.execute(_SCHEMA)
            self._load()
        if journal is not None:
            self._replay(_old(journal))
            self._replay(journal)
            self._journal = _open_journal(journal)
            if self._dirty and db is not None:
                self.flush()  # what the journals held is in the table now; the journal starts empty

    def _replay(self, journal: Path) -> None:
        """Apply the lease changes a crash left in the journal (lines 'mac ip expires hostname', or 'mac -')."""
        try:
            text = journal.read_text(errors="replace")
        except FileNotFoundError:
            return
        replayed = 0
        for line in text.splitlines():
            fields = line.split(" ", 3)
            try:
                if len(fields) == 2 and fields[1] == "-":
                    self._drop(fields[0])
                elif len(fields) >= 3:
                    value = int(ipaddress.IPv4Address(fields[1]))
                    self._drop(fields[0])
                    self._drop(self._lease_ip.get(value, ""))
                    lease = Lease(fields[0], value, float(fields[2]), fields[3] if len(fields) > 3 else "")
                    self._leases[lease.mac] = lease
                    self._lease_ip[value] = lease.mac
                    self._dirty[lease.mac] = lease
                else:
                    continue
            except ValueError:
                continue  # a line cut by the crash
            replayed += 1
        if replayed:
            log.info("dhcp: %d lease changes replayed from %s", replayed, journal)

    def _drop(self, mac: str) -> None:
        lease = self._leases.pop(mac, None)
        if lease is not None:
            self._lease_ip.pop(lease.ip, None)
            self._dirty[mac] = None

    def _changed(self, mac: str, lease: Lease | None) -> None:
        """Record one lease change: journal line now (before the reply leaves), table row at the next flush."""
        self._dirty[mac] = lease
        if self._journal is not None:
            if lease is None:
                line = f"{mac} -\n"
            else:
                hostname = lease.hostname.replace("\n", " ")
                line = f"{mac} {socket.inet_ntoa(int_to_ip(lease.ip))} {lease.expires!r} {hostname}\n"
            os.write(self._journal, line.encode())

    def close(self) -> None:
        """Close the journal (after a last flush by the caller)."""
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None

    @property
    def has_pool(self) -> bool:
        """True when a dynamic pool is configured."""
        return self.last >= self.first

    @property
    def dirty(self) -> int:
        """How many lease rows wait to be written."""
        return len(self._dirty)

    def __len__(self) -> int:
        return len(self._leases)

    @property
    def offers_pending(self) -> int:
        """How many offers are held (each for its own address, so never more than the pool's size)."""
        return len(self._offers)

    def _load(self) -> None:
        assert self._db is not None
        for mac, ip, expires, hostname in self._db.execute("SELECT mac, ip, expires, hostname FROM dhcp4_leases"):
            try:
                value = int(ipaddress.IPv4Address(ip))
            except ValueError:
                continue
            lease = Lease(mac, value, float(expires), hostname)
            self._leases[mac] = lease
            self._lease_ip[value] = mac

    def set_reserved(self, reserved: Iterable[ipaddress.IPv4Address]) -> None:
        """Addresses never handed out from the pool from now on (a reload); leases held already are kept."""
        self._reserved = {int(a) for a in reserved}

    def in_pool(self, ip: int) -> bool:
        """True when ip lies in the pool and is not reserved (inventory, appliance)."""
        return self.first <= ip <= self.last and ip not in self._reserved

    def lease_for(self, mac: str) -> Lease | None:
        """Return the bound lease of a MAC (maybe expired), or None."""
        return self._leases.get(mac)

    def mac_for_ip(self, ip: int) -> str | None:
        """Return the MAC bound to an address (expired leases count until the address is reused)."""
        return self._lease_ip.get(ip)

    def available(self, ip: int, mac: str, now: float) -> bool:
        """True when mac may take ip now: in the pool, not declined, not held by another client."""
        if not self.in_pool(ip):
            return False
        until = self._declined.get(ip)
        if until is not None:
            if until > now:
                return False
            del self._declined[ip]
        owner = self._lease_ip.get(ip)
        if owner is not None and owner != mac and self._leases[owner].expires > now:
            return False
        holder = self._offer_ip.get(ip)
        if holder is not None and holder != mac and self._offers[holder][1] > now:
            return False
        return True

    def _evict_others(self, ip: int, mac: str) -> None:
        """Drop another client's stale lease or offer on ip (the caller checked it is stale)."""
        owner = self._lease_ip.get(ip)
        if owner is not None and owner != mac:
            del self._leases[owner]
            del self._lease_ip[ip]
            self._changed(owner, None)
        holder = self._offer_ip.get(ip)
        if holder is not None and holder != mac:
            del self._offers[holder]
            del self._offer_ip[ip]

    def offer(self, mac: str, requested: int | None, now: float, hold: float = OFFER_HOLD_S) -> int | None:
        """Pick and hold an address for mac: its current offer or lease, the requested one, or a free one."""
        candidates = []
        current = self._offers.get(mac)
        if current is not None:
            candidates.append(current[0])
        lease = self._leases.get(mac)
        if lease is not None:
            candidates.append(lease.ip)
        if requested is not None:
            candidates.append(requested)
        for ip in candidates:
            if self.available(ip, mac, now):
                break
        else:
            ip = self._allocate(mac, now)
            if ip is None:
                return None
        self._evict_others(ip, mac)
        if current is not None and current[0] != ip:
            self._offer_ip.pop(current[0], None)
        self._offers[mac] = (ip, now + hold)
        self._offer_ip[ip] = mac
        return ip

    def forget_offer(self, mac: str) -> None:
        """Drop the offer held for mac (it chose another server, RFC 2131 4.3.2)."""
        current = self._offers.pop(mac, None)
        if current is not None and self._offer_ip.get(current[0]) == mac:
            del self._offer_ip[current[0]]

    def _allocate(self, mac: str, now: float) -> int | None:
        """Return a free pool address: never-used ones first, then reclaimed ones."""
        while self._cursor <= self.last:
            ip = self._cursor
            self._cursor += 1
            if ip not in self._lease_ip and ip not in self._offer_ip and self.available(ip, mac, now):
                return ip
        for attempt in range(2):
            while self._recycled:
                ip = self._recycled.popleft()
                if self.available(ip, mac, now):
                    return ip
            if attempt == 0 and not self._reclaim(now):
                break
        return None

    def _reclaim(self, now: float) -> int:
        """Queue every address whose lease or offer has expired for reuse; return how many."""
        if now < self._next_reclaim:
            return 0
        self._next_reclaim = now + 1.0
        freed = [lease.ip for lease in self._leases.values() if lease.expires <= now]
        freed += [ip for ip, until in self._offers.values() if until <= now]
        freed += [ip for ip, until in self._declined.items() if until <= now]
        self._recycled.extend(sorted(set(freed)))
        if freed:
            log.info("dhcp pool: reclaimed %d expired addresses", len(set(freed)))
        return len(freed)

    def bind(self, mac: str, ip: int, now: float, lease_time: int, hostname: str = "") -> bool:
        """Bind ip to mac for lease_time seconds if it is available to mac; return whether it was."""
        if not self.available(ip, mac, now):
            return False
        self._evict_others(ip, mac)
        current = self._offers.pop(mac, None)
        if current is not None and self._offer_ip.get(current[0]) == mac:
            del self._offer_ip[current[0]]
        lease = self._leases.get(mac)
        if lease is None:
            lease = self._leases[mac] = Lease(mac, ip, now + lease_time, hostname)
        else:
            if lease.ip != ip:
                self._lease_ip.pop(lease.ip, None)
                self._recycled.append(lease.ip)
                lease.ip = ip
            lease.expires = now + lease_time
            lease.hostname = hostname
        self._lease_ip[ip] = mac
        self._changed(mac, lease)
        return True

    def release(self, mac: str, ip: int, now: float) -> bool:
        """End mac's lease on ip now (RFC 2131 4.3.4); the address stays associated for a later return."""
        lease = self._leases.get(mac)
        if lease is None or lease.ip != ip:
            return False
        lease.expires = min(lease.expires, now)
        self._changed(mac, lease)
        return True

    def decline(self, mac: str, ip: int, now: float, hold: float = DECLINE_HOLD_S) -> bool:
        """Mark ip unusable for a while because mac found it in use (RFC 2131 4.3.3); drop mac's hold on it.

        Only the client the address was offered or leased to can decline it: a DECLINE from anyone else, for
        any address, is refused (False), or one host could empty the pool and take leases from others.
        """
        lease = self._leases.get(mac)
        offered = self._offers.get(mac)
        holds_lease = lease is not None and lease.ip == ip
        if not holds_lease and not (offered is not None and offered[0] == ip):
            return False
        if self.in_pool(ip):
            self._declined[ip] = now + hold
        if holds_lease:
            del self._leases[mac]
            self._lease_ip.pop(ip, None)
            self._changed(mac, None)
        if offered is not None and offered[0] == ip:
            self.forget_offer(mac)
        return True

    def take_batch(self) -> LeaseBatch | None:
        """Hand every changed row over for writing (the next changes start a new batch and a new journal file);
        None when nothing changed."""
        if not self._dirty or self._db is None:
            self._dirty.clear()
            return None
        dirty, self._dirty = self._dirty, {}
        rotated = False
        if self._journal is not None and self._journal_path is not None and not _old(self._journal_path).exists():
            # JOURNAL.old holds exactly this batch's changes until it is committed. When it still exists (a batch
            # failed), the changes stay in JOURNAL too until a batch taken later commits them all.
            os.rename(self._journal_path, _old(self._journal_path))
            os.close(self._journal)
            self._journal = _open_journal(self._journal_path)
            rotated = True
        return LeaseBatch(dirty, rotated)

    def batch_done(self, batch: LeaseBatch, error: BaseException | None) -> None:
        """After write_batch: drop the batch's journal file, or (it failed) take its rows back for the next batch."""
        if error is not None:
            for mac, lease in batch.dirty.items():
                self._dirty.setdefault(mac, lease)
            return
        if self._journal_path is not None:
            # Committed: so is every change made before the batch was taken, JOURNAL.old's whether this batch made
            # it or an earlier batch failed and this one took its rows back.
            _old(self._journal_path).unlink(missing_ok=True)

    def flush(self) -> int:
        """Write every changed lease row now, on this thread, with the table's connection; return how many rows."""
        batch = self.take_batch()
        if batch is None:
            return 0
        try:
            write_batch(self._db, batch)  # type: ignore[arg-type]  # take_batch returns None without a database
        except sqlite3.Error as exc:
            self.batch_done(batch, exc)
            raise
        self.batch_done(batch, None)
        if self._journal is not None and not self._dirty:
            os.ftruncate(self._journal, 0)  # nothing can have changed meanwhile: all of it is in the table now
        return len(batch.dirty)


class LeaseBatch:
    """Changed lease rows on their way to the table (None: the MAC's lease is gone), and whether the journal was
    started anew for them."""

    __slots__ = ("dirty", "rotated")

    def __init__(self, dirty: dict[str, Lease | None], rotated: bool) -> None:
        self.dirty = dirty
        self.rotated = rotated


def write_batch(db: sqlite3.Connection, batch: LeaseBatch) -> None:
    """Commit a batch in one transaction (on any thread, with a connection used by that thread only)."""
    gone = [(mac,) for mac, lease in batch.dirty.items() if lease is None]
    rows = [(lease.mac, socket.inet_ntoa(int_to_ip(lease.ip)), lease.expires, lease.hostname)
            for lease in batch.dirty.values() if lease is not None]
    try:
        db.execute("BEGIN")
        if gone:
            db.executemany("DELETE FROM dhcp4_leases WHERE mac = ?", gone)
        # OR REPLACE also drops another MAC's old row on the same address (the UNIQUE ip column).
        db.executemany("INSERT OR REPLACE INTO dhcp4_leases (mac, ip, expires, hostname) VALUES (?, ?, ?, ?)", rows)
        db.execute("COMMIT")
    except sqlite3.Error:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _old(journal: Path) -> Path:
    """The journal file of the batch being written."""
    return journal.with_name(journal.name + ".old")


def _open_journal(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
