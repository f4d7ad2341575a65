"""The node daemon split into shards, without a network: which shard owns which nodes, the same faults whatever the
number of shards, and the control client's fan-out and merge against fake shard daemons on real Unix sockets."""
from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from vmtestbed.control import Control, ControlError
from vmtestbed.faults import assign_faults, parse_faults
from vmtestbed.plan import default_daemons, make_plan
from vmtestbed.shards import PLAN_FILE, control_socket, merge_replies, owners, shard_nodes, split_request
from vmtestbed.testbed import neighbour_entries_needed, other_testbeds_nodes


def test_the_default_is_one_daemon_per_500_namespace_nodes() -> None:
    assert default_daemons(1) == 1 and default_daemons(500) == 1 and default_daemons(501) == 2 and default_daemons(1000) == 2
    assert make_plan("t", 20, 2).daemons == 1 and make_plan("t", 1000, 2).daemons == 2
    assert make_plan("t", 20, 2, daemons=3).daemons == 3
    with pytest.raises(ValueError, match="node daemons"):
        make_plan("t", 2, 1, daemons=3)  # a shard without a node
    plan = make_plan("t", 4, 2, daemons=2)
    old = plan.to_json()
    del old["daemons"]  # a plan.json written before shards
    assert type(plan).from_json(old).daemons == 1


def test_shards_own_whole_racks_and_the_vms_stay_in_the_first() -> None:
    plan = make_plan("t", 1000, 2)
    shards = shard_nodes(plan)
    assert [{n.rack for n in s} for s in shards] == [{"r1"}, {"r2"}] and [len(s) for s in shards] == [500, 500]
    plan = make_plan("t", 12, 4, daemons=2, qemu=2)
    shards = shard_nodes(plan)
    assert all(n.is_vm for n in shards[0][-2:]) and not any(n.is_vm for n in shards[1])
    assert {n.rack for n in shards[0] if not n.is_vm} & {n.rack for n in shards[1]} == set()  # no rack split between shards
    plan = make_plan("t", 10, 1, daemons=3)  # fewer racks than shards: consecutive runs of nodes
    assert [[n.index for n in s] for s in shard_nodes(plan)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for k in (1, 2, 3, 5):
        plan = make_plan("t", 37, 4, daemons=k, qemu=1)
        assert sorted(n.name for s in shard_nodes(plan) for n in s) == sorted(n.name for n in plan.node_list)  # each node once


def test_faults_do_not_depend_on_the_number_of_shards() -> None:
    """The daemon draws faults over every namespace node of the plan, then keeps its shard's: the union is the same for any K."""
    spec = parse_faults("loss=0.05,posthang=0.1,bmcdead=0.02,die=0.05@tftp")
    drawn = []
    for k in (1, 2, 4):
        plan = make_plan("t", 200, 4, seed=7, daemons=k)
        everyone = assign_faults(spec, [n.name for n in plan.netns_nodes], plan.seed)
        drawn.append({n.name: everyone[n.name] for s in shard_nodes(plan) for n in s})
    assert drawn[0] == drawn[1] == drawn[2] and sum(f.any for f in drawn[0].values()) > 10


def test_requests_split_by_owner_and_replies_merge_in_plan_order() -> None:
    plan = make_plan("t", 6, 3, daemons=3)
    owner = owners(plan)
    assert split_request({"op": "status"}, owner, 3) == {0: {"op": "status"}, 1: {"op": "status"}, 2: {"op": "status"}}
    parts = split_request({"op": "power", "action": "on", "nodes": ["node-6", "node-1", "node-2"]}, owner, 3)
    assert parts == {0: {"op": "power", "action": "on", "nodes": ["node-1", "node-2"]}, 2: {"op": "power", "action": "on", "nodes": ["node-6"]}}
    with pytest.raises(KeyError):
        split_request({"op": "status", "nodes": ["node-7"]}, owner, 3)
    order = [n.name for n in plan.node_list]
    replies = {i: {"ok": True, "name": "t", "pid": 100 + i, "rss": 10, "cpu_s": 1.5, "uptime": 9.0 - i, "vms": 0, "bmcs": 2,
                   "loop_lag_max": 0.1 * i, "owned": 2, "nodes": [{"name": f"node-{6 - 2 * i - j}"} for j in range(2)]} for i in (2, 0, 1)}
    merged = merge_replies("status", replies, order)
    assert [n["name"] for n in merged["nodes"]] == order
    assert (merged["pid"], merged["rss"], merged["bmcs"], merged["cpu_s"], merged["uptime"]) == (100, 30, 6, 4.5, 7.0)
    assert merged["loop_lag_max"] == pytest.approx(0.2) and [s["pid"] for s in merged["shards"]] == [100, 101, 102]
    power = merge_replies("power", {1: {"ok": True, "changed": {"node-3": True}}, 0: {"ok": True, "changed": {"node-1": False}}}, order)
    assert list(power["changed"].items()) == [("node-1", False), ("node-3", True)]


class FakeShardDaemon:
    """A node daemon's control socket answering for its own nodes only (and failing on a node it does not own)."""

    def __init__(self, path: Path, shard: int, nodes: list[str]) -> None:
        self.shard = shard
        self.nodes = nodes
        self.seen: list[dict[str, Any]] = []
        self.power = {n: "off" for n in nodes}
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                req = json.loads(line)
                self.seen.append(req)
                conn.sendall(json.dumps(self._answer(req)).encode() + b"\n")

    def _answer(self, req: dict[str, Any]) -> dict[str, Any]:
        names = self.nodes if req.get("nodes") in (None, "all") else req["nodes"]
        if any(n not in self.power for n in names):
            return {"ok": False, "error": f"KeyError: {names}"}
        if req["op"] == "power":
            changed = {n: self.power[n] != req["action"] for n in names}
            self.power.update({n: req["action"] for n in names})
            return {"ok": True, "changed": changed}
        return {"ok": True, "name": "t", "pid": 1000 + self.shard, "rss": 1, "cpu_s": 0.5, "uptime": 1.0, "vms": 0, "bmcs": len(self.nodes),
                "loop_lag_max": 0.0, "owned": len(self.nodes), "nodes": [{"name": n, "power": self.power[n]} for n in names]}

    def close(self) -> None:
        """Stop accepting."""
        self.server.close()


@pytest.fixture
def sharded(tmp_path: Path) -> Iterator[tuple[Path, list[FakeShardDaemon]]]:
    """A state dir with a 3-daemon plan and a fake daemon on each shard's control socket."""
    plan = make_plan("t", 9, 3, daemons=3)
    plan.save(tmp_path / PLAN_FILE)
    fakes = [FakeShardDaemon(control_socket(tmp_path, i), i, [n.name for n in s]) for i, s in enumerate(shard_nodes(plan))]
    yield tmp_path, fakes
    for fake in fakes:
        fake.close()


def test_the_client_fans_out_to_the_owners_and_merges(sharded: tuple[Path, list[FakeShardDaemon]]) -> None:
    state_dir, fakes = sharded
    with Control(state_dir) as ctl:
        status = ctl.call("status")
        assert [n["name"] for n in status["nodes"]] == [f"node-{i}" for i in range(1, 10)] and len(status["shards"]) == 3
        assert ctl.call("power", action="on", nodes=["node-9", "node-1"])["changed"] == {"node-1": True, "node-9": True}
        assert [n["power"] for n in ctl.call("status", nodes=["node-1", "node-5", "node-9"])["nodes"]] == ["on", "off", "on"]
        with pytest.raises(ControlError, match="node-10"):
            ctl.call("status", nodes=["node-10"])
        assert ctl.call("status", nodes=["node-2"])["nodes"] == [{"name": "node-2", "power": "off"}]  # still in step after the error
    assert [r["nodes"] for r in fakes[1].seen if r["op"] == "power"] == []  # shard 1 owns neither node-1 nor node-9
    assert [r["nodes"] for r in fakes[2].seen if r["op"] == "power"] == [["node-9"]]


def test_an_unreachable_shard_is_a_control_error(sharded: tuple[Path, list[FakeShardDaemon]]) -> None:
    state_dir, fakes = sharded
    fakes[1].close()
    control_socket(state_dir, 1).unlink()
    with pytest.raises(ControlError, match="control-1.sock"):
        Control(state_dir)


def test_other_testbeds_count_in_the_neighbour_table_even_from_another_version(tmp_path: Path) -> None:
    """`up` sizes the shared neighbour table for every testbed: a plan with keys it does not know (another rackboot
    version's) still counts by its nodes; an unreadable one is skipped and said, never fails `up`."""
    plan = make_plan("tba", 6, 2, qemu=1)
    for name, text in (("tba", json.dumps(plan.to_json())),
                       ("tbb", json.dumps({**plan.to_json(), "name": "tbb", "nodes": 40, "a_future_key": 1})),
                       ("tbc", "{not json"), ("tbd", json.dumps([1, 2]))):
        (tmp_path / name).mkdir()
        (tmp_path / name / PLAN_FILE).write_text(text)
    (tmp_path / "tbe").mkdir()  # no plan yet: being built
    said: list[str] = []
    assert other_testbeds_nodes("tba", said.append, root=tmp_path) == [41]
    assert len(said) == 2 and all("unreadable" in s for s in said), said
    assert neighbour_entries_needed(1000) == 5256
