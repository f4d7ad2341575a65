"""End to end: the web dashboard in headless Chromium, following a real deployment on a small vm-testbed.

4 virtual nodes in 2 racks (namespace nodes, firmware that behaves like PXE + iPXE, IPMI BMCs) and the real
appliance (`rackboot serve`) in the testbed's appliance namespace. The browser runs in that namespace too (the
test's thread enters it, so Chromium and the DevTools connection are there, on its loopback), reaches the
appliance at 10.78.0.1 and nothing else. The test logs in, starts a deployment of the sample environment through
the API, watches every node go through the macro-steps in the grid without reloading, opens the deployment and
checks that its timeline shows each node's boot stages in order, the same as `rackboot stats --svg` draws.

RACKBOOT_SCREENSHOT_DIR=docs keeps screenshots of the main views (docs/dashboard.md shows them).
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from chromium import Chromium, executable
from test_dashboard_browser import SEEN_STATES, node_state
from vmtestbed import plan as testbed_plan
from vmtestbed.appliance_files import SAMPLE_ENV, write_sample_environment
from vmtestbed.demo import rackboot_cli
from vmtestbed.netns import entered
from vmtestbed.plan import APPLIANCE_IP, make_plan
from vmtestbed.testbed import admin_token, down, start_appliance, up

pytestmark = [pytest.mark.netns, pytest.mark.browser, pytest.mark.timeout(600),
              pytest.mark.skipif(os.geteuid() != 0, reason="the vm-testbed needs root (network namespaces)"),
              pytest.mark.skipif(executable() is None, reason="Debian's chromium is not installed (./setup.sh --test installs it)")]
NODES = ["node-1", "node-2", "node-3", "node-4"]
STEPS = ["idle", "SetDeploymentEnv", "BroadcastEnv", "BootNewEnv", "done"]
# the boot stages every node must show in the timeline, in this order (others, such as iPXE's own DHCP, between)
STAGES = ["dhcp", "nbp", "script", "kernel", "agent", "image", "os"]
SVG = "{http://www.w3.org/2000/svg}"

# Records, in the page, each boot record kind every node cell shows as its last one.
SEEN_RECORDS = """
window.seenRecords = {};
new MutationObserver((changes) => {
  for (const change of changes) {
    const cell = change.target.closest && change.target.closest('.node');
    const last = cell && cell.querySelector('.last');
    if (!last) continue;
    const kinds = (window.seenRecords[cell.dataset.node] ||= []);
    const kind = last.textContent.split(' ')[0];
    if (kinds[kinds.length - 1] !== kind) kinds.push(kind);
  }
}).observe(document.getElementById('racks'), {childList: true, characterData: true, subtree: true});
"""


@pytest.fixture
def testbed(tmp_path: Path) -> Iterator[testbed_plan.TestbedPlan]:
    """A 4-node testbed with its appliance up and the sample environment in the catalog; always torn down."""
    name = f"db{secrets.token_hex(3)}"
    plan = make_plan(name, len(NODES), 2, post_s="0.2-1", seed=1)
    previous, owner = signal.getsignal(signal.SIGTERM), os.getpid()

    def _sigterm(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)  # a forked helper just dies
        raise KeyboardInterrupt  # the Ctrl-C path: the browser and the testbed go

    signal.signal(signal.SIGTERM, _sigterm)
    try:
        result = up(plan)
        start_appliance(plan, result.files)
        added = subprocess.run(rackboot_cli(plan, "env", "add", str(write_sample_environment(tmp_path / "env", size_mib=2))),
                               capture_output=True, text=True, timeout=120)
        assert added.returncode == 0, added.stderr
        yield plan
    finally:
        try:
            down(name)
        finally:
            signal.signal(signal.SIGTERM, previous)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"rbt-{name}-" not in left, left  # nothing of the testbed is left


def in_order(seen: list[str], order: list[str]) -> bool:
    """Whether every item of `order` appears in `seen`, in that order (others may come between)."""
    it = iter(seen)
    return all(any(s == want for s in it) for want in order)


def stage_lanes(svg: str) -> dict[str, list[str]]:
    """Per node: the boot stages of its timeline lane, in order."""
    out: dict[str, list[str]] = {}
    for r in ET.fromstring(svg).iter(f"{SVG}rect"):
        if r.get("class") == "stage":
            out.setdefault(r.get("data-node", ""), []).append(r.get("data-stage", ""))
    return out


def test_the_dashboard_follows_a_deployment_on_the_testbed(testbed: testbed_plan.TestbedPlan, tmp_path: Path) -> None:
    plan = testbed
    with entered(plan.appliance_ns):  # this thread, so the browser it starts and the sockets it opens, are in there
        browser = asyncio.run(_watch(plan, tmp_path))
    # the browser and everything it forked are gone, and so is its profile
    assert browser.proc is not None and browser.proc.poll() is not None and not browser.profile.exists()


async def _watch(plan: testbed_plan.TestbedPlan, tmp_path: Path) -> Chromium:
    token, base = admin_token(plan), plan.appliance_url
    shots = Path(os.environ["RACKBOOT_SCREENSHOT_DIR"]) if os.environ.get("RACKBOOT_SCREENSHOT_DIR") else tmp_path
    async with Chromium(allow=(str(APPLIANCE_IP),)) as browser, aiohttp.ClientSession() as http:
        page = await browser.page()
        await page.send("Network.enable")
        await page.goto(base + "/")
        await page.js(f"document.getElementById('token').value = {json.dumps(token)};"
                      "document.getElementById('login-form').requestSubmit()")
        await page.until(f"document.querySelectorAll('.node').length === {len(NODES)}", timeout=30)
        await page.until("document.getElementById('conn').textContent === 'live'", timeout=30)
        racks = await page.js("[...document.querySelectorAll('.rack')].map(r => [r.dataset.rack,"
                              " [...r.querySelectorAll('.node')].map(n => n.dataset.node)])")
        assert racks == [["r1", ["node-1", "node-2"]], ["r2", ["node-3", "node-4"]]], racks
        assert await page.js(f"document.querySelector('#environments tbody').textContent.includes({json.dumps(SAMPLE_ENV)})")
        await page.js("window.notReloaded = true")
        await page.js(SEEN_STATES)
        await page.js(SEEN_RECORDS)

        # a real deployment: IPMI power-on, PXE/iPXE into the deploy environment, the chain broadcast, kexec
        async with http.post(f"{base}/api/v1/deployments", json={"nodes": "node-[1-4]", "env": SAMPLE_ENV},
                             headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 201, await resp.text()
            dep_id = (await resp.json())["id"]
        # the grid, nodes on their way: once one is past its deploy kernel (or, if the page went by that, all done)
        later = "['kernel_fetched', 'initrd_fetched', 'dhcp_from_os', 'agent_up'].includes(c.textContent.split(' ')[0])"
        await page.until(f"[...document.querySelectorAll('.node .last')].some(c => {later})"
                         " || [...document.querySelectorAll('.node')].every(c => c.dataset.state === 'done')", timeout=180)
        await page.screenshot(shots / "dashboard-nodes.png", "#app > section")
        await page.until(" && ".join(f"['done', 'failed'].includes({node_state(n)})" for n in NODES), timeout=420)
        assert await page.js("window.notReloaded === true")
        seen, records = await page.js("window.seenStates"), await page.js("window.seenRecords")
        for node in NODES:  # each went through the steps live, in the workflow's order, and its boot records showed
            states = seen[node]
            assert states[0] == "idle" and states[-1] == "done" and len(states) >= 3, (node, seen)
            assert in_order(states, [s for s in STEPS if s in states]), (node, seen)
            assert "dhcp_from_firmware" in records.get(node, []) and len(set(records[node])) >= 3, (node, records)

        # the deployment: steps, nodes, and its timeline with every node's boot stages in order
        row = f"#deployments tr[data-id={json.dumps(dep_id)}]"
        await page.until(f"document.querySelector({json.dumps(row + ' .status-done')})", timeout=30)
        await page.js(f"document.querySelector({json.dumps(row)}).click()")
        await page.until(f"document.getElementById('detail-id').textContent === {json.dumps(dep_id)}"
                         " && document.querySelectorAll('#timeline svg rect.stage').length > 0", timeout=30)
        steps = "[...document.querySelectorAll('#steps .step')].map(s => s.textContent).join(',')"
        await page.until(f"{steps} === 'SetDeploymentEnv4/4,BroadcastEnv4/4,BootNewEnv4/4'"  # its final report
                         " && document.getElementById('detail-status').textContent.startsWith('done')", timeout=30)
        shown = await page.js("[...document.querySelectorAll('#timeline svg rect.stage')]"
                              ".map(r => [r.dataset.node, r.dataset.stage])")
        lanes: dict[str, list[str]] = {}
        for node, stage in shown:
            lanes.setdefault(node, []).append(stage)
        assert sorted(lanes) == NODES and all(in_order(lanes[n], STAGES) for n in NODES), lanes
        assert (await page.js("document.getElementById('timeline-download').href")).startswith("blob:")
        await page.screenshot(shots / "dashboard-deployment.png", "#detail")
        await page.screenshot(shots / "dashboard-timeline.png", "#timeline")
        await page.screenshot(shots / "dashboard-catalog.png", "#app > section:last-of-type")
        for name in ("nodes", "deployment", "timeline", "catalog"):
            assert (shots / f"dashboard-{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # `rackboot stats --svg` draws the same boot stages from the CLI
        svg = tmp_path / "timeline.svg"
        drawn = subprocess.run(rackboot_cli(plan, "stats", "--deployment", dep_id, "--svg", str(svg)),
                               capture_output=True, text=True, timeout=60)
        assert drawn.returncode == 0, drawn.stderr
        assert stage_lanes(svg.read_text()) == lanes
        # the token went out in headers only: no URL the page asked for carries it
        urls: list[Any] = [e["params"]["request"]["url"] for e in page.events if e["method"] == "Network.requestWillBeSent"]
        assert any(u.endswith("/api/v1/live") for u in urls) and not [u for u in urls if token in u]
    return browser
