"""The real deploy driver: the controller's remote steps on the nodes' deploy agents, over SSH (broadcast/).

Partitioning, the image broadcast (chain, tree or star through broadcast.methods), post-install, kexec and
soft reboots. Each agent reports its SSH and data ports in its callback; the controller passes that on
through agent_up(). The appliance's deploy key is generated at first start (STATE_DIR/deploy_key, with
deploy_key.pub for the deploy environment's authorized_keys).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import shlex
from pathlib import Path
from typing import Any, Sequence

import asyncssh

from appliance.catalog import Environment, Partition
from appliance.deploy.drivers import BroadcastOutcome, DeployError
from broadcast.agent_client import AgentClient, load_or_create_key, ssh_arm
from broadcast.bootloader import kernel_args
from broadcast.disk import PartitionSpec
from broadcast.errors import AgentError
from broadcast.image import SinkSpec
from broadcast.methods import BroadcastJob, run_broadcast
from broadcast.params import ChainParams
from broadcast.topology import Target
from domain.logfields import fields
from domain.nodes import Node
from ipxe import callback_path

log = logging.getLogger("rackboot.agent_driver")

STAMP_PATH = "/etc/rackboot/deployed.json"  # written by the post-install into the installed root
PROBE_CONNECT_TIMEOUT_S = 3.0
# SSH handshakes to agents at once. Each costs the appliance a key exchange and a signature on its one loop, and the
# node an answer: unbounded, thousands start together (the disk preparations of a 4000-node deployment) and the
# connect timeout measures the queue rather than the handshake. The TCP connections (their ARP, their SYN) have
# places of their own (CONNECTS): a node that is off fails its ARP in seconds without holding a handshake's place.
HANDSHAKES = 64
# TCP connections being opened to agents at once, apart from the handshakes: an ARP miss takes seconds to fail, and
# each costs the sender an ARP request (broadcast.agent_client.ssh_connect).
CONNECTS = 128
# Connections to an agent that called back are tried this often (1, 2, 4, 8 s apart): the node is up, and a failure
# to connect is the network under load. In the first 4000-node run, 1151 disk preparations failed with EHOSTUNREACH
# (no ARP answer, while the kernel dropped frames) after 3 tries in about 3 s, and those nodes were booted again.
CONNECT_TRIES = 5
PROBE_TOTAL_S = 10.0
_SIZE = re.compile(r"^(\d+)\s*([KMGT]?)i?B?$", re.IGNORECASE)
_MIB = {"": 1 / (1 << 20), "K": 1 / 1024, "M": 1, "G": 1024, "T": 1 << 20}
# partition type by filesystem ("bios_boot" is a partition type with no filesystem: GRUB's core image on BIOS/GPT)
_TYPE_OF = {"swap": "swap", "vfat": "efi", "bios_boot": "bios_boot"}


def partition_specs(layout: tuple[Partition, ...]) -> list[PartitionSpec]:
    """Turn a catalog disk layout (sizes like 512M, 20G, rest) into the agent's partition specs."""
    specs = []
    for p in layout:
        if p.size.lower() == "rest":
            size = None
        else:
            m = _SIZE.match(p.size.strip())
            if not m:
                raise DeployError(f"partition {p.name}: bad size {p.size!r}")
            size = max(1, int(int(m.group(1)) * _MIB[m.group(2).upper()]))
        fs = None if p.fs in ("", "none", "bios_boot") else p.fs
        specs.append(PartitionSpec(size_mib=size, type=_TYPE_OF.get(p.fs, "linux"), fs=fs, label=p.name))
    return specs


class ImageShares:
    """Images offered over HTTP (GET /images/TOKEN) for one broadcast attempt, each behind a random token."""

    def __init__(self) -> None:
        self._by_token: dict[str, Path] = {}

    def add(self, path: Path) -> str:
        """Offer a file; return its token."""
        token = secrets.token_urlsafe(18)
        self._by_token[token] = path
        return token

    def get(self, token: str) -> Path | None:
        """Return the file behind a token, if it is still offered."""
        return self._by_token.get(token)

    def remove(self, token: str) -> None:
        """Stop offering a file."""
        self._by_token.pop(token, None)


class AgentDeployDriver:
    """DeployDriver over SSH to broadcast.agent.DeployAgent on every node."""

    def __init__(self, config: Any, tokens: Any, *, key: asyncssh.SSHKey | None = None,
                 params: ChainParams | None = None, connect_timeout: float = 10.0, handshakes: int = HANDSHAKES,
                 connect_backoff_s: float = 1.0) -> None:
        self.config = config
        self.connect_backoff_s = connect_backoff_s  # the first pause between connection tries (then doubled)
        self.tokens = tokens
        self.key = key or load_or_create_key(config.deploy.ssh_key)
        self.params = params or ChainParams()
        self.connect_timeout = connect_timeout
        self._handshakes = asyncio.Semaphore(handshakes)
        self._connects = asyncio.Semaphore(CONNECTS)
        self.shares = ImageShares()
        self._ports: dict[str, tuple[int, int]] = {}   # mac -> (ssh port, data port), from callbacks
        self._roots: dict[str, str] = {}               # mac -> where the deploy partition is mounted on the node
        self._layouts: dict[str, list[dict[str, Any]]] = {}
        self._kernel_args: dict[str, str] = {}         # mac -> the installed kernel's command line (root by UUID)
        self._disks: dict[str, str] = {}               # mac -> the disk the agent partitioned (or writes a whole image to)

    def agent_up(self, node: Node, detail: dict[str, str]) -> None:
        """Record where a node's agent listens (from its callback)."""
        try:
            self._ports[node.mac] = (int(detail.get("ssh_port", self.config.deploy.ssh_port)), int(detail.get("data_port", 7070)))
        except ValueError:
            self._ports[node.mac] = (self.config.deploy.ssh_port, 7070)

    def _client(self, node: Node) -> AgentClient:
        port = self._ports.get(node.mac, (self.config.deploy.ssh_port, 7070))[0]
        return AgentClient(str(node.ip), port, self.key, connect_timeout=self.connect_timeout)

    async def _with_client(self, node: Node, what: str, fn: Any, connect_tries: int = CONNECT_TRIES) -> Any:
        """Connect to the node's agent (retrying the connection only: an ARP miss or a refused SYN under load
        is transient) and run fn once."""
        client = self._client(node)
        try:
            for attempt in range(connect_tries):
                try:
                    await client.connect(self._connects, self._handshakes)
                    break
                except (OSError, asyncio.TimeoutError, asyncssh.ConnectionLost) as exc:
                    # ConnectionLost: the TCP connection closed in the middle of the SSH handshake (4000 nodes: 8
                    # post-installs failed so on the first try, on healthy nodes under load).
                    if attempt == connect_tries - 1:
                        raise
                    log.info("%s: %s: connecting to the agent failed (%s), retrying", node.name, what, str(exc) or type(exc).__name__,
                             extra=fields(node=node.name, mac=node.mac))
                    await asyncio.sleep(self.connect_backoff_s * 2**attempt)
            try:
                return await fn(client)
            finally:
                await client.close()
        except AgentError as exc:
            raise DeployError(f"{what}: {exc}") from exc
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            raise DeployError(f"{what}: cannot reach the agent at {node.ip}: {str(exc) or type(exc).__name__}") from exc

    async def prepare_disk(self, node: Node, env: Environment) -> None:
        """Partition and format the node's disk, then mount the deploy partition (on a real block device); for a
        whole-disk image (no layout), only learn which disk it goes to."""
        disk = env.target_disk or node.disk
        if not env.layout:
            async def whole(client: AgentClient) -> None:
                reply = await client.partition([], disk=disk, whole=True)
                self._disks[node.mac] = str(reply["disk"])
                self._layouts[node.mac] = []

            await self._with_client(node, "disk preparation", whole)
            return
        specs = partition_specs(env.layout)
        names = [p.name for p in env.layout]
        index = names.index(env.deploy_partition) if env.deploy_partition in names else len(names) - 1

        async def go(client: AgentClient) -> None:
            reply = await client.partition(specs, label="gpt", format=True, disk=disk)
            parts = reply["partitions"]
            self._disks[node.mac] = str(reply.get("disk", disk))
            self._layouts[node.mac] = parts
            device = parts[index]["device"] if index < len(parts) else ""
            # A block-device partition is mounted there; a file-backed disk (vm-testbed) has no mountable
            # device, so the directory stands for the fresh filesystem and is emptied like mkfs would.
            mount = f'mkdir -p "$R" && mount {shlex.quote(device)} "$R"' if device else 'rm -rf "$R" && mkdir -p "$R"'
            r = await client.run(f'R="$RACKBOOT_WORKDIR/root"; {mount} && echo "$R"', timeout=120)
            if r.status != 0:
                raise DeployError(f"mounting the deploy partition failed: {r.stderr.strip()}")
            self._roots[node.mac] = r.stdout.strip().splitlines()[-1]

        await self._with_client(node, "disk preparation", go)

    def _sink_for(self, env: Environment, by_name: dict[str, Node]) -> Any:
        def sink(target: Target) -> SinkSpec:
            node = by_name[target.name]
            if env.image_kind == "tar":
                return SinkSpec(kind="tar", compression=env.compression, target=self._roots.get(node.mac, "/run/rackboot/root"),
                                expected_sha256=env.sha256 or None, expected_size=env.size or None)
            if not env.layout:  # a whole-disk image
                target = self._disks.get(node.mac) or env.target_disk or node.disk or "$RACKBOOT_DISK"
                return SinkSpec(kind="raw", compression=env.compression, target=target, offset=0,
                                expected_sha256=env.sha256 or None, expected_size=env.size or None)
            parts = self._layouts.get(node.mac, [])
            names = [p.name for p in env.layout]
            i = names.index(env.deploy_partition) if env.deploy_partition in names else 0
            part = parts[i] if i < len(parts) else {"device": "", "start": 0}
            disk = env.target_disk or node.disk
            target = part["device"] or disk or "$RACKBOOT_DISK"
            return SinkSpec(kind="raw", compression=env.compression, target=target, offset=0 if part["device"] else int(part["start"]),
                            expected_sha256=env.sha256 or None, expected_size=env.size or None)
        return sink

    async def broadcast(self, method: str, nodes: list[Node], env: Environment, image: Path) -> BroadcastOutcome:
        """Broadcast the image with run_broadcast; every node's agent is armed over SSH first."""
        by_name = {n.name: n for n in nodes}
        targets = [Target.from_node(n, self._ports.get(n.mac, (0, 7070))[1]) for n in nodes]
        share = self.shares.add(image)
        arm = ssh_arm(self.key, lambda t: self._ports.get(by_name[t.name].mac, (self.config.deploy.ssh_port, 0))[0],
                      self._sink_for(env, by_name))
        job = BroadcastJob(image=image, sha256=env.sha256 or None, url=f"{self.config.http_base}/images/{share}",
                           params=self.params, report_host=str(self.config.ip))
        try:
            result = await run_broadcast(job, targets, method=method, arm=arm)
        except (OSError, ValueError) as exc:
            raise DeployError(str(exc)) from exc
        finally:
            self.shares.remove(share)
        return BroadcastOutcome(method, {name: (r.ok, r.reason) for name, r in result.nodes.items()}, result.seconds,
                                {"result": result.to_json()}, result.arm_seconds, dict(result.counters))

    async def post_install(self, node: Node, env: Environment, ssh_keys: Sequence[str] = ()) -> None:
        """Run the environment's post-install scripts, then stamp the installed system with its identity, its
        host name, and root's authorized_keys (the deploy key and the deploying user's keys, as Kadeploy's -k)."""
        root = self._roots.get(node.mac, "/run/rackboot/root")
        scripts = [{"name": f"post-{i}", "content": s if s.startswith("#!") else f"#!/bin/sh\nset -e\n{s}\n"}
                   for i, s in enumerate(env.postinstall)]
        stamp = {"env": env.ref, "sha256": env.sha256, "token": self.tokens.token_of(node.mac) or "",
                 "callback": self.config.http_base + callback_path(node.mac)}
        # The installed system reads this file at boot and calls back with its identity and the node's token.
        # Root's authorized_keys gets the deploy key (as Kadeploy does), so the appliance can soft-reboot the
        # installed system and run commands on it.
        keys = [self.key.export_public_key().decode().strip(), *(k.strip() for k in ssh_keys)]
        add_keys = "".join(f"grep -qxF '{k}' \"$RACKBOOT_ROOT/root/.ssh/authorized_keys\" 2>/dev/null || "
                           f"echo '{k}' >> \"$RACKBOOT_ROOT/root/.ssh/authorized_keys\"\n" for k in keys)
        scripts.append({"name": "rackboot-stamp", "content": "#!/bin/sh\nset -e\nmkdir -p \"$RACKBOOT_ROOT/etc/rackboot\"\n"
                        f"cat > \"$RACKBOOT_ROOT{STAMP_PATH}\" <<'EOF'\n{json.dumps(stamp)}\nEOF\n"
                        f"echo '{node.name}' > \"$RACKBOOT_ROOT/etc/hostname\"\n"
                        "mkdir -p -m 700 \"$RACKBOOT_ROOT/root/.ssh\"\n" + add_keys})

        async def go(client: AgentClient) -> None:
            if not env.layout:  # a whole-disk image: its own table and bootloader; find its root to stamp it
                found = await client.call("mount-root", timeout=180, root=root)
                if found.get("uuid"):
                    self._kernel_args[node.mac] = kernel_args(str(found["uuid"]), env.cmdline or "ro")
                    self._roots[node.mac] = root
            parts = self._installed_partitions(node, env)
            if parts:  # fstab by UUID and GRUB first: the environment's own scripts then see the system as it will boot
                boot = await client.bootloader(root, parts, env.cmdline or "ro")
                if boot.get("kernel_args"):
                    self._kernel_args[node.mac] = str(boot["kernel_args"])
                log.info("%s: bootloader: %s", node.name, boot.get("grub") or boot.get("skipped"),
                         extra=fields(node=node.name, mac=node.mac))
            reply = await client.postinstall(scripts, root, env={"RACKBOOT_ENV": env.ref})
            if not reply.get("ok"):
                bad = next((s for s in reply.get("scripts", []) if s.get("status") != 0 or s.get("timed_out")), {})
                raise DeployError(f"script {bad.get('name')} exited {bad.get('status')}: {str(bad.get('stderr', '')).strip()[-300:]}")

        await self._with_client(node, "post-install", go)

    def _installed_partitions(self, node: Node, env: Environment) -> list[dict[str, Any]]:
        """The partitions written for this node with their mount points in the installed system (the deploy partition
        at / unless the layout says otherwise); empty for an image written without a layout of ours."""
        written = self._layouts.get(node.mac, [])
        if env.image_kind != "tar" or not written:
            return []
        out = []
        for part, spec in zip(written, env.layout):
            mount = spec.mount or ("/" if spec.name == env.deploy_partition else "")
            out.append({"number": part["number"], "device": part["device"], "type": part["type"], "fs": part.get("fs"),
                        "mount": mount})
        return out

    async def kexec(self, node: Node, env: Environment) -> None:
        """Jump into the installed kernel (the environment's boot kernel, or /vmlinuz of the installed root)."""
        root = self._roots.get(node.mac, "/run/rackboot/root")
        kernel = env.kernel or "/vmlinuz"
        initrd = env.initrd or ("/initrd.img" if not env.kernel else None)
        cmdline = self._kernel_args.get(node.mac) or env.cmdline or "root=LABEL=root ro"
        await self._with_client(node, "kexec", lambda c: c.kexec(kernel, initrd, cmdline, root=root))

    async def exec(self, nodes: list[Node], command: str, fanout: int = 16, timeout: float = 60.0) -> Any:
        """Run a command on nodes through a tree of deploy agents (TakTuk-like); per-node results, grouped."""
        from broadcast.texec import tree_exec

        targets = [Target.from_node(n, self._ports.get(n.mac, (self.config.deploy.ssh_port, 0))[0]) for n in nodes]
        return await tree_exec(command, targets, self.key, fanout=fanout, timeout=timeout)

    async def soft_reboot(self, node: Node) -> None:
        """Reboot over SSH through the agent's reboot operation (the deploy agent, or an installed system running it)."""
        # One try: an unreachable node goes straight up the ladder to the BMC.
        await self._with_client(node, "soft reboot", lambda c: c.reboot(), connect_tries=1)

    async def probe_installed(self, node: Node) -> str | None:
        """Read the stamp the post-install wrote into the installed system, over its own SSH server (port
        deploy.ssh_port, the deploy key the post-install added to root's authorized_keys): its environment, or None.

        The whole probe has one deadline: a system still starting can accept the TCP connection and then stall the
        SSH exchange (seen on a first boot generating its host keys); the next probe tries again.
        """
        client = AgentClient(str(node.ip), self.config.deploy.ssh_port, self.key,
                             connect_timeout=min(self.connect_timeout, PROBE_CONNECT_TIMEOUT_S))
        try:
            async with asyncio.timeout(PROBE_TOTAL_S):
                await client.connect(self._connects, self._handshakes)
                try:
                    result = await client.run(f"cat {STAMP_PATH}", timeout=PROBE_CONNECT_TIMEOUT_S)
                finally:
                    await client.close()
        except (OSError, asyncssh.Error, asyncio.TimeoutError, AgentError):
            client.abort()
            return None  # not up yet (or not reachable): the next probe, or the deadline, will tell
        if result.status != 0:
            return None
        try:
            stamp = json.loads(result.stdout)
        except ValueError:
            return None
        env = stamp.get("env") if isinstance(stamp, dict) else None
        return env if isinstance(env, str) and env else None
