"""The appliance's SSH client to the deploy agents: shell commands, agent operations, and arming broadcast sessions.

Each agent operation is `rackboot-agent OP` with one JSON request on stdin and one JSON reply on stdout
(broadcast.agent serves them). `ssh_connect` is also how tree exec opens each level (broadcast.texec).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence

import asyncssh

from broadcast.disk import PartitionSpec
from broadcast.errors import AgentError, AgentMissing
from broadcast.image import SinkSpec
from broadcast.loopfd import close_socket
from broadcast.wire import SocketFactory
from domain.aio import within

AGENT_COMMAND = "rackboot-agent"
# POSIX shells exit 127 when the command is not found (XCU 2.8.2): the node runs no agent.
COMMAND_NOT_FOUND = 127
# How a stock installed system is rebooted when it has no agent: systemd queues the reboot and returns (so the
# SSH exchange ends cleanly); a system without systemd has reboot(8).
OS_REBOOT_COMMAND = "systemctl --no-block reboot || reboot"


@dataclass
class CommandResult:
    """The outcome of one command over SSH."""

    status: int | None
    stdout: str
    stderr: str


class AgentClient:
    """The appliance's SSH client to one deploy agent (deploy key; the agent's host key is ephemeral)."""

    def __init__(self, host: str, port: int, client_key: asyncssh.SSHKey | str, *, username: str = "root",
                 connect_timeout: float = 10.0, socket_factory: SocketFactory | None = None) -> None:
        self.host = host
        self.port = port
        self.client_key = asyncssh.read_private_key(client_key) if isinstance(client_key, str) else client_key
        self.username = username
        self.connect_timeout = connect_timeout
        self.socket_factory = socket_factory
        self._conn: asyncssh.SSHClientConnection | None = None

    async def connect(self, connects: asyncio.Semaphore | None = None,
                      handshakes: asyncio.Semaphore | None = None) -> "AgentClient":
        """Open the SSH connection, its TCP connect inside connects and its handshake inside handshakes when given
        (raise OSError / asyncssh.Error / TimeoutError on failure)."""
        self._conn = await ssh_connect(self.host, self.port, self.client_key, username=self.username,
                                       timeout=self.connect_timeout, socket_factory=self.socket_factory,
                                       connects=connects, handshakes=handshakes)
        return self

    async def __aenter__(self) -> "AgentClient":
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the SSH connection."""
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
            self._conn = None

    def abort(self) -> None:
        """Drop the connection at once, without the closing exchange (after a timeout)."""
        if self._conn is not None:
            self._conn.abort()
            self._conn = None

    async def run(self, command: str, timeout: float | None = None, stdin: bytes | None = None) -> CommandResult:
        """Run a shell command on the node."""
        assert self._conn is not None, "connect() first"
        r = await self._conn.run(command, input=stdin, timeout=timeout, encoding=None, check=False)
        out = r.stdout if isinstance(r.stdout, bytes) else (r.stdout or "").encode()
        err = r.stderr if isinstance(r.stderr, bytes) else (r.stderr or "").encode()
        return CommandResult(r.exit_status, out.decode(errors="replace"), err.decode(errors="replace"))

    async def call(self, op: str, timeout: float | None = None, **request: Any) -> dict[str, Any]:
        """Run one agent operation; return its reply; raise AgentError with the agent's message on failure."""
        r = await self.run(f"{AGENT_COMMAND} {op}", timeout=timeout, stdin=json.dumps(request).encode())
        if r.status == COMMAND_NOT_FOUND and not r.stdout:
            raise AgentMissing(f"{op}: no {AGENT_COMMAND} on the node: {r.stderr.strip()[-200:]}")
        try:
            reply = json.loads(r.stdout)
        except ValueError as exc:
            raise AgentError(f"{op}: no JSON reply (exit {r.status}): {r.stderr.strip() or r.stdout[:200]}") from exc
        if r.status != 0 or not isinstance(reply, dict) or "error" in reply:
            raise AgentError(f"{op}: {reply.get('error') if isinstance(reply, dict) else reply}")
        return reply

    async def arm_receive(self, session: str, token: str, sink: SinkSpec) -> int:
        """Arm the node's receiver for a broadcast session; return its data port."""
        return int((await self.call("arm", session=session, token=token, sink=sink.to_json()))["data_port"])

    async def partition(self, parts: Sequence[PartitionSpec], label: str = "gpt", format: bool = True, disk: str = "",
                        whole: bool = False) -> dict[str, Any]:
        """Write the partition table (and filesystems) on the node's disk (disk: the agent's own when empty); with
        whole, write nothing (a whole-disk image follows) and only resolve the disk."""
        return await self.call("partition", parts=[p.__dict__ for p in parts], label=label, format=format,
                               **({"disk": disk} if disk else {}), **({"whole": True} if whole else {}))

    async def wait_receive(self, session: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the node's own result of a broadcast session."""
        return await self.call("wait-receive", session=session, timeout=timeout)

    async def postinstall(self, scripts: Sequence[Mapping[str, Any]], root: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Run post-install scripts on the node."""
        return await self.call("postinstall", scripts=list(scripts), root=root, env=dict(env or {}))

    async def bootloader(self, root: str, partitions: Sequence[Mapping[str, Any]], cmdline: str, label: str = "gpt") -> dict[str, Any]:
        """Mount the installed system's other partitions, write its fstab by UUID and install GRUB (BIOS and/or UEFI)."""
        return await self.call("bootloader", timeout=900, root=root, partitions=list(partitions), cmdline=cmdline, label=label)

    async def kexec(self, kernel: str, initrd: str | None = None, cmdline: str = "", root: str | None = None) -> dict[str, Any]:
        """Load the installed kernel and jump into it."""
        return await self.call("kexec", kernel=kernel, initrd=initrd, cmdline=cmdline, root=root)

    async def reboot(self) -> dict[str, Any]:
        """Reboot the node (soft reboot) through its agent, or through its own init when it runs none (a stock
        installed system reached with the deploy key); the reply comes before the reboot."""
        try:
            return await self.call("reboot", timeout=15)
        except AgentMissing:
            r = await self.run(OS_REBOOT_COMMAND, timeout=15)
            if r.status not in (0, None):  # None: the connection went down with the system
                raise AgentError(f"reboot: `{OS_REBOOT_COMMAND}` exited {r.status}: {r.stderr.strip()[-200:]}") from None
            return {"rebooting": True, "by": "os"}


_NO_BOUND = contextlib.nullcontext()


async def ssh_connect(host: str, port: int, key: asyncssh.SSHKey, *, username: str = "root", timeout: float = 10.0,
                      socket_factory: SocketFactory | None = None, connects: asyncio.Semaphore | None = None,
                      handshakes: asyncio.Semaphore | None = None) -> asyncssh.SSHClientConnection:
    """Open an SSH connection to an agent with a private key (host keys are not checked: deploy environments
    generate theirs at boot; the deploy key authenticates the appliance, the network is the cluster's).

    The TCP connect and the SSH handshake wait for places of their own (connects, handshakes), so a connect that
    fails slowly does not hold a handshake's place: 4000 soft reboots of powered-off nodes each wait about 3 s for
    an ARP answer that never comes, and through the 64 places of the handshakes they took 3 minutes to fail,
    holding their reboot window slots meanwhile. Connects have their own bound: unbounded, 1000 of them to
    powered-off nodes held the appliance's loop 36 s, in `connect()` itself (likely the ARP requests, which the
    vm-testbed's rack bridges flood to their 500 ports on the sender's CPU).
    """
    kwargs: dict[str, Any] = dict(username=username, client_keys=[key], known_hosts=None, agent_path=None,
                                  connect_timeout=timeout, login_timeout=timeout, preferred_auth="publickey", config=None)
    if socket_factory is None and connects is None and handshakes is None:
        return await within(asyncssh.connect(host, port, **kwargs), timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if socket_factory is not None:
        sock = socket_factory((family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port)))
    else:
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setblocking(False)
    try:
        async with connects or _NO_BOUND:
            await within(asyncio.get_running_loop().sock_connect(sock, (host, port)), timeout)
        if handshakes is None:
            return await within(asyncssh.connect(sock=sock, **kwargs), timeout)
        async with handshakes:
            return await within(asyncssh.connect(sock=sock, **kwargs), timeout)
    except BaseException:
        close_socket(sock)
        raise


def ssh_arm(client_key: asyncssh.SSHKey | str, ssh_port: int | Callable[[Any], int],
            sink_for: Callable[[Any], SinkSpec], socket_factory: SocketFactory | None = None) -> Callable[[Any, str, str], Awaitable[None]]:
    """Return an `arm(target, session, token)` for run_broadcast that arms each node over SSH."""
    async def arm(target: Any, session: str, token: str) -> None:
        port = ssh_port(target) if callable(ssh_port) else ssh_port
        async with AgentClient(target.host, port, client_key, socket_factory=socket_factory) as client:
            await client.arm_receive(session, token, sink_for(target))
    return arm


def load_or_create_key(path: Path) -> asyncssh.SSHKey:
    """Read the appliance's deploy key, creating it (ed25519, mode 0600, with .pub beside) on first use."""
    if path.is_file():
        return asyncssh.read_private_key(str(path))
    key = asyncssh.generate_private_key("ssh-ed25519", comment="rackboot-deploy")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    key.write_private_key(str(path))
    key.write_public_key(str(path) + ".pub")
    return key
