"""The deploy agent: what runs in each node's deploy environment, and the client the appliance drives it with.

A `DeployAgent` owns, for one node, an SSH server (asyncssh; only the keys in `authorized_keys`, i.e. the
appliance's deploy key, are accepted) and a broadcast `Receiver`, both bound to the node's address. When
it is up it calls back to the appliance: `POST` to the callback URL its kernel command line names
(`rackboot.callback=`, rendered by ipxe.script as BASE/callback/MAC), JSON {token, stage: agent_up, status,
name, ip, ssh_port, data_port}.
Over SSH it runs arbitrary shell commands (so pdsh and clush work against it; an emulator may pass a `builtin` that
answers some commands in process, see broadcast.builtin) and a small set of agent
operations, each `rackboot-agent OP` with one JSON request on stdin and one JSON reply on stdout
(exit status 0 when ok):

    status | partition | arm | wait-receive | verify | postinstall | bootloader | mount-root | kexec | reboot
    | texec (JSON lines, see texec.py)

Nothing is global: the vm-testbed runs many agents in one process, each with its own config, sockets
(opened inside the node's namespace through listen_factory / socket_factory), disk file and work dir.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import aiohttp
import asyncssh

from domain.errors import BindError
from domain.aio import within
from broadcast.agent_client import AGENT_COMMAND
from broadcast import bootloader
from broadcast.builtin import Builtin
from broadcast.disk import PartitionSpec, default_disk, format_partitions, is_block_device, partition_disk
from broadcast.errors import AgentError, ImageError, describe_error
from broadcast.image import SinkSpec, sha256_file
from broadcast.receiver import Receiver
from broadcast.texec import ExecContext, serve_texec
from broadcast.wire import ListenFactory, SocketFactory

log = logging.getLogger("rackboot.agent")

KexecHook = Callable[[str, str | None, str], Awaitable[None]]  # kernel, initrd, cmdline
RebootHook = Callable[[], Awaitable[None]]
MAX_REQUEST = 4 << 20
# The disk a real deploy environment writes when neither the inventory nor the environment names one: its first fixed
# disk. Only rackboot-agent's main() (the deploy environment) defaults to it: an agent run in-process never guesses.
AUTO_DISK = "auto"


@dataclass(frozen=True)
class AgentConfig:
    """Everything one agent needs; plain data (the hooks are constructor arguments of DeployAgent)."""

    name: str
    mac: str
    host: str  # the node's address: SSH and the broadcast receiver bind here
    callback_url: str | None = None  # the full URL, as ipxe.script renders {callback}: http://10.77.0.1:8080/callback/52-54-00-77-00-01
    token: str = ""  # the node's token when it has one (an installed system's stamp); empty: claimed at the first callback
    ssh_port: int = 22
    data_port: int = 7070
    authorized_keys: tuple[str, ...] = ()  # OpenSSH public key lines (the appliance's deploy key)
    host_key: str | None = None  # private key file; None: an ephemeral ed25519 key
    tree_key: str | None = None  # private key file this agent uses to open the next tree-exec level
    disk: str = ""  # the disk to deploy onto (block device, or the sparse file of a virtual node)
    workdir: str = "/run/rackboot"  # scripts, mount points, extracted roots
    shell: tuple[str, ...] = ("/bin/sh", "-c")
    shell_prefix: tuple[str, ...] = ()  # e.g. ("ip", "netns", "exec", NS) in the vm-testbed
    env: tuple[tuple[str, str], ...] = ()  # extra environment for commands and scripts
    # How a soft reboot is done when no hook is set: the deploy environment's /init is a shell, not an init
    # system, so it passes `reboot -f` (straight to reboot(2), after the agent has synced and unmounted).
    reboot_command: tuple[str, ...] = ("reboot",)

    @classmethod
    def from_cmdline(cls, cmdline: str, **overrides: Any) -> "AgentConfig":
        """Read rackboot.{name,mac,ip,callback,token,disk} from a kernel command line (e.g. /proc/cmdline)."""
        opts = {}
        for word in shlex.split(cmdline):
            key, _, value = word.partition("=")
            if key.startswith("rackboot."):
                opts[key[len("rackboot."):]] = value
        missing = [k for k in ("name", "mac", "ip") if k not in opts and k not in overrides and {"ip": "host"}.get(k) not in overrides]
        if missing:
            raise AgentError(f"kernel command line lacks rackboot.{', rackboot.'.join(missing)}")
        base = {"name": opts.get("name"), "mac": opts.get("mac"), "host": opts.get("ip"),
                "callback_url": opts.get("callback"), "token": opts.get("token", ""), "disk": opts.get("disk", "")}
        base.update(overrides)
        return cls(**{k: v for k, v in base.items() if v is not None})


def _require(req: Any, **types: type | tuple[type, ...]) -> dict[str, Any]:
    """Check a request object has the given fields with the given types; raise AgentError."""
    if not isinstance(req, dict):
        raise AgentError("request: expected a JSON object")
    for name, t in types.items():
        if name not in req:
            raise AgentError(f"request: missing {name!r}")
        if isinstance(req[name], bool) and t is not bool and (not isinstance(t, tuple) or bool not in t):
            raise AgentError(f"request: {name!r} has the wrong type")
        if not isinstance(req[name], t):
            raise AgentError(f"request: {name!r} has the wrong type")
    return req


class DeployAgent:
    """One node's agent: SSH server, broadcast receiver, callback, disk and boot operations."""

    def __init__(self, config: AgentConfig, *, kexec_hook: KexecHook | None = None, reboot_hook: RebootHook | None = None,
                 listen_factory: ListenFactory | None = None, socket_factory: SocketFactory | None = None,
                 builtin: Builtin | None = None) -> None:
        self.config = config
        self.token = config.token  # claimed from the appliance at the first callback when empty
        self.kexec_hook = kexec_hook
        # A virtual node (vm-testbed) must never run the host's `reboot`: it passes a hook that resets itself.
        self.reboot_hook = reboot_hook
        self.listen_factory = listen_factory
        self.socket_factory = socket_factory
        # Answers some commands in process (a vm-testbed node answering `true`); None, as in a real deploy environment:
        # every command runs through the shell.
        self.builtin = builtin
        self.receiver = Receiver(config.name, config.host, config.data_port, listen_factory=listen_factory,
                                 socket_factory=socket_factory)
        self.state = "starting"
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self.tree_key: asyncssh.SSHKey | None = None  # opens the next tree-exec level (None: children are handed back)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.layout: list[dict[str, Any]] = []
        self.disk = ""  # the disk the last partition operation wrote (config.disk, or the first fixed disk)
        self.counters = {"ssh_sessions": 0, "agent_ops": 0, "shell_commands": 0, "builtin_commands": 0, "op_errors": 0}

    # -- lifecycle
    async def start(self) -> None:
        """Bind the receiver and the SSH server (raise BindError when the address or port is unusable)."""
        cfg = self.config
        if not cfg.authorized_keys:
            raise AgentError(f"agent {cfg.name}: no authorized key (the appliance's deploy key is required)")
        Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
        host_key = asyncssh.read_private_key(cfg.host_key) if cfg.host_key else asyncssh.generate_private_key("ssh-ed25519")
        if cfg.tree_key:
            self.tree_key = asyncssh.read_private_key(cfg.tree_key)
        await self.receiver.start()
        try:
            kwargs: dict[str, Any] = dict(
                server_host_keys=[host_key],
                authorized_client_keys=asyncssh.import_authorized_keys("\n".join(cfg.authorized_keys) + "\n"),
                process_factory=self._process, encoding=None, allow_scp=False, agent_forwarding=False,
                x11_forwarding=False, password_auth=False, kbdint_auth=False, keepalive_interval=15,
            )
            if self.listen_factory is not None:
                self._acceptor = await asyncssh.listen(sock=self.listen_factory(cfg.host, cfg.ssh_port), **kwargs)
            else:
                self._acceptor = await asyncssh.listen(cfg.host, cfg.ssh_port, reuse_address=True, **kwargs)
        except OSError as exc:
            await self.receiver.close()
            raise BindError(f"agent {cfg.name}: cannot listen for SSH on {cfg.host}:{cfg.ssh_port}: {exc.strerror}") from exc
        self.state = "up"

    @property
    def ssh_port(self) -> int:
        """The SSH port actually bound (useful with port 0 in tests)."""
        assert self._acceptor is not None
        if hasattr(self._acceptor, "get_port"):
            return int(self._acceptor.get_port())
        # asyncssh before 2.11 (Debian 12 has 2.10) has no get_port(): ask the listening socket (the acceptor
        # forwards to asyncio's Server).
        return int(self._acceptor.sockets[0].getsockname()[1])

    async def callback(self, event: str = "agent_up", attempts: int = 6, **detail: Any) -> bool:
        """POST the callback URL ({token, stage, status, ...}); retry with backoff; True when accepted.

        Without a token (a deploy environment's boot carries none), the first callback claims the node's token
        from the appliance; the agent keeps it for its later callbacks.
        """
        cfg = self.config
        if not cfg.callback_url:
            return False
        url = cfg.callback_url
        body = {"token": self.token, "stage": event, "status": "ok", "name": cfg.name, "ip": cfg.host,
                "ssh_port": self.ssh_port if self._acceptor else cfg.ssh_port, "data_port": self.receiver.port, **detail}
        connector = aiohttp.TCPConnector(socket_factory=self.socket_factory) if self.socket_factory else aiohttp.TCPConnector()
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            for attempt in range(attempts):
                try:
                    async with http.post(url, json=body) as resp:
                        if 200 <= resp.status < 300:
                            answer = await resp.json(content_type=None)
                            if isinstance(answer, dict) and isinstance(answer.get("token"), str):
                                self.token = answer["token"]  # claimed: bound to this node from now on
                            return True
                        if resp.status in (400, 401, 403, 404):  # refused: retrying will not help
                            log.warning("%s: callback refused: HTTP %d", cfg.name, resp.status)
                            return False
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    log.info("%s: callback attempt %d failed: %s", cfg.name, attempt + 1, describe_error(exc))
                await asyncio.sleep(min(8.0, 0.25 * 2**attempt))
        return False

    async def serve(self) -> None:
        """Start, call back, and serve until cancelled (what the deploy environment's init runs)."""
        await self.start()
        cfg = self.config
        log.info("%s: agent up on %s (ssh port %d, data port %d)", cfg.name, cfg.host, self.ssh_port, self.receiver.port)
        try:
            if await self.callback():
                log.info("%s: called back to %s: the appliance knows this node is up", cfg.name, cfg.callback_url)
            elif cfg.callback_url:
                # The console is where an operator looks when a node does not come up: say it plainly.
                log.error("%s: the callback to %s was refused or not answered: the appliance does not know this node "
                          "is up (SSH is served anyway)", cfg.name, cfg.callback_url)
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop the SSH server, the receiver and every running operation."""
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None
        for t in list(self._tasks):
            t.cancel()
        await self.receiver.close()
        self.state = "closed"

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- SSH
    async def _process(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        self.counters["ssh_sessions"] += 1
        command = process.command
        try:
            if not command:
                process.stderr.write(b"rackboot deploy agent: no interactive shell; pass a command\n")
                process.exit(1)
                return
            argv = shlex.split(command)
            if argv and argv[0] == AGENT_COMMAND:
                await self._agent_op(process, argv[1:])
            elif (answer := self.builtin(command) if self.builtin is not None else None) is not None:
                self.counters["builtin_commands"] += 1  # answered in process: no shell, no child
                process.stdout.write(answer.stdout)
                process.stderr.write(answer.stderr)
                process.exit(answer.status)
            else:
                status = await self._shell(process, command)
                process.exit(status)
        except (asyncssh.BreakReceived, asyncssh.SignalReceived, asyncssh.TerminalSizeChanged, BrokenPipeError,
                ConnectionError, asyncssh.DisconnectError):
            process.exit(255)

    def command_env(self) -> dict[str, str]:
        """The environment commands and scripts run with: ours, RACKBOOT_NODE/MAC/DISK/WORKDIR and config.env."""
        cfg = self.config
        return {**os.environ, "RACKBOOT_NODE": cfg.name, "RACKBOOT_MAC": cfg.mac, "RACKBOOT_DISK": cfg.disk,
                "RACKBOOT_WORKDIR": cfg.workdir, **dict(cfg.env)}

    def exec_context(self) -> ExecContext:
        """What tree exec needs of this agent: name, tree key, how and where commands run."""
        cfg = self.config
        return ExecContext(name=cfg.name, tree_key=self.tree_key, env=self.command_env(), shell=cfg.shell,
                           shell_prefix=cfg.shell_prefix, workdir=cfg.workdir, socket_factory=self.socket_factory,
                           builtin=self.builtin)

    async def _shell(self, process: asyncssh.SSHServerProcess[bytes], command: str) -> int:
        """Run an arbitrary command through the shell, piping the SSH channel's stdin/stdout/stderr."""
        self.counters["shell_commands"] += 1
        cfg = self.config
        proc = await asyncio.create_subprocess_exec(*cfg.shell_prefix, *cfg.shell, command, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    env=self.command_env(), cwd=cfg.workdir, start_new_session=True)
        assert proc.stdin and proc.stdout and proc.stderr

        async def pump_in() -> None:
            try:
                while data := await process.stdin.read(65536):
                    proc.stdin.write(data)  # type: ignore[union-attr]
                    await proc.stdin.drain()  # type: ignore[union-attr]
            except (BrokenPipeError, ConnectionError, asyncssh.Error):
                pass
            finally:
                proc.stdin.close()  # type: ignore[union-attr]

        async def pump_out(src: asyncio.StreamReader, dst: asyncssh.SSHWriter[bytes]) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()

        feeder = asyncio.create_task(pump_in())
        try:
            await asyncio.gather(pump_out(proc.stdout, process.stdout), pump_out(proc.stderr, process.stderr))
            return await proc.wait()
        finally:
            feeder.cancel()
            if proc.returncode is None:
                _kill_group(proc)
                await proc.wait()

    async def _agent_op(self, process: asyncssh.SSHServerProcess[bytes], argv: list[str]) -> None:
        self.counters["agent_ops"] += 1
        op = argv[0] if argv else ""
        if op == "texec":
            await serve_texec(self.exec_context(), process)
            return
        handler = {
            "status": self.op_status, "partition": self.op_partition, "arm": self.op_arm,
            "wait-receive": self.op_wait_receive, "verify": self.op_verify, "postinstall": self.op_postinstall,
            "bootloader": self.op_bootloader, "mount-root": self.op_mount_root, "kexec": self.op_kexec, "reboot": self.op_reboot,
        }.get(op)
        try:
            raw = await _read_request(process)  # read the request first: the client is still sending it
            if handler is None:
                raise AgentError(f"unknown agent operation {op!r}")
            try:
                req = json.loads(raw) if raw.strip() else {}
            except ValueError as exc:
                raise AgentError(f"request is not JSON: {exc}") from exc
            reply = await handler(req)
            process.stdout.write(json.dumps(reply).encode() + b"\n")
            process.exit(0)
        except (AgentError, ImageError) as exc:
            self.counters["op_errors"] += 1
            process.stdout.write(json.dumps({"error": str(exc)}).encode() + b"\n")
            process.exit(1)

    # -- operations (callable in-process too)
    async def op_status(self, req: Any = None) -> dict[str, Any]:
        """Who and where this agent is, and what it is doing."""
        cfg = self.config
        return {"name": cfg.name, "mac": cfg.mac, "ip": cfg.host, "state": self.state, "disk": cfg.disk,
                "data_port": self.receiver.port, "sessions": sorted(self.receiver.relays), "layout": self.layout,
                "stats": {**self.counters, **{f"receiver_{k}": v for k, v in self.receiver.stats().items()}}}

    async def op_partition(self, req: Any) -> dict[str, Any]:
        """{parts: [PartitionSpec...], label: gpt|dos, format: bool} -> {partitions: [...], formatted: [...]}."""
        _require(req, parts=list)
        label = req.get("label", "gpt")
        disk = req.get("disk") or self.config.disk
        if disk == AUTO_DISK:  # the deploy environment on a node whose inventory names no disk: its first fixed disk
            disk = default_disk()
        if not disk:
            raise AgentError("no disk configured")
        if req.get("whole"):  # a whole-disk image brings its own table: only say which disk it goes to
            self.layout, self.disk, self.state = [], disk, "partitioned"
            return {"disk": disk, "partitions": [], "formatted": []}
        specs = [PartitionSpec.from_json(p) for p in req["parts"]]
        self.state = "partitioning"
        parts = await partition_disk(disk, specs, label)
        formatted = await format_partitions(disk, parts) if req.get("format", True) else []
        self.layout = [p.to_json() for p in parts]
        self.disk = disk
        self.state = "partitioned"
        return {"disk": disk, "partitions": self.layout, "formatted": formatted}

    async def op_arm(self, req: Any) -> dict[str, Any]:
        """{session, token, sink: SinkSpec} -> {data_port}: expect a broadcast session."""
        _require(req, session=str, token=str, sink=dict)
        sink = SinkSpec.from_json(req["sink"])
        if sink.kind == "tar":
            Path(sink.target).mkdir(parents=True, exist_ok=True)
        self.receiver.arm(req["session"], req["token"], sink)
        self.state = "receiving"
        return {"data_port": self.receiver.port}

    async def op_wait_receive(self, req: Any) -> dict[str, Any]:
        """{session, timeout} -> this node's NodeResult for the session."""
        _require(req, session=str)
        timeout = req.get("timeout")
        try:
            result = await self.receiver.wait_result(req["session"], float(timeout) if timeout else None)
        except asyncio.TimeoutError as exc:
            raise AgentError(f"no result for session {req['session']} within {timeout} s") from exc
        self.state = "received" if result.ok else "receive_failed"
        return result.to_json()

    async def op_verify(self, req: Any) -> dict[str, Any]:
        """{path, sha256, offset?, length?} -> re-read what is on disk and compare checksums."""
        _require(req, path=str, sha256=str)
        digest = await asyncio.to_thread(sha256_file, req["path"], int(req.get("offset", 0)), req.get("length"))
        return {"sha256": digest, "ok": digest == req["sha256"].lower()}

    async def op_postinstall(self, req: Any) -> dict[str, Any]:
        """{scripts: [{name, content, timeout?}], root, env?} -> run each in order, stop at the first failure."""
        _require(req, scripts=list, root=str)
        cfg = self.config
        sdir = Path(cfg.workdir) / "scripts"
        sdir.mkdir(parents=True, exist_ok=True)
        env = {**self.command_env(), "RACKBOOT_ROOT": req["root"]}
        extra = req.get("env", {})
        if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise AgentError("request: 'env' must map strings to strings")
        env.update(extra)
        self.state = "postinstall"
        results = []
        for i, script in enumerate(req["scripts"]):
            _require(script, name=str, content=str)
            name = os.path.basename(script["name"]) or f"script-{i}"
            path = sdir / f"{i:02d}-{name}"
            path.write_text(script["content"])
            path.chmod(0o755)
            proc = await asyncio.create_subprocess_exec(*cfg.shell_prefix, str(path), stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE, env=env, cwd=req["root"],
                                                        start_new_session=True)
            timed_out = False
            try:
                out, err = await within(proc.communicate(), float(script.get("timeout", 600)))
            except asyncio.TimeoutError:
                timed_out = True
                _kill_group(proc)
                out, err = await proc.communicate()
            results.append({"name": name, "status": proc.returncode, "timed_out": timed_out,
                            "stdout": out[-4096:].decode(errors="replace"), "stderr": err[-4096:].decode(errors="replace")})
            if timed_out or proc.returncode != 0:
                self.state = "postinstall_failed"
                return {"ok": False, "scripts": results}
        self.state = "installed"
        return {"ok": True, "scripts": results}

    async def op_bootloader(self, req: Any) -> dict[str, Any]:
        """{root, partitions: [{number, device, type, fs, mount}], cmdline, label?, disk?} -> fstab by UUID, GRUB installed.

        The partitions are the ones `partition` wrote, each with its mount point in the installed system. On a
        file-backed disk (a vm-testbed node) there is nothing to install a bootloader on: it says so.
        """
        _require(req, root=str, partitions=list)
        disk = str(req.get("disk") or self.disk or "")
        parts = [bootloader.MountedPart.from_json(p) for p in req["partitions"]]
        if not disk or not is_block_device(disk) or not all(p.device for p in parts):
            return {"skipped": "file-backed disk: no bootloader to install", "grub": []}
        self.state = "bootloader"
        reply = await bootloader.install(req["root"], disk, parts, str(req.get("cmdline", "")), str(req.get("label", "gpt")))
        self.state = "installed"
        return reply

    async def op_mount_root(self, req: Any) -> dict[str, Any]:
        """{root} -> after a whole-disk image: find the installed system's partition, mount it at root ({device, uuid, fs})."""
        _require(req, root=str)
        if not self.disk or not is_block_device(self.disk):
            return {"skipped": "file-backed disk: nothing to mount"}
        return await bootloader.mount_installed_root(self.disk, req["root"])

    async def op_kexec(self, req: Any) -> dict[str, Any]:
        """{kernel, initrd?, cmdline?, root?} -> load now, reply, then jump (real kexec, or the testbed's hook)."""
        _require(req, kernel=str)
        root = req.get("root") or "/"
        kernel = str(Path(root) / req["kernel"].lstrip("/"))
        initrd = str(Path(root) / req["initrd"].lstrip("/")) if req.get("initrd") else None
        cmdline = str(req.get("cmdline", ""))
        for path in [kernel] + ([initrd] if initrd else []):
            if not os.path.isfile(path):
                raise AgentError(f"kexec: no such file {path}")
        if self.kexec_hook is not None:
            hook = self.kexec_hook
            self.state = "kexec"
            self._spawn(self._later(0.2, hook(kernel, initrd, cmdline)))
            return {"ok": True, "via": "hook"}
        tool = shutil.which("kexec")
        if tool is None:
            raise AgentError("kexec is not available on this system (and no hook is set)")
        argv = [tool, "-l", kernel, f"--append={cmdline}"] + ([f"--initrd={initrd}"] if initrd else [])
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise AgentError(f"kexec -l failed: {err.decode(errors='replace').strip()}")
        self.state = "kexec"
        self._spawn(self._later(0.5, _exec_kexec(tool, self.config.workdir)))
        return {"ok": True, "via": "kexec"}

    async def op_reboot(self, req: Any = None) -> dict[str, Any]:
        """{} -> reply, then reboot (the testbed's hook, or the system's `reboot`)."""
        self.state = "rebooting"
        if self.reboot_hook is not None:
            self._spawn(self._later(0.2, self.reboot_hook()))
            return {"ok": True, "via": "hook"}
        argv = list(self.config.reboot_command)
        tool = shutil.which(argv[0]) if argv else None
        if tool is None:
            raise AgentError(f"no {argv[0] if argv else 'reboot'} command on this system (and no hook is set)")
        self._spawn(self._later(0.5, _exec_reboot([tool, *argv[1:]], self.config.workdir)))
        return {"ok": True, "via": " ".join(argv)}

    @staticmethod
    async def _later(delay: float, coro: Awaitable[None]) -> None:
        await asyncio.sleep(delay)  # let the SSH reply reach the appliance first
        await coro


async def _read_request(process: asyncssh.SSHServerProcess[bytes]) -> bytes:
    """Read stdin to EOF (one JSON document), at most MAX_REQUEST bytes."""
    buf = bytearray()
    while data := await process.stdin.read(65536):
        buf += data
        if len(buf) > MAX_REQUEST:
            raise AgentError(f"request larger than {MAX_REQUEST} bytes")
    return bytes(buf)


async def _exec_kexec(tool: str, workdir: str) -> None:
    os.sync()
    await bootloader.unmount_below(workdir)  # the installed filesystems, clean before the jump
    os.sync()
    proc = await asyncio.create_subprocess_exec(tool, "-e")
    await proc.wait()


async def _exec_reboot(argv: list[str], workdir: str) -> None:
    os.sync()
    await bootloader.unmount_below(workdir)
    os.sync()
    proc = await asyncio.create_subprocess_exec(*argv)
    await proc.wait()


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    """`rackboot-agent`: what the deploy environment's /init runs once the network is up."""
    import argparse

    parser = argparse.ArgumentParser(prog="rackboot-agent", description="rackboot deploy agent (reads rackboot.* from the kernel command line)")
    parser.add_argument("--cmdline", default="/proc/cmdline", help="kernel command line file (rackboot.name, mac, ip, callback, token, disk)")
    parser.add_argument("--keys", default="/etc/rackboot/authorized_keys", help="the appliance's deploy key (and the tree key), OpenSSH format")
    parser.add_argument("--tree-key", default="/etc/rackboot/tree_key", help="private key for opening the next tree-exec level")
    parser.add_argument("--host-key", help="SSH host key (default: a fresh ed25519 key)")
    parser.add_argument("--workdir", default="/run/rackboot")
    parser.add_argument("--ssh-port", type=int, default=22)
    parser.add_argument("--data-port", type=int, default=7070)
    parser.add_argument("--reboot-command", default="reboot",
                        help="how the reboot operation reboots (the deploy environment's /init passes 'reboot -f')")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # asyncssh logs every session and channel at INFO: on a node's console that hides ours
        logging.getLogger("asyncssh").setLevel(logging.WARNING)
    try:
        keys = tuple(line for line in Path(args.keys).read_text().splitlines() if line.strip() and not line.startswith("#"))
        cmdline = Path(args.cmdline).read_text()
        config = AgentConfig.from_cmdline(
            cmdline, **({} if "rackboot.disk=" in cmdline else {"disk": AUTO_DISK}), authorized_keys=keys, host_key=args.host_key, workdir=args.workdir,
            tree_key=args.tree_key if Path(args.tree_key).is_file() else None, ssh_port=args.ssh_port, data_port=args.data_port,
            reboot_command=tuple(shlex.split(args.reboot_command)))
        asyncio.run(DeployAgent(config).serve())
    except (OSError, AgentError, BindError) as exc:
        print(f"rackboot-agent: {exc}", flush=True)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
