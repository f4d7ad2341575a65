"""A virtual node's boot that was reset or powered off but lived on (a cancel asyncio.wait_for dropped) goes no
further than its next stage, so it cannot start a second deploy agent beside the new boot's."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vmtestbed.faults import NodeFaults
from vmtestbed.firmware import FirmwareSettings, VirtualNode
from vmtestbed.netns import create_namespace, remove_namespace, unique_prefix
from vmtestbed.plan import NodePlan

pytestmark = pytest.mark.netns


async def test_a_boot_whose_cancel_was_lost_stops_at_its_next_stage(tmp_path: Path) -> None:
    ns = unique_prefix("rbsb") + "-n1"
    create_namespace(ns)
    pool = ThreadPoolExecutor(1)
    try:
        plan = NodePlan(index=1, name="node-1", mac="52:54:00:7a:00:01", ip="10.79.0.11", rack="r1", bmc_ip="10.79.1.11",
                        namespace=ns, fabric_if="unused")
        node = VirtualNode(plan, NodeFaults(), tmp_path / "node-1.img", tmp_path / "work",
                           FirmwareSettings(appliance_url="http://127.0.0.1:9", post=("fixed", 0.3, 0.0)), pool)
        assert node.power_on()
        await asyncio.sleep(0.1)
        assert node.stage == "post"
        stale = node._task
        assert stale is not None
        # What a reset whose cancel the boot never saw leaves behind: the boot is no longer the node's, yet runs.
        node._task = None
        done, _ = await asyncio.wait({stale}, timeout=5)
        assert done and stale.cancelled()
        assert node.stage == "post" and [h[1] for h in node.history] == ["post"]  # it never reached its DHCP
        node.net.close()
    finally:
        pool.shutdown()
        remove_namespace(ns)
