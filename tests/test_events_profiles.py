"""The node event stream and the per-MAC boot profile store."""
from __future__ import annotations

from pathlib import Path

import pytest

from appliance.events import EventBus, EventKind
from domain.profiles import BootProfile
from appliance.profiles import ProfileStore
from appliance.statedb import open_state_db


async def test_events_fan_out_and_history() -> None:
    bus = EventBus(history=3)
    with bus.subscribe() as sub:
        for kind in (EventKind.DHCP_DISCOVER, EventKind.DHCP_OFFER, EventKind.DHCP_REQUEST, EventKind.DHCP_ACK):
            bus.publish("52:54:00:77:00:01", kind, ip="10.77.0.11")
        first = await sub.get()
        assert first.kind is EventKind.DHCP_DISCOVER and first.detail == {"ip": "10.77.0.11"}
    assert [e.kind for e in bus.last("52:54:00:77:00:01")] == [EventKind.DHCP_OFFER, EventKind.DHCP_REQUEST, EventKind.DHCP_ACK]
    assert bus.last("52:54:00:77:00:01", 1)[0].to_json()["kind"] == "dhcp_ack"
    bus.publish("aa:bb:cc:dd:ee:ff", EventKind.CALLBACK)  # closed subscription gets nothing
    assert bus.published == 5


async def test_slow_subscriber_drops_oldest_and_counts() -> None:
    bus = EventBus()
    sub = bus.subscribe(maxsize=2)
    for i in range(5):
        bus.publish("52:54:00:77:00:01", EventKind.TFTP_REQUEST, n=i)
    assert sub.dropped == 3
    assert (await sub.get()).detail["n"] == "3"


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
        bus.publish(f"52:54:00:00:00:{i:02x}", EventKind.DHCP_DISCOVER)
    bus.publish("52:54:00:00:00:02", EventKind.DHCP_REQUEST)  # heard again: now the most recent
    bus.publish("52:54:00:00:00:05", EventKind.DHCP_DISCOVER)
    assert bus.macs() == ["52:54:00:00:00:04", "52:54:00:00:00:02", "52:54:00:00:00:05"]


async def test_subscription_filter_queues_only_accepted_events() -> None:
    bus = EventBus()
    with bus.subscribe(accept=lambda e: e.mac == "52:54:00:00:00:01") as sub:
        bus.publish("52:54:00:00:00:02", EventKind.DHCP_DISCOVER)
        bus.publish("52:54:00:00:00:01", EventKind.DHCP_ACK)
        assert (await sub.get()).kind is EventKind.DHCP_ACK
        assert sub.get_nowait() is None
    assert len(bus.last("52:54:00:00:00:02")) == 1  # history keeps everything
