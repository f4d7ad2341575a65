"""A site that runs its own DHCP and iPXE menu hands nodes to rackboot with one `chain` line (docs/chainload.md).

The site: busybox `udhcpd` (the node's reserved address, a boot file that is the URL of the site's menu) and a
plain HTTP server with that menu, in a namespace of their own on the bridge; rackboot runs with `dhcp: off`.
A real SeaBIOS + iPXE ROM VM (TCG) gets its address and first script from the site, whose menu chains
`http://APPLIANCE/boot/${mac}.ipxe || goto site`: an inventory node gets its per-MAC script from rackboot (its
records show `script_served`, and no DHCP answer of rackboot's), and a MAC rackboot does not know comes back to
the site's menu (the unknown script ends with `exit 1`).
"""
from __future__ import annotations

import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, Iterator

import pytest

from vmtestbed.qemu import QemuError, QemuVm

if TYPE_CHECKING:
    from conftest import E2eAppliance

pytestmark = [pytest.mark.netns, pytest.mark.qemu]

SITE_IP = "10.77.0.250"
SITE_PORT = 8081
UNKNOWN_MAC = "52:54:00:ee:00:01"
BOOT_TIMEOUT_S = 120.0
MENU = """#!ipxe
echo site-menu: handing ${mac} over to rackboot
chain http://{appliance}/boot/${mac}.ipxe || goto site
:site
echo site-menu: rackboot has nothing for ${mac}, the site boots it its own way
"""


def _dhcp_off(app: "E2eAppliance") -> None:
    """Before `rackboot serve`: no DHCP of rackboot's (the site's server gives the addresses)."""
    app.config_path.write_text(app.config_path.read_text().replace("  mode: authoritative\n", "  mode: 'off'\n"))


@pytest.fixture(scope="module")
def site(appliance_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple["E2eAppliance", str]]:
    """rackboot (DHCP off) and the site's udhcpd + HTTP menu server; yields (appliance, node-4's MAC)."""
    with appliance_factory(tmp_path_factory.mktemp("chain"), prefix="chn", before_serve=_dhcp_off) as app:
        node = next(n for n in app.inventory if n.name == "node-4")
        ns = app.lab.ns("site")
        app.lab.veth(ns, "eth0", app.fabric_ns, "site", master_b=app.bridge)
        app.lab.addr(ns, "eth0", f"{SITE_IP}/24")
        www = app.workdir / "site-www"
        www.mkdir()
        (www / "menu.ipxe").write_text(MENU.replace("{appliance}", app.url.split("//", 1)[1]))
        conf = app.workdir / "udhcpd.conf"
        conf.write_text(f"start 10.77.0.100\nend 10.77.0.199\ninterface eth0\nlease_file {app.workdir / 'udhcpd.leases'}\n"
                        f"pidfile {app.workdir / 'udhcpd.pid'}\nstatic_lease {node.mac} {node.ip}\n"
                        f"boot_file http://{SITE_IP}:{SITE_PORT}/menu.ipxe\nopt subnet 255.255.255.0\nopt lease 3600\n")
        (app.workdir / "udhcpd.leases").touch()
        app.lab.popen(ns, ["busybox", "udhcpd", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        app.lab.popen(ns, [sys.executable, "-m", "http.server", "--bind", SITE_IP, "--directory", str(www), str(SITE_PORT)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield app, node.mac


async def _boot(app: "E2eAppliance", mac: str, label: str) -> QemuVm:
    vm = QemuVm(name=f"{app.lab.prefix}-{label}", netns=app.fabric_ns, bridge=app.bridge, mac=mac,
                workdir=app.workdir / "vms", firmware="bios", paused=True, timeout_s=300)
    await vm.start()
    await vm.power_on()
    return vm


async def test_a_site_menu_chains_an_inventory_node_into_rackboot(site: tuple["E2eAppliance", str]) -> None:
    app, mac = site
    vm = await _boot(app, mac, "known")
    t0 = time.time()
    try:
        await vm.wait_serial(r"site-menu: handing", BOOT_TIMEOUT_S)  # the site's DHCP and menu came first
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not any(e["kind"] == "script_served" and float(e["ts"]) >= t0 for e in app.events_of(mac)):
            assert time.monotonic() < deadline, f"no script_served from rackboot: {app.events_of(mac)}"
            app.assert_alive()
            time.sleep(0.5)
        await vm.wait_serial(r"has nothing to boot yet", 30)  # rackboot's script runs: the node waits for a profile
        kinds = [e["kind"] for e in app.events_of(mac) if float(e["ts"]) >= t0]
        assert "dhcp_from_firmware" not in kinds and "nbp_sent" not in kinds, kinds  # rackboot's DHCP is off
        print(f"\n[chainload] site DHCP + menu -> rackboot's script in {time.time() - t0:.1f}s: {kinds}")
    except (AssertionError, QemuError, TimeoutError) as exc:
        pytest.fail(f"{exc}\n--- serial ---\n{vm.serial_text()[-2500:]}\n--- serve ---\n{app.server_log()[-2000:]}")
    finally:
        await vm.stop()


async def test_an_unknown_mac_comes_back_to_the_site_menu(site: tuple["E2eAppliance", str]) -> None:
    app, _ = site
    vm = await _boot(app, UNKNOWN_MAC, "unknown")
    try:
        await vm.wait_serial(r"is not in the inventory", BOOT_TIMEOUT_S)  # rackboot's script
        await vm.wait_serial(r"site-menu: rackboot has nothing for", 30)  # exit 1 returned to the site's menu
    except (AssertionError, QemuError, TimeoutError) as exc:
        pytest.fail(f"{exc}\n--- serial ---\n{vm.serial_text()[-2500:]}\n--- serve ---\n{app.server_log()[-2000:]}")
    finally:
        await vm.stop()

