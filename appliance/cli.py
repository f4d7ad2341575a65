"""The `rackboot` command: serve the appliance, check a config, show nodes, drive the vm-testbed and the demo."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import NoReturn

from appliance.config import load_config, summarize
from domain.errors import BindError, ConfigError

COMMAND_PLUGINS = "rackboot.commands"  # entry point group: callables that add subcommands to the parser


def _cmd_serve(args: argparse.Namespace) -> int:
    from appliance.app import serve_forever

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    try:
        asyncio.run(serve_forever(config))
    except BindError as exc:
        print(f"rackboot: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    print(summarize(config))
    if not args.host:
        return 0
    from appliance.hostcheck import check_host

    problems = check_host(config)
    for problem in problems:
        print(f"{args.config}: host: {problem}", file=sys.stderr)
    if not problems:
        print("host: the interface, its address, the NBPs, the deploy environment and the ports are ready")
    return 1 if any(p.severity == "error" for p in problems) else 0


def _cmd_install_service(args: argparse.Namespace) -> int:
    from importlib import resources

    config = Path(args.config).resolve()
    try:
        state_dir = load_config(config).state_dir
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    executable = Path(sys.argv[0]).resolve() if Path(sys.argv[0]).name == "rackboot" else Path(sys.executable).with_name("rackboot")
    unit = (resources.files("appliance").joinpath("data", "rackboot.service").read_text()
            .replace("@EXEC@", str(executable)).replace("@CONFIG@", str(config)).replace("@STATE@", str(state_dir)))
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(unit)
    except OSError as exc:
        print(f"rackboot: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}; then: systemctl daemon-reload && systemctl enable --now {out.stem}")
    return 0


def _print_problems(exc: ConfigError) -> None:
    print(f"rackboot: invalid configuration ({len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}):", file=sys.stderr)
    for p in exc.problems:
        print(f"  {p}", file=sys.stderr)


def _cmd_nodes(args: argparse.Namespace) -> int:
    from appliance.client import resolve_endpoint

    server, token = resolve_endpoint(args)
    url = server + "/api/v1/nodes"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            nodes = json.load(resp)
    except (urllib.error.URLError, OSError) as exc:
        print(f"rackboot: cannot reach the appliance at {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(nodes, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="nodes")
    for col in ("name", "mac", "ip", "rack", "profile", "last events"):
        table.add_column(col)
    now = time.time()
    for n in nodes.get("nodes", nodes) if isinstance(nodes, dict) else nodes:
        events = n.get("events", [])[-args.events :]
        evtext = ", ".join(f"{e['kind']} ({now - e['ts']:.0f}s ago)" for e in events) or "-"
        profile = n.get("profile", {}) or {}
        table.add_row(n["name"], n["mac"], n["ip"], n.get("rack", ""), str(profile.get("kind", "")), evtext)
    Console(width=200).print(table)
    return 0


def _version() -> str:
    try:
        return version("rackboot")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


EXIT_USAGE = 64  # sysexits.h EX_USAGE: a wrong command line, never confused with 2 ("some nodes failed")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits EXIT_USAGE (argparse's own 2 means "some nodes failed" here)."""

    def error(self, message: str) -> NoReturn:
        """Print the usage and the error; exit EXIT_USAGE."""
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of every rackboot subcommand (their parsers are of the same class)."""
    parser = _Parser(prog="rackboot", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"rackboot {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the appliance (DHCP, TFTP, HTTP/iPXE, DNS) on the configured interface")
    p.add_argument("--config", "-c", required=True, help="the appliance config (rackboot.yaml)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("check-config", help="validate the config and the node inventory, print a summary")
    p.add_argument("--config", "-c", required=True, help="the appliance config (rackboot.yaml)")
    p.add_argument("--host", action="store_true",
                   help="also check this machine: the interface and its address, NBPs, deploy environment, free ports")
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("install-service", help="write a systemd unit (Type=notify, watchdog, hardened) that serves this config")
    p.add_argument("--config", "-c", required=True, help="the appliance config the service serves")
    p.add_argument("--out", default="/etc/systemd/system/rackboot.service", help="where the unit goes")
    p.set_defaults(func=_cmd_install_service)

    p = sub.add_parser("nodes", help="show each node's boot profile and last boot events")
    p.add_argument("--server", help="appliance URL (default: $RACKBOOT_SERVER, client.yaml, or from --config)")
    p.add_argument("--token", help="API token (default: $RACKBOOT_TOKEN, client.yaml, or STATE_DIR/admin.token)")
    p.add_argument("--config", "-c", help="the appliance config, for its URL and admin token")
    p.add_argument("--events", type=int, default=4, help="how many last events to show per node")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_nodes)

    from appliance.client import register as register_client

    register_client(sub)
    for plugin in entry_points(group=COMMAND_PLUGINS):
        # More subcommands from installed packages (the vm-testbed's `testbed` and `demo`): they plug in here,
        # so the appliance never imports them.
        try:
            register = plugin.load()
        except ImportError as exc:
            logging.getLogger("rackboot").debug("command plugin %s not loaded: %s", plugin.name, exc)
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the rackboot console script."""
    # asyncssh 2.24 names cryptography's DSA classes, which cryptography 48+ deprecates when they are touched: five
    # warnings at each start, for asyncssh's maintainers, not for an operator (the keys rackboot makes are ed25519).
    warnings.filterwarnings("ignore", message="DSA is deprecated", module="asyncssh")
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * args.verbose if args.verbose else logging.WARNING
    if args.command == "serve":
        level = logging.DEBUG if args.verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
