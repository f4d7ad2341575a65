"""Chain, tree and star broadcast over real loopback sockets (127.0.0.x), many relays in one process."""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest
import zstandard
from aiohttp import web

from domain.errors import MalformedPacket
from broadcast.image import SinkSpec
from broadcast.methods import BroadcastJob, broadcast_with_fallback, run_broadcast
from broadcast.params import ChainParams
from broadcast.receiver import Receiver
from broadcast.splice import KernelSplice
from broadcast.topology import Subtree, Target, build_forest, forest_for, order_chain
from broadcast.wire import decode, encode, open_connection
from receiver_faults import FaultyReceiver

pytestmark = pytest.mark.timeout(60)
PAYLOAD_SIZE = 8 << 20


@pytest.fixture(scope="module")
def payload() -> bytes:
    """8 MiB that compresses a little (random blocks and runs)."""
    rnd = os.urandom(1 << 20)
    return b"".join(rnd if i % 2 else bytes(1 << 20) for i in range(8))


@pytest.fixture
def image(tmp_path: Path, payload: bytes) -> tuple[Path, str]:
    path = tmp_path / "image.raw.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=1).compress(payload))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


class Cluster:
    """n receivers on 127.0.0.2.. with raw sinks in tmp_path; arm() records the session."""

    def __init__(self, tmp_path: Path, n: int, racks: int = 1) -> None:
        self.tmp = tmp_path
        self.receivers = [FaultyReceiver(f"node-{i + 1}", f"127.0.0.{i + 2}") for i in range(n)]
        self.racks = racks
        self.session = ""
        self.armed = asyncio.Event()
        self.fail_arm: set[str] = set()

    async def __aenter__(self) -> "Cluster":
        for r in self.receivers:
            await r.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for r in self.receivers:
            await r.close()

    def __getitem__(self, name: str) -> FaultyReceiver:
        return next(r for r in self.receivers if r.name == name)

    @property
    def targets(self) -> list[Target]:
        return [Target(r.name, r.host, r.port, rack=f"r{i % self.racks}", switch=f"s{i % self.racks}")
                for i, r in enumerate(self.receivers)]

    async def arm(self, t: Target, session: str, token: str) -> None:
        if t.name in self.fail_arm:
            self.fail_arm.discard(t.name)
            raise OSError("ssh: connection refused")
        self[t.name].arm(session, token, SinkSpec(kind="raw", compression="zstd", target=str(self.tmp / f"{t.name}.disk")))
        self.session = session
        self.armed.set()

    def disk(self, name: str) -> bytes:
        return (self.tmp / f"{name}.disk").read_bytes()

    async def when_progress(self, name: str, at_least: int, action: Callable[[FaultyReceiver], None]) -> None:
        await self.armed.wait()
        r = self[name]
        while r.progress(self.session) < at_least:
            await asyncio.sleep(0.005)
        action(r)


def job(image: tuple[Path, str], **params: float) -> BroadcastJob:
    tuning = {"stall_timeout": 1.0, "connect_timeout": 2.0, "ack_interval": 0.05, "chunk": 64 * 1024, "window": 2 << 20, **params}
    return BroadcastJob(image=image[0], sha256=image[1], deadline=40, params=ChainParams(**tuning))  # type: ignore[arg-type]


def check_survivors(result, cluster: Cluster, payload: bytes, image: tuple[Path, str], dead: set[str]) -> None:
    assert set(result.nodes) == {r.name for r in cluster.receivers}
    assert set(result.failed) == dead, {n: result.nodes[n].reason for n in result.failed}
    for name in result.ok:
        r = result.nodes[name]
        assert r.sha256 == image[1] and r.bytes_received == image[0].stat().st_size
        assert r.written_sha256 == ""  # not asked for: the disk itself is compared
        assert cluster.disk(name) == payload


async def test_chain_all_nodes(tmp_path: Path, image: tuple[Path, str], payload: bytes) -> None:
    async with Cluster(tmp_path, 6) as c:
        result = await run_broadcast(job(image), c.targets, "chain", c.arm)
    check_survivors(result, c, payload, image, set())
    assert result.method == "chain" and result.size == image[0].stat().st_size
    assert all(r.reported_by == r.name and r.durations["total"] >= 0 for r in result.nodes.values())


async def test_relays_free_what_every_child_has_acknowledged(tmp_path: Path, image: tuple[Path, str], payload: bytes) -> None:
    """A relay keeps in memory only what its disk writer and its children may still need, not the image so far."""
    size = image[0].stat().st_size
    held: dict[str, int] = {}
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            for r in c.receivers:
                for relay in r.relays.values():
                    held[r.name] = max(held.get(r.name, 0), relay.held_bytes())
            await asyncio.sleep(0.005)

    async with Cluster(tmp_path, 5) as c:
        sampler = asyncio.create_task(sample())
        result = await run_broadcast(job(image, source_rate=size), c.targets, "chain", c.arm)  # ~1 s of stream
        done.set()
        await sampler
    check_survivors(result, c, payload, image, set())
    assert len(held) == 5, held
    # At `size` bytes/s with acknowledgements every 50 ms a relay needs a few hundred KiB; before, each held it all.
    assert max(held.values()) < size // 3, held


async def test_chain_node_killed_mid_stream_is_bypassed(tmp_path: Path, image: tuple[Path, str], payload: bytes) -> None:
    size = image[0].stat().st_size
    async with Cluster(tmp_path, 7) as c:
        killer = asyncio.create_task(c.when_progress("node-4", size // 4, FaultyReceiver.kill))
        result = await run_broadcast(job(image, source_rate=size), c.targets, "chain", c.arm)  # ~1 s of stream
        await killer
    check_survivors(result, c, payload, image, {"node-4"})
    dead = result.nodes["node-4"]
    assert dead.reported_by == "node-3" and dead.reason.startswith("connection lost at offset")


async def test_chain_stalled_node_is_bypassed(tmp_path: Path, image: tuple[Path, str], payload: bytes) -> None:
    size = image[0].stat().st_size
    async with Cluster(tmp_path, 5) as c:
        freezer = asyncio.create_task(c.when_progress("node-2", size // 4, FaultyReceiver.freeze))
        result = await run_broadcast(job(image, source_rate=size), c.targets, "chain", c.arm)
        await freezer
    check_survivors(result, c, payload, image, {"node-2"})
    assert result.nodes["node-2"].reported_by == "node-1"
    assert result.nodes["node-2"].reason.startswith("stalled")


async def test_nodes_that_hang_one_after_another_cost_the_chain_a_suspicion_each_not_a_stall_timeout(
        tmp_path: Path, image: tuple[Path, str], payload: bytes) -> None:
    """Two nodes of a chain hang where the stream reaches them (the second only once the first is passed): each
    is bypassed once suspect, so the nodes below are fed on and none waits out a stall timeout (6 s here; they
    waited 12 s before suspects were bypassed). The hung nodes are still reported stalled, by their parents."""
    size = image[0].stat().st_size
    async with Cluster(tmp_path, 8) as c:
        hangs = [asyncio.create_task(c.when_progress(n, size // 4, FaultyReceiver.freeze)) for n in ("node-2", "node-5")]
        result = await run_broadcast(job(image, source_rate=size, stall_timeout=6.0, suspect_after=0.3), c.targets, "chain", c.arm)
        await asyncio.gather(*hangs)
    check_survivors(result, c, payload, image, {"node-2", "node-5"})
    for name, parent in (("node-2", "node-1"), ("node-5", "node-4")):
        hung = result.nodes[name]
        assert hung.reported_by == parent and hung.reason.startswith("stalled"), hung
        assert hung.notes[0].startswith(f"bypassed by {parent}: no "), hung.notes
    assert result.counters["bypassed"] == 2
    waits = {n: result.nodes[n].durations["total"] for n in result.ok}
    assert max(waits.values()) < 6.0, waits


async def test_a_suspect_that_answers_again_is_fed_by_the_source_and_deployed(
        tmp_path: Path, image: tuple[Path, str], payload: bytes) -> None:
    """A node silent for a while (a held process) is bypassed, then answers: it is handed to the source, which
    feeds it to the end, and its children stay with the parent that took them over. Nobody fails."""
    size = image[0].stat().st_size
    async with Cluster(tmp_path, 6) as c:
        pause = asyncio.create_task(c.when_progress("node-3", size // 4, lambda r: r.mute(1.0)))
        result = await run_broadcast(job(image, source_rate=size, stall_timeout=6.0, suspect_after=0.3), c.targets, "chain", c.arm)
        await pause
    check_survivors(result, c, payload, image, set())
    assert result.counters == {"bypassed": 1, "orphans": 1, "dropped_malformed": 0}, result.counters
    # silent (no acknowledgement) or, when the held node's last ack came just before, stuck with data pending
    assert re.match(r"bypassed by node-2: no (acknowledgement|progress) for 0\.3 s", result.nodes["node-3"].notes[0]), \
        result.nodes["node-3"].notes


async def test_a_node_that_dies_between_its_last_byte_and_its_report_is_reported_by_its_parent(
        tmp_path: Path, image: tuple[Path, str], payload: bytes) -> None:
    """A node that has the whole stream (its acknowledgements say so) hangs before its report leaves: its parent
    watches it until it says its report is sent, so it is reported stalled. Before, the parent let it go at its
    last byte, nobody reported it, and the session waited for its deadline (4000 nodes: 76 minutes)."""
    async with Cluster(tmp_path, 3) as c:  # the last node: its acknowledgements say all below it has the stream
        c["node-3"].freeze_at_result = True
        result = await run_broadcast(job(image), c.targets, "chain", c.arm)
    check_survivors(result, c, payload, image, {"node-3"})
    hung = result.nodes["node-3"]
    assert hung.reported_by == "node-2" and hung.reason == f"stalled: no acknowledgement for 1 s (at offset {image[0].stat().st_size})"


async def test_a_node_whose_report_is_lost_does_not_hold_the_session(tmp_path: Path, image: tuple[Path, str],
                                                                     payload: bytes) -> None:
    """The safety net: a node's report is lost although it said it was sent (a node and its parent both dying
    between their reports). The source, hearing no report for quiet_after and feeding nobody, ends the session
    without a deadline and says why."""
    size = image[0].stat().st_size
    async with Cluster(tmp_path, 4) as c:
        lose = asyncio.create_task(c.when_progress("node-4", size // 2, FaultyReceiver.lose_reports))
        # no deadline: without the quiet rule the session waited for ever (until the test's own timeout)
        session = dataclasses.replace(job(image, source_rate=size), deadline=None)
        result = await run_broadcast(session, c.targets, "chain", c.arm)
        await lose
    assert result.ok == ["node-1", "node-2", "node-3"] and c.disk("node-4") == payload, {n: r.reason for n, r in result.nodes.items()}
    lost = result.nodes["node-4"]
    assert lost.reported_by == "@source" and lost.reason == "no report (and none from any node for 6 s)"


async def test_a_relay_that_lost_its_route_hands_its_orphans_to_the_source_instead_of_walking_the_chain(
        tmp_path: Path, image: tuple[Path, str], payload: bytes) -> None:
    """node-3 loses its address mid-stream with its code running: it stops hearing node-4, suspects it and tries
    its child, which fails for want of any route. It hands that node to the source once, where it used to adopt
    the next one, and the next, down the whole chain (4000 connects in a testbed daemon's loop)."""
    size = image[0].stat().st_size
    attempts: list[list[tuple[str, int]]] = []
    async with Cluster(tmp_path, 8) as c:
        lose = asyncio.create_task(c.when_progress("node-3", size // 4, lambda r: attempts.append(r.lose_network())))
        result = await run_broadcast(job(image, source_rate=size, stall_timeout=3.0), c.targets, "chain", c.arm)
        await lose
    check_survivors(result, c, payload, image, {"node-3"})
    assert attempts[0] == [(c["node-5"].host, c["node-5"].port)], attempts  # node-3 suspected node-4, tried node-5


async def test_the_hellos_go_down_the_chain_while_the_disks_are_still_opening(tmp_path: Path, image: tuple[Path, str],
                                                                              payload: bytes) -> None:
    """Every thread of the process's pool is busy (500 testbed nodes share a daemon's 6 with their disk writes):
    the chain is still set up to its end, the disks opened once threads free up. Before, each relay opened its disk
    before it answered its upstream and greeted its children, so each hop waited for a thread."""
    gate = threading.Event()
    loop = asyncio.get_running_loop()
    busy = [loop.run_in_executor(None, gate.wait) for _ in range(min(32, (os.cpu_count() or 1) + 4))]
    try:
        async with Cluster(tmp_path, 5) as c:
            broadcast = asyncio.create_task(run_broadcast(job(image), c.targets, "chain", c.arm))
            async with asyncio.timeout(10):
                while not all(r.relays for r in c.receivers):
                    await asyncio.sleep(0.01)
            gate.set()
            result = await broadcast
    finally:
        gate.set()
        await asyncio.gather(*busy)
    check_survivors(result, c, payload, image, set())


async def test_a_held_event_loop_does_not_make_children_suspect(tmp_path: Path, image: tuple[Path, str], payload: bytes) -> None:
    """Every relay and the source share this loop; holding it past the stall timeout (a lagging testbed daemon,
    a node's process descheduled) is not the children's silence: nobody is bypassed or failed."""
    size = image[0].stat().st_size
    async with Cluster(tmp_path, 5) as c:
        hold = asyncio.create_task(c.when_progress("node-3", size // 3, lambda r: time.sleep(1.5)))
        result = await run_broadcast(job(image, source_rate=size), c.targets, "chain", c.arm)  # stall timeout 1 s
        await hold
    check_survivors(result, c, payload, image, set())
    assert result.counters["bypassed"] == 0


async def test_chain_first_node_and_two_consecutive_nodes_killed(tmp_path: Path, image: tuple[Path, str], payload: bytes) -> None:
    size = image[0].stat().st_size
    async with Cluster(tmp_path, 8) as c:
        kills = [asyncio.create_task(c.when_progress(n, size // 3, FaultyReceiver.kill)) for n in ("node-1", "node-5", "node-6")]
        result = await run_broadcast(job(image, source_rate=size), c.targets, "chain", c.arm)
        await asyncio.gather(*kills)
    check_survivors(result, c, payload, image, {"node-1", "node-5", "node-6"})
    assert result.nodes["node-1"].reported_by == "@source"


async def test_tree_inner_node_killed_children_adopted(tmp_path: Path, image: tuple[Path, str], payload: bytes) -> None:
    size = image[0].stat().st_size
    async with Cluster(tmp_path, 9) as c:
        forest = build_forest(c.targets, 2)
        inner = forest[0].children()[0].name  # has children of its own
        assert forest[0].children()[0].children()
        killer = asyncio.create_task(c.when_progress(inner, size // 4, FaultyReceiver.kill))
        j = job(image, source_rate=size)
        result = await run_broadcast(BroadcastJob(**{**j.__dict__, "fanout": 2}), c.targets, "tree", c.arm)
        await killer
    check_survivors(result, c, payload, image, {inner})
    assert result.method == "tree"


async def test_dead_node_before_start_and_refused_arm(tmp_path: Path, image: tuple[Path, str], payload: bytes) -> None:
    async with Cluster(tmp_path, 5) as c:
        c["node-2"].kill()  # powered off: connection refused
        c.fail_arm.add("node-4")
        result = await run_broadcast(job(image), c.targets, "chain", c.arm)
    check_survivors(result, c, payload, image, {"node-2", "node-4"})
    assert result.nodes["node-2"].reason.startswith("unreachable")
    assert result.nodes["node-4"].reason == "arm failed: ssh: connection refused"


@pytest.fixture
async def http_image(image: tuple[Path, str]) -> AsyncIterator[str]:
    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(image[0])

    app = web.Application()
    app.router.add_get("/images/img.zst", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/images/img.zst"
    await runner.cleanup()


async def test_star_with_concurrency_limit_and_dead_node(tmp_path: Path, image: tuple[Path, str], payload: bytes,
                                                        http_image: str) -> None:
    async with Cluster(tmp_path, 5) as c:
        c["node-3"].kill()
        j = BroadcastJob(**{**job(image).__dict__, "url": http_image, "concurrency": 2})
        result = await run_broadcast(j, c.targets, "star", c.arm)
    check_survivors(result, c, payload, image, {"node-3"})
    assert result.nodes["node-3"].reason.startswith("unreachable")


async def test_fallback_chain_then_star(tmp_path: Path, image: tuple[Path, str], payload: bytes, http_image: str) -> None:
    async with Cluster(tmp_path, 4) as c:
        c.fail_arm.add("node-2")  # only the first attempt fails for it
        j = BroadcastJob(**{**job(image).__dict__, "url": http_image})
        result = await broadcast_with_fallback(j, c.targets, ("chain", "star"), c.arm)
    check_survivors(result, c, payload, image, set())
    assert result.method == "chain+star"
    assert result.nodes["node-2"].notes == ["chain: arm failed: ssh: connection refused"]


async def test_wrong_token_and_malformed_hello_refused(tmp_path: Path) -> None:
    r = Receiver("node-1", "127.0.0.2")
    await r.start()
    r.arm("s1", "secret", SinkSpec(kind="discard", compression="none"))
    try:
        conn = await open_connection(r.host, r.port, 2.0)
        await conn.send("hello", v=1, session="s1", token="guess", ancestors=[], tree=[["node-1", "127.0.0.2", r.port, 1]],
                        size=10, sha256=None, report=["127.0.0.1", 9], params={}, **{"from": "x"})
        assert (await conn.recv()) == {"type": "error", "reason": "unknown session or bad token"}
        conn.close()
        conn = await open_connection(r.host, r.port, 2.0)
        await conn.send("hello", v=1, session="s1", token="secret", ancestors=[], tree=[["node-9", "127.0.0.2", r.port, 1]],
                        size=10, sha256=None, report=["127.0.0.1", 9], params={}, **{"from": "x"})
        reply = await conn.recv()
        assert reply is not None and reply["type"] == "error" and "node-9" in reply["reason"]
        conn.close()
        conn = await open_connection(r.host, r.port, 2.0)
        await asyncio.get_running_loop().sock_sendall(conn.sock, b"\x80\x03pickle?\n")
        assert await conn.recv() is None
        assert r.stats()["refused"] == 1 and r.stats()["dropped_malformed"] == 2
    finally:
        await r.close()


def test_wire_schema() -> None:
    assert decode(encode("ready", offset=5).rstrip(b"\n")) == {"type": "ready", "offset": 5}
    for bad in (b"[1]", b'{"type":"ready"}', b'{"type":"ready","offset":"5"}', b'{"type":"ready","offset":true}',
                b'{"type":"ready","offset":1,"x":2}', b'{"type":"nope"}', b"\xff"):
        with pytest.raises(MalformedPacket):
            decode(bad)
    with pytest.raises(MalformedPacket):
        Subtree.from_json([["a", "h", 1, 2], ["b", "h", 1, 2]])  # b's subtree overflows a's
    for bad_params in ({"chunk": 1.5}, {"window": -1}, {"resume_depth": 0}, {"pickle": 1}, {"stall_timeout": True}):
        with pytest.raises(MalformedPacket):
            ChainParams.from_json(bad_params)
    assert ChainParams.from_json(ChainParams(stall_timeout=2).to_json()).stall_timeout == 2


def test_order_chain_crosses_each_switch_once() -> None:
    nodes = [Target(f"n{i}", "h", 1, rack=f"r{i % 4}", switch=f"s{i % 2}") for i in range(12)]
    ordered = order_chain(nodes)
    switches = [n.switch for n in ordered]
    assert sum(1 for a, b in zip(switches, switches[1:]) if a != b) == 1
    racks = [n.rack for n in ordered]
    assert sum(1 for a, b in zip(racks, racks[1:]) if a != b) == 3
    assert [n.name for n in ordered][:3] == ["n0", "n4", "n8"]  # inventory order kept inside a rack


def test_forest_shapes() -> None:
    ts = [Target(f"n{i}", "h", 1) for i in range(10)]
    chain = build_forest(ts, 1)
    assert len(chain) == 1 and chain[0].depth() == 9 and chain[0].names() == [t.name for t in ts]
    tree = build_forest(ts, 3)
    assert sum(len(t) for t in tree) == 10 and len(tree) == 3
    assert all(len(t.children()) <= 3 for t in tree)
    long_chain = build_forest([Target(f"n{i}", "h", 1) for i in range(5000)], 1)[0]
    assert Subtree.from_json(long_chain.to_json()).depth() == 4999  # no recursion limit


# ---------------------------------------------------------------------------------------------------
# Relay data path: kernel pipes (splice/tee) vs copies through Python.

needs_splice = pytest.mark.skipif(not KernelSplice().available, reason="splice/tee need Linux")


class HalfTee(KernelSplice):
    """A kernel whose tee(2) duplicates at most half of what is asked, as into a nearly full pipe."""

    def tee(self, src: int, dst: int, count: int) -> int:
        return super().tee(src, dst, max(1, count // 2))


class RefusingSockets(KernelSplice):
    """A kernel whose sockets refuse splice(2) the way fd types without splice support do (EINVAL)."""

    def splice(self, src: int, dst: int, count: int) -> int:
        for fd in (src, dst):
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return super().splice(src, dst, count)


def path_stats(cluster: Cluster) -> dict[str, int]:
    """The relays' byte counters, summed over the cluster."""
    total: dict[str, int] = {}
    for r in cluster.receivers:
        for k, v in r.stats().items():
            total[k] = total.get(k, 0) + v
    return total


@needs_splice
@pytest.mark.parametrize("method", ["chain", "tree"])
@pytest.mark.parametrize("relay_path", ["splice", "python"])
async def test_relay_paths_forced(tmp_path: Path, image: tuple[Path, str], payload: bytes, method: str, relay_path: str) -> None:
    async with Cluster(tmp_path, 6) as c:
        j = job(image, relay_path=relay_path)  # type: ignore[arg-type]
        result = await run_broadcast(BroadcastJob(**{**j.__dict__, "fanout": 2}), c.targets, method, c.arm)
        stats = path_stats(c)
    check_survivors(result, c, payload, image, set())
    size = image[0].stat().st_size
    fed_by_relays = len(c.receivers) - len(forest_for(method, c.targets, 2))  # the roots are fed by the source
    assert stats["spliced_out"] + stats["copied_out"] == size * fed_by_relays
    assert stats["spliced_in"] + stats["received_in"] == size * len(c.receivers)
    if relay_path == "python":
        assert stats["spliced_out"] == stats["spliced_in"] == 0
    else:
        assert stats["spliced_out"] > size * fed_by_relays // 2, stats  # most of it through the kernel
    assert stats["splice_refused"] == 0


@needs_splice
@pytest.mark.parametrize("relay_path", ["splice", "python"])
async def test_relay_paths_survive_a_killed_node(tmp_path: Path, image: tuple[Path, str], payload: bytes, relay_path: str) -> None:
    size = image[0].stat().st_size
    async with Cluster(tmp_path, 6) as c:
        killer = asyncio.create_task(c.when_progress("node-3", size // 3, FaultyReceiver.kill))
        result = await run_broadcast(job(image, source_rate=size, relay_path=relay_path), c.targets, "chain", c.arm)  # type: ignore[arg-type]
        await killer
        stats = path_stats(c)
    check_survivors(result, c, payload, image, {"node-3"})
    assert result.nodes["node-3"].reported_by == "node-2"
    assert (stats["spliced_out"] > 0) == (relay_path == "splice")


@needs_splice
async def test_lagging_children_catch_up_by_copies_and_rejoin_the_pipes(tmp_path: Path, image: tuple[Path, str],
                                                                       payload: bytes) -> None:
    async with Cluster(tmp_path, 4) as c:
        for r in c.receivers:
            r.kernel = HalfTee()
        result = await run_broadcast(job(image, relay_path="splice"), c.targets, "chain", c.arm)  # type: ignore[arg-type]
        stats = path_stats(c)
    check_survivors(result, c, payload, image, set())
    assert stats["spliced_out"] > 0 and stats["copied_out"] > 0, stats


@needs_splice
async def test_sockets_refusing_splice_fall_back_to_copies(tmp_path: Path, image: tuple[Path, str], payload: bytes) -> None:
    async with Cluster(tmp_path, 4) as c:
        for r in c.receivers:
            r.kernel = RefusingSockets()
        result = await run_broadcast(job(image), c.targets, "chain", c.arm)  # relay_path auto
        stats = path_stats(c)
    check_survivors(result, c, payload, image, set())
    assert stats["spliced_out"] == 0 and stats["splice_refused"] >= 3, stats
    assert stats["copied_out"] == 3 * image[0].stat().st_size


async def test_splice_forced_where_unavailable_is_refused_and_auto_copies(tmp_path: Path, image: tuple[Path, str],
                                                                         payload: bytes) -> None:
    async with Cluster(tmp_path, 3) as c:
        for r in c.receivers:
            r.kernel = KernelSplice(enabled=False)
        forced = await run_broadcast(job(image, relay_path="splice"), c.targets, "chain", c.arm)  # type: ignore[arg-type]
        auto = await run_broadcast(job(image), c.targets, "chain", c.arm)
        stats = path_stats(c)
    assert forced.failed == ["node-1", "node-2", "node-3"]
    assert forced.nodes["node-1"].reason == "refused: relay_path splice: not available on node-1: disabled"
    check_survivors(auto, c, payload, image, set())
    assert stats["spliced_in"] == 0 and stats["copied_out"] == 2 * image[0].stat().st_size


def test_relay_path_param() -> None:
    assert ChainParams.from_json({"relay_path": "python"}).relay_path == "python"
    for bad in ({"relay_path": "zerocopy"}, {"relay_path": 1}, {"relay_path": None}):
        with pytest.raises(MalformedPacket):
            ChainParams.from_json(bad)
    with pytest.raises(ValueError):
        ChainParams(relay_path="sendfile")
