"""BMC failures under load: the appliance's real IPMI clients (ipmitool processes, the default, and pyghmi's
in-process client; RMCP+ over UDP) against 30 pyghmi BMCs on loopback, some healthy, slow, refusing or dead; then
the API and the logs, searched for the IPMI passwords. ipmitool also against 100 BMCs, the mix at which pyghmi's
client deadlocks on its own session locks, every pool thread blocked (docs/reliability.md, "BMCs"): pyghmi is
held to 30.

The BMCs are the vm-testbed's (tests/bmc_farm.py), one child process per kind, on 127.R.S.x: a prefix drawn for
this run. The children exit when their stdin closes, on success, failure or Ctrl-C alike.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import secrets
import subprocess
import threading
from collections import Counter
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest

from appliance.api import Api
from appliance.auth import NodeTokens, Users
from appliance.booting import NodeBootTargets
from appliance.catalog import Catalog
from appliance.dashboard import add_dashboard
from appliance.deploy.controller import Controller, ControllerDeps
from appliance.deploy.ipmitool_power import IpmitoolPower
from appliance.deploy.power import PER_BMC, BmcClientMissing, PowerError
from appliance.deploy.pyghmi_power import PyghmiPower
from appliance.deploy.store import DeploymentStore
from appliance.deploy.workflow import default_workflow
from appliance.events import EventBus
from appliance.inventory import Inventory
from appliance.profiles import ProfileStore
from appliance.statedb import open_state_db
from domain.nodes import BmcSpec, Node
from domain.profiles import BootProfile
from fakes import FAST, FakeDeploy
from ipxe.script import ScriptRenderer
from netboot.http import HttpService, HttpSettings
from test_api import _bound

pytestmark = pytest.mark.pyghmi_client  # first in a run: see tests/conftest.py
FARM = Path(__file__).with_name("bmc_farm.py")
PORT = 10623
SLOW_S = 0.4  # hundreds of times a healthy answer, under pyghmi's first retransmission (0.5-1 s): see docs/reliability.md for slower
KINDS = {"ok": 14, "slow": 4, "badpass": 3, "noname": 3, "busy": 3, "dead": 3}
# The mix at which pyghmi's client deadlocked (docs/reliability.md, "BMCs").
KINDS_100 = {"ok": 60, "slow": 10, "badpass": 8, "noname": 7, "busy": 5, "dead": 10}
RETRIES = 3  # the clients' default: tries = retries + 1
CLIENTS: dict[str, Callable[..., IpmitoolPower | PyghmiPower]] = {"ipmitool": IpmitoolPower, "pyghmi": PyghmiPower}
# What each failing kind must say, and what no other kind may.
ERRORS = {"badpass": "authentication refused", "noname": "authentication refused", "busy": "session refused",
          "dead": "unreachable, no answer"}
# The most tries of one call, per kind: a refused login is never retried, silence once, a refused session every time.
MOST_TRIES = {"ok": 1, "slow": 1, "badpass": 1, "noname": 1, "busy": RETRIES + 1, "dead": 2}
# A bound on one call, from the configured timeouts: pyghmi gives a silent BMC up in ~6 s a try (its login
# timeouts, 0.5-1 s growing by 1 s up to maxtimeout 2, for each of its logon tries), ipmitool in ~10 s (-N 2 -R 2),
# the backoff between tries is at most 2 x 0.5 x 2^k s, and a call waits for the calls before it on the same BMC
# (2 ops here).
LOGIN_S = 11.0
CALL_BOUND_S = 2 * (MOST_TRIES["busy"] * LOGIN_S + sum(2 * 0.5 * 2 ** k for k in range(RETRIES)))


async def _start_farm(spec: list[dict[str, Any]], path: Path) -> asyncio.subprocess.Process:
    path.write_text(json.dumps(spec))
    proc = await asyncio.create_subprocess_exec(sys.executable, str(FARM), str(path), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line.strip() == b"ready", line
    return proc


async def _counters(procs: list[asyncio.subprocess.Process]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for proc in procs:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"counters\n")
        await proc.stdin.drain()
        out.update(json.loads(await asyncio.wait_for(proc.stdout.readline(), 10)))
    return out


@pytest.fixture
async def farm(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[list[Node], dict[str, str], list[asyncio.subprocess.Process]]]:
    """30 BMCs (or as many of each kind as the test's `kinds` parameter says) on 127.R.S.x (one farm process per
    kind: pyghmi's server mixes refused sessions with healthy ones in one process); the nodes, each with its own
    credentials file; and the password of every node."""
    kinds: dict[str, int] = getattr(request, "param", KINDS)
    prefix = f"127.{random.randint(2, 250)}.{random.randint(2, 250)}"
    run = secrets.token_hex(3)
    nodes: list[Node] = []
    passwords: dict[str, str] = {}
    specs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    i = 0
    for kind, count in kinds.items():
        for _ in range(count):
            i += 1
            name, address = f"{kind}-{i}", f"{prefix}.{i}"
            passwords[name] = f"pw-{run}-{secrets.token_hex(5)}"  # 20 bytes: IPMI 2.0's most (ipmitool refuses more)
            creds = tmp_path / f"{name}.yaml"
            creds.write_text(f"username: rbadmin\npassword: {passwords[name]}\n")
            specs[kind].append({"address": address, "port": PORT, "kind": kind, "user": "rbadmin", "password": passwords[name],
                                "delay": SLOW_S})
            nodes.append(Node(name=name, mac=f"52:54:00:66:{i // 256:02x}:{i % 256:02x}", ip=ipaddress.IPv4Address(f"10.66.0.{i}"),
                              bmc=BmcSpec("ipmi", address, PORT, creds)))
    procs: list[asyncio.subprocess.Process] = []
    try:
        for kind, spec in specs.items():
            procs.append(await _start_farm(spec, tmp_path / f"farm-{kind}.json"))
        yield nodes, passwords, procs
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _kind(node: Node) -> str:
    return node.name.rsplit("-", 1)[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("client", "farm"), [("ipmitool", KINDS), ("pyghmi", KINDS), ("ipmitool", KINDS_100)],
                         indirect=["farm"], ids=["ipmitool-30", "pyghmi-30", "ipmitool-100"])
async def test_dead_slow_and_refusing_bmcs_under_load(client: str, farm: tuple[list[Node], dict[str, str], list[Any]],
                                                      tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    nodes, passwords, procs = farm
    caplog.set_level(logging.DEBUG)
    ipmi = CLIENTS[client](retries=RETRIES)
    try:
        async def one(node: Node, op: str) -> tuple[str, str, str]:
            try:
                return node.name, op, "ok:" + await ipmi.power(node, op)
            except Exception as exc:  # noqa: BLE001 - every failure is the result under test
                return node.name, op, f"{type(exc).__name__}: {exc}"

        # status and reset on every node at once: two calls per BMC, 60 in all, behind the driver's 32 threads
        calls = [one(n, op) for n in nodes for op in ("status", "reset")]
        results = await asyncio.wait_for(asyncio.gather(*calls), CALL_BOUND_S * len(calls) / 32 + CALL_BOUND_S)
        counters = await _counters(procs)
    finally:
        ipmi.close()
    # What /metrics counts: every call once, by its result; every try.
    kinds = Counter(_kind(n) for n in nodes)
    stats = ipmi.stats()
    assert stats["calls_ok"] == 2 * (kinds["ok"] + kinds["slow"]), stats
    assert stats["calls_auth_refused"] == 2 * (kinds["badpass"] + kinds["noname"]), stats
    assert stats["calls_session_refused"] == 2 * kinds["busy"] and stats["calls_unreachable"] == 2 * kinds["dead"], stats
    assert stats["tries"] == sum(ipmi.attempts.values()) and stats["calls_in_flight"] == 0, stats
    assert ipmi.latency["call_ok"].count == stats["calls_ok"] and ipmi.latency["call_failed"].count == len(results) - stats["calls_ok"]
    by_node: dict[str, list[str]] = {}
    for name, op, outcome in results:
        by_node.setdefault(name, []).append(outcome)
    for node in nodes:
        kind, outcomes = _kind(node), by_node[node.name]
        key = (node.bmc.address, node.bmc.port)  # type: ignore[union-attr]
        if kind in ("ok", "slow"):
            assert outcomes == ["ok:on", "ok:on"], (node.name, outcomes)
            assert ipmi.attempts[key] == 2, (node.name, ipmi.attempts[key])
            assert counters[node.bmc.address]["resets"] == 1, (node.name, counters[node.bmc.address])  # type: ignore[union-attr]
        else:
            want = ERRORS[kind]
            for outcome in outcomes:
                assert want in outcome and node.name in outcome and node.bmc.address in outcome, (node.name, outcome)  # type: ignore[union-attr]
                assert not any(other in outcome for other in set(ERRORS.values()) - {want}), (node.name, outcome)
            if kind in ("badpass", "noname"):  # the first call tries once; the second does not try the same credentials
                assert ipmi.attempts[key] == 1, (node.name, ipmi.attempts[key])
                assert sorted("1 try" in o for o in outcomes) == [False, True], (node.name, outcomes)
                assert any("not tried again" in o for o in outcomes), (node.name, outcomes)
            else:
                assert 2 <= ipmi.attempts[key] <= 2 * MOST_TRIES[kind], (node.name, ipmi.attempts[key])
            if kind == "busy":
                assert ipmi.attempts[key] == 2 * (RETRIES + 1), (node.name, ipmi.attempts[key])
                assert counters[node.bmc.address]["open_session"] >= ipmi.attempts[key]  # type: ignore[union-attr]  # each try reached the BMC
        assert ipmi.most_in_flight[key] <= PER_BMC, (node.name, ipmi.most_in_flight[key])
    # what the BMCs saw: one login for the two calls (a refused login is never retried), so a real BMC has little
    # reason to lock the account out. One login of pyghmi's opens at most 3 sessions: SHA-256 refused -> SHA-1, and after "Unauthorized
    # name" once more at the operator role.
    for node in nodes:
        if _kind(node) in ("badpass", "noname"):
            assert counters[node.bmc.address]["open_session"] <= 3, counters[node.bmc.address]  # type: ignore[union-attr]
    _assert_no_password(passwords, [r.getMessage() for r in caplog.records], [str(r) for r in results])


def _assert_no_password(passwords: dict[str, str], *texts: list[str]) -> None:
    """No password, nor the run's marker common to all of them, in any of the texts."""
    marker = next(iter(passwords.values())).split("-")[1]
    for group in texts:
        for text in group:
            assert f"pw-{marker}" not in text, text[:400]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("client", CLIENTS)
async def test_ipmi_passwords_appear_in_no_log_answer_or_event(client: str, farm: tuple[list[Node], dict[str, str], list[Any]],
                                                               tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Power and reboot through the API with the real IPMI driver; then every answer, record and log line is searched."""
    nodes, passwords, _ = farm
    caplog.set_level(logging.DEBUG)
    inventory = Inventory(tuple(nodes))
    settings = HttpSettings(address=ipaddress.IPv4Address("127.0.0.1"), port=0, files=tmp_path)
    db = open_state_db(tmp_path / "state.db")
    events, profiles, users, tokens = EventBus(), ProfileStore(db, BootProfile()), Users(db), NodeTokens()
    users.ensure_admin(tmp_path / "admin.token")
    admin = (tmp_path / "admin.token").read_text().strip()
    http = HttpService(settings, events.publish, ScriptRenderer(NodeBootTargets(inventory, profiles), settings.base_url),
                       lambda ip: None, tokens=tokens)
    ipmi, store = CLIENTS[client](), DeploymentStore(db)
    deps = ControllerDeps(inventory=inventory, profiles=profiles, events=events, tokens=tokens, store=store,
                          catalog=Catalog(db, tmp_path / "images"), power=ipmi, agent=FakeDeploy(), http_base="http://127.0.0.1",
                          deploy_profile=BootProfile(kind="deploy", kernel="deploy/vmlinuz"), power_off_wait=0.01)
    controller = Controller(deps, lambda m, k: replace(default_workflow(m, k), deadlines=FAST))
    Api(http.app, inventory=inventory, users=users, catalog=deps.catalog, controller=controller, deployments=store, power=ipmi,
        exec_runner=None, profiles=profiles, events=events, stats=lambda: {"http": http.stats()}, stage_dir=tmp_path / "up")
    add_dashboard(http.app)
    await http.start()
    serve = asyncio.create_task(controller.serve())
    answers: list[str] = []
    try:
        host, port = _bound(http)
        auth = {"Authorization": f"Bearer {admin}"}
        async with aiohttp.ClientSession(f"http://{host}:{port}", headers=auth) as session:
            async def call(method: str, path: str, **kw: Any) -> Any:
                async with session.request(method, path, **kw) as resp:
                    answers.append(await resp.text())
                    return json.loads(answers[-1]) if resp.content_type == "application/json" else None

            streamed: list[str] = []

            async def follow_live() -> None:  # the web dashboard's feed, all along: node records, the reboot's progress
                async with session.get("/api/v1/live") as resp:
                    async for chunk in resp.content.iter_any():
                        streamed.append(chunk.decode())

            live = asyncio.create_task(follow_live())
            some = "ok-1,slow-15,badpass-21,noname-24,busy-27,dead-30"
            power = await call("POST", "/api/v1/power", json={"nodes": some, "op": "status"})
            errors = {r["node"]: r["error"] for r in power["results"] if not r["ok"]}
            assert set(errors) == {"badpass-21", "noname-24", "busy-27", "dead-30"}, power
            reboot = await call("POST", "/api/v1/reboot", json={"nodes": "ok-1,badpass-21", "level": "hard"})
            assert [r["ok"] for r in reboot["results"]] == [False, False], reboot  # nobody boots behind these BMCs
            assert any("authentication refused" in r["reason"] for r in reboot["results"]), reboot
            await call("GET", "/api/v1/nodes")
            listing = await call("GET", "/api/v1/deployments")
            for dep in listing["deployments"]:
                await call("GET", f"/api/v1/deployments/{dep['id']}")
                await call("GET", f"/api/v1/deployments/{dep['id']}/transitions")
                await call("GET", f"/api/v1/deployments/{dep['id']}/events")
            await call("GET", "/api/v1/stats")
            await call("GET", "/api/v1/stats?format=csv")
            for path in ("/", "/ui/dashboard.js", "/ui/dashboard.css"):
                await call("GET", path)
            for dep in listing["deployments"]:
                await call("GET", f"/api/v1/deployments/{dep['id']}/timeline")
            await asyncio.sleep(0.5)  # the feed looks at the deployments' logs every 0.25 s
            live.cancel()
            answers.append("".join(streamed))
            assert "event: deployment" in answers[-1] and "authentication refused" in answers[-1], answers[-1][-2000:]
    finally:
        serve.cancel()
        await controller.close()
        await http.close()
        ipmi.close()
    records = [repr(e) for n in nodes for e in events.last(n.mac)]
    _assert_no_password(passwords, [r.getMessage() for r in caplog.records], [r.exc_text or "" for r in caplog.records],
                        answers, records, [str(row) for row in store.list(100)])


def test_a_login_error_lost_to_pyghmis_race_is_recovered() -> None:
    """pyghmi's Session.__init__ may read errormsg before the thread that failed the login writes it (see
    power._lost_login_error): the driver waits for it, so a refused login is classed as refused, not retried."""
    from pyghmi.ipmi.private.session import Session

    from appliance.deploy.power import BmcAuthRefused
    from appliance.deploy.pyghmi_power import _classify, _LoginFailed, _lost_login_error

    session = object.__new__(Session)  # no login: __init__ below stands for pyghmi's, as the traceback shows it

    def __init__(self: Session) -> None:  # noqa: N807 - the frame's name is what the driver looks for
        raise exc_type(f"'Session' object has no attribute {'errormsg'!r}")

    exc_type = AttributeError
    writer = threading.Timer(0.05, lambda: setattr(session, "errormsg", "Unauthorized name in RAKP2"))
    writer.start()
    try:
        __init__(session)
    except AttributeError as exc:
        lost = exc
    writer.join()
    recovered = _lost_login_error(lost)
    assert recovered is not None and str(recovered) == "Unauthorized name in RAKP2"
    assert _classify(_LoginFailed(recovered)) is BmcAuthRefused
    # Another AttributeError, or the race with nothing ever written, is left as it is.
    assert _lost_login_error(AttributeError("'Command' object has no attribute 'x'")) is None
    quiet = object.__new__(Session)
    try:
        __init__(quiet)
    except AttributeError as exc:
        assert _lost_login_error(exc, wait_s=0.05) is None


@pytest.mark.timeout(120)
async def test_ipmitool_never_reads_a_late_answer_as_another(tmp_path: Path) -> None:
    """A BMC answering 2.5 s late, later than ipmitool's retransmission (-N 2): the power state read is the true
    one or the call fails; never the late answer of another request read as this one's (pyghmi read `off` from
    a node that is on: docs/reliability.md, "BMCs")."""
    address = f"127.{random.randint(2, 250)}.{random.randint(2, 250)}.9"
    creds = tmp_path / "slow.yaml"
    creds.write_text("username: rbadmin\npassword: pw-late\n")
    proc = await _start_farm([{"address": address, "port": PORT, "kind": "slow", "user": "rbadmin", "password": "pw-late",
                               "delay": 2.5}], tmp_path / "farm-late.json")
    node = Node(name="late-1", mac="52:54:00:66:ff:01", ip=ipaddress.IPv4Address("10.66.0.250"), bmc=BmcSpec("ipmi", address, PORT, creds))
    ipmi = IpmitoolPower(retries=0)
    try:
        outcomes = []
        for _ in range(2):
            try:
                outcomes.append(await ipmi.power(node, "status"))
            except PowerError as exc:
                outcomes.append(type(exc).__name__)
    finally:
        ipmi.close()
        assert proc.stdin is not None
        proc.stdin.close()
        await proc.wait()
    assert "off" not in outcomes, outcomes  # the farm's node is on


async def test_a_missing_ipmitool_ends_the_call_at_the_first_try(tmp_path: Path) -> None:
    """No ipmitool on the appliance: the call fails at once with words that say so (check-config --host says it
    too), instead of being retried with backoff as if the BMC were busy."""
    creds = tmp_path / "bmc.yaml"
    creds.write_text("username: rbadmin\npassword: pw-x\n")
    node = Node(name="nt-1", mac="52:54:00:66:fe:01", ip=ipaddress.IPv4Address("10.66.0.251"),
                bmc=BmcSpec("ipmi", "127.0.0.1", PORT, creds))
    ipmi = IpmitoolPower(retries=3, backoff_s=5.0, binary=str(tmp_path / "no-such-ipmitool"))
    try:
        with pytest.raises(BmcClientMissing, match="not installed") as caught:
            await asyncio.wait_for(ipmi.power(node, "status"), 4.0)  # one backoff would already take 5-10 s
    finally:
        ipmi.close()
    assert "1 try" in str(caught.value) and "pw-x" not in str(caught.value)
    assert sum(ipmi.attempts.values()) == 1 and ipmi.stats()["calls_failed"] == 1
