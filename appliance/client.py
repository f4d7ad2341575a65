"""The CLI side of the REST API: `rackboot deploy|reboot|power|env|stats|user|deployments|cancel`.

Server URL and token come from flags, then RACKBOOT_SERVER / RACKBOOT_TOKEN, then ~/.config/rackboot/client.yaml
(`server:`, `token:`), then the appliance config given with --config (its URL, and STATE_DIR/admin.token when
readable, i.e. when run as root on the appliance).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from ClusterShell.NodeSet import NodeSet, NodeSetParseError

EXIT_OK, EXIT_ERROR, EXIT_SOME_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 130


class ClientError(Exception):
    """The API answered with an error, or could not be reached."""


def resolve_endpoint(args: argparse.Namespace) -> tuple[str, str]:
    """Return (server URL, token) from flags, environment, client config or appliance config."""
    server, token = getattr(args, "server", None), getattr(args, "token", None)
    server = server or os.environ.get("RACKBOOT_SERVER")
    token = token or os.environ.get("RACKBOOT_TOKEN")
    client_cfg = Path(os.environ.get("RACKBOOT_CLIENT_CONFIG", Path.home() / ".config/rackboot/client.yaml"))
    if (not server or not token) and client_cfg.is_file():
        data = yaml.safe_load(client_cfg.read_text()) or {}
        server = server or data.get("server")
        token = token or data.get("token")
    if (not server or not token) and getattr(args, "config", None):
        from appliance.config import load_config

        cfg = load_config(args.config)
        server = server or cfg.http_base
        admin = cfg.state_dir / "admin.token"
        if not token and os.access(admin, os.R_OK):
            token = admin.read_text().strip()
    return (server or "http://127.0.0.1:8080").rstrip("/"), token or ""


class Api:
    """A small async client of /api/v1."""

    def __init__(self, server: str, token: str) -> None:
        self.server = server
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.session = aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    async def __aenter__(self) -> "Api":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        """Call the API; raise ClientError with the server's message on an error status."""
        try:
            async with self.session.request(method, self.server + path, **kw) as resp:
                text = await resp.text()
                data = json.loads(text) if resp.content_type == "application/json" else text
                if resp.status >= 400:
                    msg = data.get("error", text) if isinstance(data, dict) else text
                    raise ClientError(f"{resp.status}: {msg}")
                return data
        except aiohttp.ClientError as exc:
            raise ClientError(f"cannot reach the appliance at {self.server}: {exc}") from exc

    async def stream(self, path: str) -> Any:
        """Yield JSON lines of a streaming endpoint."""
        async with self.session.get(self.server + path) as resp:
            if resp.status >= 400:
                raise ClientError(f"{resp.status}: {await resp.text()}")
            # Lines split here, not by StreamReader's readline: it refuses a line longer than 512 KiB, and the
            # result of a deployment of a few thousand nodes is one longer line.
            pending = bytearray()
            async for chunk in resp.content.iter_any():
                pending += chunk
                if b"\n" not in chunk:
                    continue
                *lines, rest = pending.split(b"\n")
                pending = bytearray(rest)
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
            if pending.strip():
                yield json.loads(pending)


def _print_report(result: dict[str, Any], args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    ok, ko = result["ok"], result["ko"]
    if getattr(args, "ok_file", None):
        Path(args.ok_file).write_text("".join(n + "\n" for n in ok))
    if getattr(args, "ko_file", None):
        Path(args.ko_file).write_text("".join(k["node"] + "\n" for k in ko))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        console = Console(width=160)
        if ko:
            table = Table(title=f"deployment {result['id']}: failed nodes")
            for col in ("nodes", "step", "impl", "reason"):
                table.add_column(col)
            grouped: dict[tuple[str, str, str], list[str]] = {}
            for k in ko:
                grouped.setdefault((k["step"], k["impl"], k["reason"]), []).append(k["node"])
            from ClusterShell.NodeSet import NodeSet

            for (step, impl, reason), names in grouped.items():
                table.add_row(str(NodeSet.fromlist(names)), step, impl, reason)
            console.print(table)
        print(f"ok: {result['ok_nodeset'] or '-'}")
        print(f"ko: {result['ko_nodeset'] or '-'}")
        print(f"deployed {len(ok)}/{len(ok) + len(ko)} nodes ({result['env']}, {result['status']})")
        if result.get("error"):
            print(f"the deployment stopped on an {result['error']}", file=sys.stderr)
    return EXIT_OK if not ko else EXIT_SOME_FAILED


def read_public_keys(path: str) -> list[str]:
    """The public keys of a file (one per line, comments and blank lines skipped), or of ~/.ssh/id_*.pub."""
    files = [Path(path).expanduser()] if path else sorted((Path.home() / ".ssh").glob("id_*.pub"))
    if not files:
        raise ClientError("no ~/.ssh/id_*.pub to install: give a file to -k")
    keys = []
    for file in files:
        try:
            text = file.read_text()
        except OSError as exc:
            raise ClientError(f"cannot read {file}: {exc.strerror or exc}") from None
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return keys


async def _deploy(args: argparse.Namespace, api: Api) -> int:
    body: dict[str, Any] = {"nodes": node_set(args), "env": args.env, "broadcast": args.broadcast, "force": args.force}
    if args.steps:
        body["steps"] = args.steps
    if args.key is not None:
        body["ssh_keys"] = read_public_keys(args.key)
    if args.no_wait:
        dep = await _start_deployment(args, api, body)
        print(dep["id"])
        return EXIT_OK
    from appliance.progress import DeployProgress

    ctrl_c = _CtrlC(api)
    with ctrl_c.installed():  # from before the request: a Ctrl-C while it is made cancels the deployment it makes
        dep = await _start_deployment(args, api, body)
        # Progress goes to stderr (stdout keeps the report, or the JSON): live on a terminal, plain lines elsewhere.
        view = DeployProgress([n["node"] for n in dep["nodes"]], sys.stderr, live=None if not args.verbose else False)
        with contextlib.nullcontext() if args.json else view:
            follow = asyncio.ensure_future(_follow(args, api, dep["id"], view))
            ctrl_c.following(dep["id"], follow, view if not args.json else None)
            try:
                result = await follow
            except asyncio.CancelledError:
                if not ctrl_c.pressed:
                    raise
                result = None
    if result is None and ctrl_c.pressed > 1:
        print(f"rackboot: stopped following deployment {dep['id']}; `rackboot deployments {dep['id']}` shows it",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if result is None:
        result = await api.call("GET", f"/api/v1/deployments/{dep['id']}")
    return _print_report(result, args)


async def _start_deployment(args: argparse.Namespace, api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """Ask the appliance for the deployment; say which on stderr (not with --json)."""
    dep: dict[str, Any] = await api.call("POST", "/api/v1/deployments", json=body)
    if not args.json:
        print(f"deployment {dep['id']}: {dep['env']} on {len(dep['nodes'])} nodes", file=sys.stderr)
    return dep


async def _follow(args: argparse.Namespace, api: Api, dep_id: str, view: Any) -> dict[str, Any] | None:
    """Show a deployment's events until its result; return the result (None if the stream ended without one)."""
    async for entry in api.stream(f"/api/v1/deployments/{dep_id}/events"):
        if entry.get("what") == "result":
            return dict(entry["result"])
        if args.verbose and not args.json:
            detail = " ".join(f"{k}={v}" for k, v in entry.items() if k not in ("ts", "node", "what") and v)
            print(f"  {entry.get('node') or '*':12} {entry['what']:14} {detail}", file=sys.stderr)
        elif not args.json:
            view.feed(entry)
    return None


class _CtrlC:
    """Ctrl-C while `rackboot deploy` follows a deployment: the first cancels it, and its report follows (as the
    operator of kadeploy3 expects); a second stops following at once and leaves the cancel to the appliance."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.pressed = 0
        self.dep_id = ""
        self.follow: asyncio.Future[Any] | None = None
        self.view: Any = None
        self._cancel: asyncio.Task[None] | None = None

    def following(self, dep_id: str, follow: asyncio.Future[Any], view: Any) -> None:
        """The deployment is made and followed by `follow`: a Ctrl-C pressed before now cancels it now."""
        self.dep_id, self.follow, self.view = dep_id, follow, view
        if self.pressed:
            self._cancel_now()

    @contextlib.contextmanager
    def installed(self) -> Any:
        """SIGINT goes to this object while the block runs (where the loop can take signals)."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, self._pressed)
        except (NotImplementedError, RuntimeError):  # no signals on this loop: Ctrl-C quits as before
            yield self
            return
        try:
            yield self
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    def _say(self, text: str) -> None:
        if self.view is not None:
            self.view.note(text)
        else:
            print(f"rackboot: {text}", file=sys.stderr, flush=True)

    def _pressed(self) -> None:
        self.pressed += 1
        if not self.dep_id:  # the request is on its way: cancelled once the appliance has made it
            return
        if self.pressed == 1:
            self._cancel_now()
        elif self.follow is not None:
            self.follow.cancel()

    def _cancel_now(self) -> None:
        self._say(f"Ctrl-C: cancelling deployment {self.dep_id}; its report follows (Ctrl-C again to stop waiting)")
        self._cancel = asyncio.ensure_future(self._cancel_deployment())

    async def _cancel_deployment(self) -> None:
        try:
            await self.api.call("DELETE", f"/api/v1/deployments/{self.dep_id}")
        except ClientError as exc:  # it finished meanwhile (409), or the appliance is gone: the stream tells
            self._say(f"cancelling {self.dep_id}: {exc}")


async def _reboot(args: argparse.Namespace, api: Api) -> int:
    out = await api.call("POST", "/api/v1/reboot", json={"nodes": node_set(args), "to": args.to or "", "level": args.level, "force": args.force})
    return _results(out["results"], args, lambda r: r.get("reason") or r.get("stage", ""))


async def _power(args: argparse.Namespace, api: Api) -> int:
    out = await api.call("POST", "/api/v1/power", json={"nodes": node_set(args), "op": args.op, "force": args.force})
    return _results(out["results"], args, lambda r: r.get("state") or r.get("error", ""))


def _results(results: list[dict[str, Any]], args: argparse.Namespace, text: Any) -> int:
    from ClusterShell.NodeSet import NodeSet

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        grouped: dict[tuple[bool, str], list[str]] = {}
        for r in results:
            grouped.setdefault((r["ok"], text(r)), []).append(r["node"])
        for (ok, msg), names in sorted(grouped.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            print(f"{NodeSet.fromlist(names)}: {'ok' if ok else 'FAILED'} {msg}".rstrip())
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_SOME_FAILED


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print the API's answer as JSON with --json, else the human text (every command prints one or the other)."""
    print(json.dumps(data, indent=2) if args.json else text)


def _human(data: Any) -> str:
    """A readable rendering of a JSON answer (YAML block style, keys in the API's order)."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip()


async def _env(args: argparse.Namespace, api: Api) -> int:
    if args.env_cmd == "list":
        envs = (await api.call("GET", "/api/v1/environments"))["environments"]
        _emit(args, envs, "\n".join(f"{e['name']}:{e['version']:<4} {e['owner']:10} {e['visibility']:8} {e['image_kind']}/{e['compression']:5} "
                                    f"{e['size']:>12}  {e['description']}" for e in envs))
        return EXIT_OK
    if args.env_cmd == "show":
        env = await api.call("GET", f"/api/v1/environments/{args.ref}")
        _emit(args, env, _human(env))
        return EXIT_OK
    if args.env_cmd == "rm":
        out = await api.call("DELETE", f"/api/v1/environments/{args.ref}")
        _emit(args, out, f"{out['removed']} removed")
        return EXIT_OK
    desc = Path(args.file)
    data = yaml.safe_load(desc.read_text()) or {}
    form = aiohttp.FormData()
    form.add_field("description", desc.read_bytes(), filename=desc.name, content_type="application/yaml")
    image = (data.get("image") or {}).get("file")
    handle = None
    if image:
        path = (desc.parent / image).resolve()
        if not path.is_file():
            raise ClientError(f"{desc}: image file {path} not found")
        handle = open(path, "rb")
        form.add_field("image", handle, filename=path.name, content_type="application/octet-stream")
    try:
        env = await api.call("POST", "/api/v1/environments", data=form)
    finally:
        if handle:
            handle.close()
    _emit(args, env, f"added {env['name']}:{env['version']} sha256={env['sha256']} size={env['size']}")
    return EXIT_OK


async def _stats(args: argparse.Namespace, api: Api) -> int:
    if args.svg:
        if not args.deployment:
            raise ClientError("--svg draws one deployment: give --deployment ID")
        from appliance.bootstages import boot_records
        from appliance.timeline import gantt_svg

        moves = await api.call("GET", f"/api/v1/deployments/{args.deployment}/transitions")
        nodes = await api.call("GET", "/api/v1/nodes")  # their boot records, for the boot-stage lane
        records = boot_records(nodes["nodes"])
        Path(args.svg).write_text(gantt_svg(moves["transitions"], f"deployment {args.deployment}", records))
        _emit(args, {"svg": args.svg, "transitions": len(moves["transitions"])},
              f"{args.svg}: the per-node timeline of {args.deployment} ({len(moves['transitions'])} transitions)")
        return EXIT_OK
    query = f"?deployment={args.deployment}" if args.deployment else ""
    if args.csv:
        print(await api.call("GET", "/api/v1/stats" + (query + "&" if query else "?") + "format=csv"), end="")
        return EXIT_OK
    data = await api.call("GET", "/api/v1/stats" + query)
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    for step, s in data["summary"].items():
        print(f"{step:18} attempts={s['attempts']:<5} failures={s['failures']:<5} total={s['total_s']:.1f}s max={s['max_s']:.1f}s")
    return EXIT_OK


async def _user(args: argparse.Namespace, api: Api) -> int:
    if args.user_cmd == "list":
        users = (await api.call("GET", "/api/v1/users"))["users"]
        _emit(args, users, _human(users))
    elif args.user_cmd == "add":
        out = await api.call("POST", "/api/v1/users", json={"name": args.name, "admin": args.admin})
        _emit(args, out, out["token"])  # the token alone: `TOKEN=$(rackboot user add bob)`
    elif args.user_cmd == "rm":
        out = await api.call("DELETE", f"/api/v1/users/{args.name}")
        _emit(args, out, f"{args.name} removed")
    elif args.user_cmd == "revoke":
        out = await api.call("DELETE", f"/api/v1/users/{args.name}/rights", json={"nodes": node_set(args)})
        if not out["revoked"]:
            if args.json:
                print(json.dumps(out, indent=2))
            print(f"rackboot: {args.name} had no rights on exactly {out['nodes']}", file=sys.stderr)
            return EXIT_ERROR
        _emit(args, out, f"{args.name}: rights on {out['nodes']} revoked")
    else:
        out = await api.call("POST", f"/api/v1/users/{args.name}/rights", json={"nodes": node_set(args), "perms": args.rights.split(",")})
        _emit(args, out, f"{args.name}: {args.rights} on {node_set(args)}")
    return EXIT_OK


async def _exec(args: argparse.Namespace, api: Api) -> int:
    command = " ".join(args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd)
    out = await api.call("POST", "/api/v1/exec", json={"nodes": node_set(args), "command": command, "fanout": args.fanout,
                                                      "timeout": args.timeout})
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for names, r in out["grouped"]:
            head = f"---------------- {names} ----------------"
            status = "timed out" if r["timed_out"] else (r["error"] or f"exit {r['status']}")
            print(f"{head}\n{status}")
            if r["stdout"]:
                print(r["stdout"], end="" if r["stdout"].endswith("\n") else "\n")
            if r["stderr"]:
                print(r["stderr"], end="" if r["stderr"].endswith("\n") else "\n", file=sys.stderr)
    return EXIT_OK if not out.get("failed") else EXIT_SOME_FAILED


async def _deployments(args: argparse.Namespace, api: Api) -> int:
    if args.events:
        if not args.id:
            raise ClientError("--events needs a deployment ID")
        async for entry in api.stream(f"/api/v1/deployments/{args.id}/events"):
            print(json.dumps(entry))
        return EXIT_OK
    if args.id:
        dep = await api.call("GET", f"/api/v1/deployments/{args.id}")
        _emit(args, dep, _human(dep))
        return EXIT_OK
    deps = (await api.call("GET", "/api/v1/deployments"))["deployments"]
    _emit(args, deps, "\n".join(f"{d['id']:26} {d['status']:10} {d['env']:16} {d['node_count']:>5} nodes  {d['user']}" for d in deps))
    return EXIT_OK


async def _cancel(args: argparse.Namespace, api: Api) -> int:
    out = await api.call("DELETE", f"/api/v1/deployments/{args.id}")
    _emit(args, out, f"{args.id} cancelled")
    return EXIT_OK


def _run(fn: Any) -> Any:
    def cmd(args: argparse.Namespace) -> int:
        server, token = resolve_endpoint(args)

        async def go() -> int:
            async with Api(server, token) as api:
                return int(await fn(args, api))

        try:
            return asyncio.run(go())
        except ClientError as exc:
            print(f"rackboot: {exc}", file=sys.stderr)
            return EXIT_ERROR
    return cmd


def node_set(args: argparse.Namespace) -> str:
    """The union of every -m NODESET and every node of every -f FILE (one node set per line, as Kadeploy's -f)."""
    nodes = NodeSet()
    try:
        for spec in args.machines or ():
            nodes.update(spec)
        for name in args.node_file or ():
            try:
                lines = Path(name).read_text().split()
            except OSError as exc:
                raise ClientError(f"cannot read node file {name}: {exc.strerror or exc}") from None
            for line in lines:
                nodes.update(line)
    except NodeSetParseError as exc:
        raise ClientError(f"bad node set: {exc}") from None
    if not nodes:
        raise ClientError("no nodes: give -m NODESET (repeatable) or -f FILE")
    return str(nodes)


def build_node_args(machines: list[str], files: list[str]) -> argparse.Namespace:
    """The -m/-f part of a command line, as argparse gives it (for callers that build one)."""
    return argparse.Namespace(machines=machines, node_file=files)


def _machines(p: argparse.ArgumentParser, what: str = "the nodes") -> None:
    p.add_argument("-m", "--machines", action="append", metavar="NODESET",
                   help=f"{what}, a folded node set like node-[1-40]; repeat it for a union")
    p.add_argument("-f", "--node-file", action="append", metavar="FILE",
                   help="nodes listed in a file (node names or node sets, one per line); repeatable")


def register(sub: Any) -> None:
    """Add the API client subcommands to the rackboot parser."""
    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--server", help="appliance URL (default: $RACKBOOT_SERVER, client.yaml, or from --config)")
        p.add_argument("--token", help="API token (default: $RACKBOOT_TOKEN, client.yaml, or STATE_DIR/admin.token)")
        p.add_argument("--config", "-c", help="the appliance config, for its URL and admin token")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                       help="more logging (-vv for debug), here as before the subcommand")
        return p

    p = common(sub.add_parser("deploy", help="deploy an environment on nodes (exit 0: all ok, 2: some failed)"))
    _machines(p)
    p.add_argument("-e", "--env", required=True, help="ENV or ENV:VERSION")
    p.add_argument("--broadcast", choices=("chain", "tree", "star"), default="chain")
    p.add_argument("-o", "--ok-file", help="write the nodes that succeeded here")
    p.add_argument("-n", "--ko-file", help="write the nodes that failed here")
    p.add_argument("--force", action="store_true", help="take nodes from a running deployment")
    p.add_argument("--steps", help="override implementations, e.g. 'BroadcastEnv|star:1:900'")
    p.add_argument("-k", "--key", nargs="?", const="", metavar="FILE",
                   help="install public SSH keys for root on the deployed nodes: FILE, or ~/.ssh/id_*.pub without FILE")
    p.add_argument("--no-wait", action="store_true", help="print the deployment id and return (without it, the deployment is followed, and Ctrl-C cancels it)")
    p.set_defaults(func=_run(_deploy))

    p = common(sub.add_parser("reboot", help="reboot nodes, optionally into deploy, local or an environment"))
    _machines(p)
    p.add_argument("--to", help="deploy | local | ENV[:VERSION]")
    p.add_argument("--level", choices=("soft", "hard", "very_hard"), default="soft")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_run(_reboot))

    p = common(sub.add_parser("power", help="power nodes on, off, reset, cycle or read their status"))
    _machines(p)
    p.add_argument("op", choices=("on", "off", "reset", "cycle", "status"))
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_run(_power))

    p = sub.add_parser("env", help="the environment catalog")
    esub = p.add_subparsers(dest="env_cmd", required=True)
    common(esub.add_parser("list", help="environments you can see"))
    e = common(esub.add_parser("add", help="add an environment from its description (uploads its image)"))
    e.add_argument("file", help="environment description (YAML)")
    for name in ("show", "rm"):
        e = common(esub.add_parser(name, help=f"{name} an environment"))
        e.add_argument("ref", help="NAME or NAME:VERSION")
    p.set_defaults(func=_run(_env))

    p = common(sub.add_parser("stats", help="durations, retries and errors per deployment, node and step"))
    p.add_argument("--deployment", help="one deployment (ID) only")
    p.add_argument("--csv", action="store_true", help="per node and step, as CSV")
    p.add_argument("--svg", metavar="FILE", help="write the deployment's per-node timeline (a Gantt chart) to FILE")
    p.set_defaults(func=_run(_stats))

    p = sub.add_parser("user", help="users and rights (admin)")
    usub = p.add_subparsers(dest="user_cmd", required=True)
    common(usub.add_parser("list", help="users and their rights"))
    u = common(usub.add_parser("add", help="add a user; prints its API token"))
    u.add_argument("name")
    u.add_argument("--admin", action="store_true")
    u = common(usub.add_parser("rm", help="remove a user"))
    u.add_argument("name")
    u = common(usub.add_parser("grant", help="give a user rights on a node set"))
    u.add_argument("name")
    _machines(u)
    u.add_argument("--rights", default="deploy,reboot,power", help="comma-separated: deploy,reboot,power,console")
    u = common(usub.add_parser("revoke", help="take a user's rights on a node set away (the set as granted)"))
    u.add_argument("name")
    _machines(u)
    p.set_defaults(func=_run(_user))

    p = common(sub.add_parser("exec", help="run a command on nodes through a tree of deploy agents (grouped output)"))
    _machines(p)
    p.add_argument("--fanout", type=int, default=16)
    p.add_argument("--timeout", type=float, default=60.0, help="per-node command timeout (s)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    p.set_defaults(func=_run(_exec))

    p = common(sub.add_parser("deployments", help="list deployments, or show one"))
    p.add_argument("id", nargs="?")
    p.add_argument("--events", action="store_true",
                   help="with ID: its log, a JSON object a line (every boot stage, escalation, window change), to its result")
    p.set_defaults(func=_run(_deployments))

    p = common(sub.add_parser("cancel", help="cancel a running deployment"))
    p.add_argument("id")
    p.set_defaults(func=_run(_cancel))
