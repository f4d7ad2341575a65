"""The web dashboard in headless Chromium (Debian's `chromium`, over the DevTools protocol, loopback only): log in
with a token, see the inventory's nodes by rack, watch them change state live through a deployment run by the
controller with the fake cluster (tests/fakes.py), open the deployment and its timeline.

RACKBOOT_SCREENSHOT_DIR=docs keeps the screenshot as docs/dashboard.png (docs/dashboard.md shows it).
"""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

import test_api
from chromium import Chromium, executable
from domain.progress import DhcpFromOs
from test_api import World, add_env

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(executable() is None, reason="Debian's chromium is not installed (./setup.sh --test installs it)")]

world = test_api.world  # the fixture: the API and the dashboard on loopback, with the controller and fakes behind it


# Records, in the page, every state the grid shows for each node (the DevTools protocol's evaluation is not
# subject to the page's Content-Security-Policy).
SEEN_STATES = """
window.seenStates = {};
const note = (name, value) => {
  const states = (window.seenStates[name] ||= []);
  if (value && states[states.length - 1] !== value) states.push(value);
};
new MutationObserver((changes) => {  // each change's old value, then the value now: every state shown, in order
  const touched = new Set();
  for (const change of changes) {
    if (!change.target.dataset || !change.target.dataset.node) continue;
    note(change.target.dataset.node, change.oldValue);
    touched.add(change.target);
  }
  for (const cell of touched) note(cell.dataset.node, cell.dataset.state);
}).observe(document.getElementById('racks'), {attributes: true, attributeOldValue: true, attributeFilter: ['data-state'], subtree: true});
for (const cell of document.querySelectorAll('.node')) note(cell.dataset.node, cell.dataset.state);
"""


def node_state(name: str) -> str:
    """A page expression: the state the grid shows for a node."""
    return f"document.querySelector('.node[data-node={json.dumps(name)}]')?.dataset.state"


async def test_a_user_logs_in_and_watches_a_deployment_live(world: World, tmp_path: Path) -> None:
    client, admin, deps = world.client, world.admin, world.deps
    assert (await add_env(client, admin, "debian12", "public"))[0] == 201
    deps.events.publish(DhcpFromOs(deps.inventory.by_name["node-6"].mac, "udhcp 1.35.0"))
    world.cluster.firmware_s = 0.4     # slow enough to see each macro-step go by
    world.cluster.never_boot = {"node-3"}  # one node fails, escalated through every reboot level
    async with Chromium() as browser:
        page = await browser.page()
        await page.send("Network.enable")
        await page.goto(client.base + "/")
        # not logged in: the login form and nothing else
        assert await page.js("!document.getElementById('login').hidden && document.getElementById('app').hidden")
        assert await page.js("document.querySelectorAll('.node').length") == 0
        # a wrong token is refused, and not kept
        await page.js("document.getElementById('token').value = 'not-a-token';"
                      "document.getElementById('login-form').requestSubmit()")
        await page.until("document.getElementById('login-error').textContent.includes('not valid')")
        assert await page.js("sessionStorage.getItem('rackboot.token')") is None
        # the admin's token: the grid of the inventory's nodes, by rack, and the live feed
        await page.js(f"document.getElementById('token').value = {json.dumps(admin)};"
                      "document.getElementById('login-form').requestSubmit()")
        await page.until("document.querySelectorAll('.node').length === 6")
        await page.until("document.getElementById('conn').textContent === 'live'")
        racks = await page.js("[...document.querySelectorAll('.rack')].map(r => [r.dataset.rack,"
                              " [...r.querySelectorAll('.node')].map(n => n.dataset.node)])")
        assert racks == [["r1", ["node-1", "node-2", "node-3", "node-4"]], ["r2", ["node-5", "node-6"]]]
        assert "dhcp_from_os" in await page.js("document.querySelector('.node[data-node=\"node-6\"] .last').textContent")
        assert await page.js("document.querySelector('#environments tbody').textContent.includes('debian12')")
        await page.js("window.notReloaded = true")
        await page.js(SEEN_STATES)
        # a deployment: the page follows it without being reloaded
        status, dep = await client.call("POST", "/api/v1/deployments", admin, json={"nodes": "node-[1-4]", "env": "debian12"})
        assert status == 201
        await asyncio.wait_for(world.api.deps.controller.tasks[dep["id"]], 30)  # type: ignore[attr-defined]
        await page.until(f"{node_state('node-1')} === 'done' && {node_state('node-3')} === 'failed'")
        assert await page.js("window.notReloaded === true")
        seen = await page.js("window.seenStates")
        assert seen["node-1"] == ["idle", "SetDeploymentEnv", "BroadcastEnv", "BootNewEnv", "done"], seen
        assert seen["node-3"] == ["idle", "SetDeploymentEnv", "failed"], seen
        assert await page.js(node_state("node-5")) == "idle"
        # the deployment: its row, its steps, its nodes and its timeline (the appliance's SVG Gantt chart)
        await page.until(f"document.querySelector('#deployments tr[data-id={json.dumps(dep['id'])}] .status-partial')")
        await page.js(f"document.querySelector('#deployments tr[data-id={json.dumps(dep['id'])}]').click()")
        await page.until(f"document.getElementById('detail-id').textContent === {json.dumps(dep['id'])}"
                         " && document.getElementById('detail-status').textContent.startsWith('partial')")
        await page.until("document.querySelectorAll('#timeline svg rect.stay').length > 0")
        assert await page.js("document.querySelectorAll('#timeline svg rect.failed').length") == 1
        steps = await page.js("[...document.querySelectorAll('#steps .step')].map(s => s.textContent)")
        assert steps == ["SetDeploymentEnv3/4 · 1 failed", "BroadcastEnv3/3", "BootNewEnv3/3"], steps
        assert await page.js("document.querySelector('#detail-nodes tbody').textContent.includes('no DHCP within')")
        assert (await page.js("document.getElementById('timeline-download').href")).startswith("blob:")
        shot = tmp_path / "dashboard.png"
        await page.screenshot(shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("RACKBOOT_SCREENSHOT_DIR"):
            (Path(os.environ["RACKBOOT_SCREENSHOT_DIR"]) / "dashboard.png").write_bytes(shot.read_bytes())
        # the token went out in headers only: no URL the page asked for carries it
        urls = [e["params"]["request"]["url"] for e in page.events if e["method"] == "Network.requestWillBeSent"]
        assert any(u.endswith("/api/v1/live") for u in urls) and not [u for u in urls if admin in u]
        # reloaded, the tab is still logged in, and the grid shows the same results, from the REST API this time
        await page.send("Page.reload")
        await page.until("window.notReloaded === undefined && document.readyState === 'complete'")
        await page.until(f"{node_state('node-1')} === 'done' && {node_state('node-3')} === 'failed'"
                         f" && {node_state('node-5')} === 'idle'")
        # logging out forgets the token and shows the login form again
        await page.js("document.getElementById('logout').click()")
        assert await page.js("sessionStorage.getItem('rackboot.token')") is None
        assert await page.js("document.getElementById('app').hidden && !document.getElementById('login').hidden")
        assert await page.js("document.getElementById('detail').hidden && !document.querySelector('.node')"
                             " && !document.getElementById('timeline').firstChild")
        # a user without rights sees the nodes, and neither the admin's deployment nor its results
        _, bob = await client.call("POST", "/api/v1/users", admin, json={"name": "bob"})
        await page.js(f"document.getElementById('token').value = {json.dumps(bob['token'])};"
                      "document.getElementById('login-form').requestSubmit()")
        await page.until("document.querySelectorAll('.node').length === 6"
                         " && document.querySelector('#deployments tbody').textContent === 'no deployment yet'")
        assert await page.js("document.getElementById('who').textContent") == "bob"
        assert await page.js(node_state("node-3")) == "idle" and await page.js("document.getElementById('detail').hidden")
    # the browser and everything it forked are gone, and so is its profile
    assert browser.proc is not None and browser.proc.poll() is not None and not browser.profile.exists()
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _runs_from(pid, browser.profile)]


def _runs_from(pid: str, profile: Path) -> bool:
    """Whether a process's command line names the browser's profile directory."""
    try:
        return str(profile).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
