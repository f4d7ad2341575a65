"""Tree remote execution (TakTuk-like): run one command on N nodes through a tree of deploy agents.

The appliance opens SSH connections to the roots of a forest (topology-ordered, `fanout` children per
node) and runs `rackboot-agent texec` on each, sending one `texec` request line with that node's subtree.
Each agent runs the command locally and, at the same time, opens the next level itself (with its tree
key) and forwards every result line from below as soon as it arrives, so a slow node never holds back
its neighbours or its subtree. Per node: exit status, stdout, stderr, timed out, error.

Faults: a child that cannot be reached within connect_timeout is reported (`unreachable`) and its
children are adopted (the parent connects to them itself). An agent without a tree key (e.g. an
installed system's) runs the command and hands its children back (`xadopt`): its parent opens them. A child whose connection breaks or that does
not finish within its deadline gets its unreported nodes reported as lost; they are not run twice.
Messages are the JSON lines of broadcast.wire (`texec`, `xresult`, `xadopt`, `xdone`), never pickle.
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import asyncssh
from ClusterShell.NodeSet import NodeSet

from domain.errors import MalformedPacket
from domain.aio import within
from broadcast.agent_client import AGENT_COMMAND, ssh_connect
from broadcast.builtin import Builtin, BuiltinAnswer
from broadcast.errors import describe_error
from broadcast.topology import Subtree, Target, build_forest, order_chain
from broadcast.wire import VERSION, SocketFactory, decode, encode

Emit = Callable[[dict[str, Any]], None]
ROOT = "@root"


@dataclass(frozen=True)
class ExecContext:
    """What an agent serving `rackboot-agent texec` provides: who it is, its tree key, how and where commands run."""

    name: str  # this node's name (the root of the subtree it is asked to run)
    tree_key: asyncssh.SSHKey | None  # opens the next level; None: the children are handed back to the parent
    env: dict[str, str]  # the environment the command runs with
    shell: Sequence[str] = ("/bin/sh", "-c")
    shell_prefix: Sequence[str] = ()  # e.g. ("ip", "netns", "exec", NS) in the vm-testbed
    workdir: str | None = None  # the command's working directory
    socket_factory: SocketFactory | None = None  # opens the next level's connections (inside the node's namespace)
    builtin: Builtin | None = None  # answers some commands in process (the vm-testbed); None: every command runs the shell


@dataclass
class ExecNodeResult:
    """One node's outcome."""

    name: str
    status: int | None = None  # exit status; None when the command did not complete
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    error: str | None = None  # unreachable, lost, ... (the command did not run or was not reported)
    duration: float = 0.0
    via: str = ""  # the agent (or the root) that reported it

    @property
    def ok(self) -> bool:
        """Exit status 0, no timeout, no error."""
        return self.status == 0 and not self.timed_out and self.error is None

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


@dataclass
class ExecResult:
    """Every node's outcome, and the same grouped by identical output (ClusterShell style)."""

    command: str
    nodes: dict[str, ExecNodeResult]
    seconds: float = 0.0

    @property
    def ok(self) -> list[str]:
        """Names of nodes where the command exited 0."""
        return [n for n, r in self.nodes.items() if r.ok]

    @property
    def failed(self) -> list[str]:
        """Names of the others."""
        return [n for n, r in self.nodes.items() if not r.ok]

    def grouped(self) -> list[tuple[str, ExecNodeResult]]:
        """[(folded node set, a representative result)] for each distinct (status, output, error)."""
        groups: dict[tuple[Any, ...], list[str]] = {}
        for name, r in self.nodes.items():
            key = (r.status, r.timed_out, r.error, r.stdout, r.stderr)
            groups.setdefault(key, []).append(name)
        out = []
        for key, names in groups.items():
            r = self.nodes[names[0]]
            out.append((str(NodeSet.fromlist(names)), r))
        return sorted(out, key=lambda g: (not g[1].ok, g[0]))

    def format(self) -> str:
        """Text like `clush -b`: one block per distinct output."""
        blocks = []
        for nodes, r in self.grouped():
            if r.error:
                what = f"error: {r.error}"
            elif r.timed_out:
                what = "timed out"
            else:
                what = f"exit {r.status}"
            body = r.stdout + (r.stderr if r.stderr else "")
            blocks.append(f"---------------\n{nodes} ({what})\n---------------\n{body}".rstrip("\n"))
        return "\n".join(blocks) + "\n"

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"command": self.command, "seconds": self.seconds, "ok": self.ok, "failed": self.failed,
                "nodes": {n: r.to_json() for n, r in self.nodes.items()}}


def _result_from(msg: dict[str, Any]) -> ExecNodeResult:
    return ExecNodeResult(name=msg["node"], status=msg["status"], stdout=msg["stdout"], stderr=msg["stderr"],
                          timed_out=msg["timed_out"], error=msg["error"], duration=float(msg["duration"]), via=msg["via"])


def _xresult(node: str, via: str, *, status: int | None = None, stdout: str = "", stderr: str = "",
             timed_out: bool = False, error: str | None = None, duration: float = 0.0) -> dict[str, Any]:
    return {"type": "xresult", "node": node, "status": status, "stdout": stdout, "stderr": stderr,
            "timed_out": timed_out, "error": error, "duration": round(duration, 6), "via": via}


def subtree_deadline(req: dict[str, Any], depth: int) -> float:
    """How long a parent waits for a whole subtree: the command timeout plus a connect per level, plus slack."""
    return float(req["timeout"]) + float(req["connect_timeout"]) * (depth + 1) + 2.0


class Level:
    """Opens the next level of the tree from one place (the root, or an agent) and forwards results."""

    def __init__(self, me: str, key: asyncssh.SSHKey | None, req: dict[str, Any], emit: Emit,
                 socket_factory: SocketFactory | None = None, username: str = "root") -> None:
        self.me = me
        self.key = key
        self.req = req
        self.emit = emit
        self.socket_factory = socket_factory
        self.username = username

    async def run(self, subtrees: Sequence[Subtree]) -> None:
        """Handle every subtree concurrently; returns when each has reported (or been reported lost)."""
        if self.key is None and subtrees:
            # No key to open the next level from here: the parent (which has one) adopts these subtrees.
            self.emit({"type": "xadopt", "node": self.me, "trees": [st.to_json() for st in subtrees]})
            return
        await asyncio.gather(*(self._child(st) for st in subtrees))

    async def _child(self, st: Subtree) -> None:
        target = st.root
        connect_timeout = float(self.req["connect_timeout"])
        try:
            conn = await ssh_connect(target.host, target.port, self.key, username=self.username,
                                     timeout=connect_timeout, socket_factory=self.socket_factory)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            self.emit(_xresult(st.name, self.me, error=f"unreachable: {describe_error(exc)}"))
            await self.run(st.children())  # adopt its children
            return
        names = set(st.names())
        reported: set[str] = set()
        adopted: list[asyncio.Task[None]] = []
        problem = ""
        try:
            async with conn:
                proc = await conn.create_process(f"{AGENT_COMMAND} texec", encoding=None)
                proc.stdin.write(encode("texec", **{**{k: v for k, v in self.req.items() if k != "type"}, "tree": st.to_json()}))
                proc.stdin.write_eof()
                deadline = subtree_deadline(self.req, st.depth())
                try:
                    await within(self._forward(proc, names, reported, st.name, adopted), deadline)
                    if st.name not in reported or reported != names:
                        problem = f"lost: {st.name} closed the connection before reporting"
                except asyncio.TimeoutError:
                    problem = f"no result within {deadline:g} s (via {st.name})"
                proc.close()
        except (OSError, asyncssh.Error, MalformedPacket) as exc:
            problem = f"lost: connection to {st.name} failed: {exc}"
        if problem:
            for name in names:
                if name not in reported:
                    self.emit(_xresult(name, self.me, error=problem))
        await asyncio.gather(*adopted)

    async def _forward(self, proc: asyncssh.SSHClientProcess[bytes], names: set[str], reported: set[str], child: str,
                       adopted: list[asyncio.Task[None]]) -> None:
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            msg = decode(line.rstrip(b"\n"))
            if msg["type"] not in ("xresult", "xdone", "xadopt"):
                raise MalformedPacket(f"unexpected {msg['type']} from {child}")
            if msg["node"] not in names:
                raise MalformedPacket(f"{child} reported for {msg['node']}, outside its subtree")
            if msg["type"] == "xadopt":
                trees = [Subtree.from_json(t) for t in msg["trees"]]
                handed = {n for t in trees for n in t.names()}
                if not handed <= names - reported - {msg["node"]}:
                    raise MalformedPacket(f"{child} handed back nodes outside its unreported subtree")
                names -= handed  # this level reports them now, through its own connections
                adopted.append(asyncio.ensure_future(self.run(trees)))
            elif msg["type"] == "xresult":
                if msg["node"] not in reported:
                    reported.add(msg["node"])
                    self.emit(msg)
            elif msg["node"] == child:  # xdone of the whole subtree
                return


async def run_local(command: str, timeout: float, max_output: int, *, shell: Sequence[str] = ("/bin/sh", "-c"),
                    prefix: Sequence[str] = (), env: dict[str, str] | None = None, cwd: str | None = None) -> dict[str, Any]:
    """Run one command here with a timeout (the whole process group is killed); return xresult fields."""
    t0 = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(*prefix, *shell, command, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    env=env, cwd=cwd, start_new_session=True)
    except OSError as exc:
        return {"status": None, "stdout": "", "stderr": "", "timed_out": False, "error": f"cannot run: {exc.strerror}",
                "duration": time.monotonic() - t0}
    timed_out = False
    try:
        out, err = await within(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        timed_out = True
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        out, err = await proc.communicate()
    return {"status": None if timed_out else proc.returncode, "stdout": out[:max_output].decode(errors="replace"),
            "stderr": err[:max_output].decode(errors="replace"), "timed_out": timed_out, "error": None,
            "duration": time.monotonic() - t0}


def builtin_fields(answer: BuiltinAnswer, max_output: int) -> dict[str, Any]:
    """The xresult fields of a command answered in process (no process, no duration)."""
    return {"status": answer.status, "stdout": answer.stdout[:max_output].decode(errors="replace"),
            "stderr": answer.stderr[:max_output].decode(errors="replace"), "timed_out": False, "error": None, "duration": 0.0}


async def serve_texec(ctx: ExecContext, process: asyncssh.SSHServerProcess[bytes]) -> None:
    """Agent side of `rackboot-agent texec`: run locally, open the next level, stream results upward."""
    try:
        line = await within(process.stdin.readline(), 30)
        req = decode(line.rstrip(b"\n"))
        if req["type"] != "texec":
            raise MalformedPacket("expected a texec request")
        tree = Subtree.from_json(req["tree"])
        if tree.name != ctx.name:
            raise MalformedPacket(f"request for {tree.name} reached {ctx.name}")
    except (MalformedPacket, asyncio.TimeoutError) as exc:
        process.stderr.write(f"texec: {exc}\n".encode())
        process.exit(2)
        return

    def emit(msg: dict[str, Any]) -> None:
        kind = msg.pop("type")
        process.stdout.write(encode(kind, **msg))

    async def local() -> None:
        answer = ctx.builtin(req["command"]) if ctx.builtin is not None else None
        if answer is not None:
            emit(_xresult(ctx.name, ctx.name, **builtin_fields(answer, int(req["max_output"]))))
            return
        fields = await run_local(req["command"], float(req["timeout"]), int(req["max_output"]), shell=ctx.shell,
                                 prefix=ctx.shell_prefix, env=ctx.env, cwd=ctx.workdir)
        emit(_xresult(ctx.name, ctx.name, **fields))

    level = Level(ctx.name, ctx.tree_key, req, emit, ctx.socket_factory)
    try:
        await asyncio.gather(local(), level.run(tree.children()))
        emit({"type": "xdone", "node": ctx.name})
        await process.stdout.drain()
        process.exit(0)
    except (BrokenPipeError, ConnectionError, asyncssh.Error):
        process.exit(255)


async def tree_exec(command: str, targets: Sequence[Target], client_key: asyncssh.SSHKey | str, *, fanout: int = 16,
                    timeout: float = 60.0, connect_timeout: float = 5.0, max_output: int = 64 * 1024,
                    username: str = "root", order: bool = True, socket_factory: SocketFactory | None = None,
                    on_result: Callable[[ExecNodeResult], None] | None = None) -> ExecResult:
    """Run command on every target (Target.port is the agent's SSH port) through a tree; never raises per node."""
    key = asyncssh.read_private_key(client_key) if isinstance(client_key, str) else client_key
    ordered = order_chain(targets) if order else list(targets)
    forest = build_forest(ordered, max(1, fanout))
    req = {"type": "texec", "v": VERSION, "id": uuid.uuid4().hex, "command": command, "timeout": float(timeout),
           "fanout": int(fanout), "connect_timeout": float(connect_timeout), "tree": [], "max_output": int(max_output)}
    results: dict[str, ExecNodeResult] = {}
    t0 = time.monotonic()

    def emit(msg: dict[str, Any]) -> None:
        r = _result_from(msg)
        if r.name not in results:
            results[r.name] = r
            if on_result is not None:
                on_result(r)

    await Level(ROOT, key, req, emit, socket_factory, username).run(forest)
    for t in targets:  # every node gets an answer, whatever happened
        results.setdefault(t.name, ExecNodeResult(name=t.name, error="no result", via=ROOT))
    return ExecResult(command=command, nodes={t.name: results[t.name] for t in targets}, seconds=time.monotonic() - t0)
