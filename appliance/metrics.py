"""Prometheus metrics at GET /metrics: the services' counters and the deployments' node states, read at scrape time.

Nothing is counted twice: the boot services keep their plain counters (`stats()`), and a custom collector
turns them into Prometheus families when Prometheus scrapes, so the hot paths pay nothing for metrics.
The page carries counts only, no node token nor credential, and is served without an API token, as
Prometheus expects.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from domain.latency import Latency

# Counters that are levels, not totals (everything else a service counts only grows).
GAUGES = frozenset({"transfers_active", "leases", "lease_rows_pending", "pending_forwards", "cache_bytes",
                    "offers_pending", "exchanges_tracked", "rate_limit_sources", "calls_in_flight",
                    "gc_pause_gen0_max_us", "gc_pause_gen1_max_us", "gc_pause_gen2_max_us", "lag_max_us"})
Stats = Callable[[], Mapping[str, Mapping[str, int]]]
Histograms = Callable[[], Mapping[str, Mapping[str, Latency]]]  # service -> what is timed -> its histogram
NodeStates = Callable[[], Iterable[tuple[str, str]]]  # (deployment status, node state) of every live run


class ApplianceCollector:
    """A prometheus_client collector over the appliance's counters and its live deployments."""

    def __init__(self, stats: Stats, node_states: NodeStates, histograms: Histograms | None = None) -> None:
        self._stats = stats
        self._node_states = node_states
        self._histograms = histograms

    def collect(self) -> Iterable[Metric]:
        """Return every family, read now."""
        for service, counters in sorted(self._stats().items()):
            for key, value in sorted(counters.items()):
                name = f"rackboot_{service}_{key}"
                if key in GAUGES:
                    yield GaugeMetricFamily(name, f"{service}: {key.replace('_', ' ')}", value=value)
                else:
                    yield CounterMetricFamily(name, f"{service}: {key.replace('_', ' ')}", value=value)
        for service, timed in sorted((self._histograms() if self._histograms else {}).items()):
            for what, latency in sorted(timed.items()):
                yield HistogramMetricFamily(f"rackboot_{service}_{what}_seconds", f"{service}: {what} latency",
                                            buckets=latency.cumulative(), sum_value=latency.total)
        nodes = GaugeMetricFamily("rackboot_deployment_nodes", "nodes of live deployments, by node state",
                                  labels=["state"])
        for state, count in sorted(Counter(state for _, state in self._node_states()).items()):
            nodes.add_metric([state], count)
        yield nodes


def add_metrics_route(app: web.Application, stats: Stats, node_states: NodeStates,
                      histograms: Histograms | None = None) -> CollectorRegistry:
    """Serve GET /metrics on app from a registry of its own (not prometheus_client's global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ApplianceCollector(stats, node_states, histograms))  # type: ignore[arg-type]

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics)
    return registry
