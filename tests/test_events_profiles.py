"""The node records' bus, their JSON form, and the per-MAC boot profile store."""
from __future__ import annotations

from pathlib import Path

import pytest

from appliance.events import EventBus
from appliance.profiles import ProfileStore
from appliance.statedb import open_state_db
from domain.profiles import BootProfile
from domain.progress import (
    EVENT_TYPES, AgentUp, DhcpFromFirmware, DhcpFromOs, FirmwareKind, NbpSent, NodeReport, ScriptServed, Via,
    event_json,
)

MAC = "52:54:00:77:00:01"


async def test_events_fan_out_and_history() -> None:
    bus = EventBus(history=3)
    boot = [DhcpFromFirmware(MAC, FirmwareKind.BIOS_PXE, 0), NbpSent(MAC, "undionly.kpxe", Via.TFTP),
            DhcpFromFirmware(MAC, FirmwareKind.IPXE, 0), ScriptServed(MAC, "deploy", Via.HTTP, "debian12:1")]
    with bus.subscribe() as sub:
        for event in boot:
            bus.publish(event)
        assert await sub.get() is boot[0]
    assert bus.last(MAC) == boot[1:]
    assert event_json(bus.last(MAC, 1)[0]) == {"mac": MAC, "kind": "script_served", "ts": boot[3].ts,
                                               "detail": {"profile": "deploy", "via": "http", "env": "debian12:1"}}
    bus.publish(DhcpFromOs("aa:bb:cc:dd:ee:ff"))  # closed subscription gets nothing
    assert bus.published == 5


def test_every_record_kind_is_distinct_and_carries_no_token() -> None:
    kinds = [t.kind for t in EVENT_TYPES]  # type: ignore[attr-defined]
    assert len(kinds) == len(set(kinds))
    for t in EVENT_TYPES:
        assert "token" not in t.__dataclass_fields__  # type: ignore[attr-defined]
    assert event_json(AgentUp(MAC, "d1", 22, 7070, ts=1.0))["detail"] == {"deployment": "d1", "ssh_port": 22, "data_port": 7070}


async def test_slow_subscriber_drops_oldest_and_counts() -> None:
    bus = EventBus()
    sub = bus.subscribe(maxsize=2)
    for i in range(5):
        bus.publish(NodeReport(MAC, "step", "ok", str(i)))
    assert sub.dropped == 3
    assert (await sub.get()).message == "3"  # type: ignore[union-attr]


def test_profiles_persist_across_restart(tmp_path: Path) -> None:
    db = open_state_db(tmp_path / "state.db")
    store = ProfileStore(db, BootProfile())
    deploy = BootProfile(kind="deploy", kernel="deploy/vmlinuz", initrds=("deploy/initrd.img",), cmdline="console=ttyS0", env="debian12")
    store.set(["52:54:00:77:00:01", "52:54:00:77:00:02"], deploy)
    assert store.get("52:54:00:77:00:03").kind == "none"
    db.close()
    again = ProfileStore(open_state_db(tmp_path / "state.db"), BootProfile())
    assert again.get("52:54:00:77:00:02") == deploy


def test_profile_validation() -> None:
    with pytest.raises(ValueError):
        BootProfile(kind="deploy")
    with pytest.raises(ValueError):
        BootProfile(kind="warp")
    assert BootProfile.from_json(BootProfile(kind="local").to_json()) == BootProfile(kind="local")


def test_history_keeps_a_bounded_number_of_macs() -> None:
    bus = EventBus(max_macs=3)
    for i in range(5):
        bus.publish(DhcpFromOs(f"52:54:00:00:00:{i:02x}"))
    bus.publish(DhcpFromOs("52:54:00:00:00:02"))  # heard again: now the most recent
    bus.publish(DhcpFromOs("52:54:00:00:00:05"))
    assert bus.macs() == ["52:54:00:00:00:04", "52:54:00:00:00:02", "52:54:00:00:00:05"]


async def test_history_only_for_the_macs_kept_while_subscribers_get_every_event() -> None:
    """The appliance keeps histories for inventory MACs only: 20,000 pool clients' histories made the cyclic GC
    pause the event loop for 100-200 ms (docs/benchmarks.md)."""
    inventory = {MAC}
    bus = EventBus(keep=lambda mac: mac in inventory)
    with bus.subscribe() as sub:
        for i in range(100):
            bus.publish(DhcpFromOs(f"52:54:00:99:00:{i:02x}"))
        bus.publish(DhcpFromOs(MAC))
        assert bus.macs() == [MAC] and len(bus.last(MAC)) == 1 and bus.last("52:54:00:99:00:01") == []
        assert bus.published == 101 and sum(1 for _ in iter(sub.get_nowait, None)) == 101
        inventory.add("52:54:00:99:00:01")  # a reload added it: kept from now on
        bus.publish(DhcpFromOs("52:54:00:99:00:01"))
        assert len(bus.last("52:54:00:99:00:01")) == 1


async def test_subscription_filter_queues_only_accepted_events() -> None:
    bus = EventBus()
    with bus.subscribe(accept=lambda e: e.mac == "52:54:00:00:00:01") as sub:
        bus.publish(DhcpFromOs("52:54:00:00:00:02"))
        bus.publish(DhcpFromOs("52:54:00:00:00:01", "udhcp"))
        assert (await sub.get()) == DhcpFromOs("52:54:00:00:00:01", "udhcp", ts=bus.last("52:54:00:00:00:01")[0].ts)
        assert sub.get_nowait() is None
    assert len(bus.last("52:54:00:00:00:02")) == 1  # history keeps everything
