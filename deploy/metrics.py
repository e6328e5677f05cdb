"""Prometheus metrics of the API (`GET /metrics`), label sets bounded.

Request metrics are counted by the replica that served the request's API
(the group's own in a one-group app, else an ingress replica); engine metrics
(queue, pool pages, adapter loads) are read from every replica group when
/metrics is scraped, summed over groups. Each ingress replica answers for
itself, so scrape each one (or run one).

Labels stay bounded: `route` is the route template (`/v1/adapters/{name}`,
`unmatched` for anything else), `status` an HTTP status, `adapter` one of
the first `max_adapter_labels` adapters that were served successfully, then
`_other` (`_base` is the base model; adapter names cannot start with `_`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

BASE_LABEL, OTHER_LABEL = "_base", "_other"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ApiMetrics:
    def __init__(self, max_adapter_labels: int = 100) -> None:
        # A registry per API instance: several apps in one process (tests) never collide.
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("bdlora_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("bdlora_request_latency_seconds", "HTTP request latency, to the last byte",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("bdlora_time_to_first_token_seconds", "Time from request to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("bdlora_tokens", "Tokens processed, by kind (prompt, completion)", ["kind"],
                              registry=r)
        self.adapter_requests = Counter("bdlora_adapter_requests", "Completed generation requests per adapter",
                                        ["adapter"], registry=r)
        self.unservable_adapters = Gauge("bdlora_unservable_adapters",
                                         "Adapters in the store that the last GET /v1/models left out: their "
                                         "objects are broken or do not fit the served model", registry=r)
        self.groups = GroupStatsCollector()
        r.register(self.groups)
        self.max_adapter_labels = max_adapter_labels
        self._adapter_labels: set[str] = set()
        self._lock = threading.Lock()

    def adapter_label(self, adapter: str | None) -> str:
        """The label of `adapter`: its own name while there is room, then `_other`."""
        if adapter is None:
            return BASE_LABEL
        with self._lock:
            if adapter in self._adapter_labels:
                return adapter
            if len(self._adapter_labels) < self.max_adapter_labels:
                self._adapter_labels.add(adapter)
                return adapter
        return OTHER_LABEL

    def generation_done(self, adapter: str | None, prompt_tokens: int, completion_tokens: int) -> None:
        """A generation request that the engine accepted has ended (finished or aborted)."""
        self.adapter_requests.labels(self.adapter_label(adapter)).inc()
        self.tokens.labels("prompt").inc(prompt_tokens)
        self.tokens.labels("completion").inc(completion_tokens)


def _num(d: object, key: str) -> float:
    v = d.get(key, 0) if isinstance(d, dict) else 0
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


class GroupStatsCollector(Collector):
    """Engine gauges from the latest `EngineGroup.stats()` of every group, summed.

    Reads `waiting`, `running`, `pool` (rank 0's `PoolUsage.to_dict()`:
    `<kind>_pages`, `adapters`, `loads`, `evictions`, `block_evictions`) and the engine's
    `counters` (`prefix_cache_queries`, `prefix_cache_hits`); missing keys read as 0.
    """

    def __init__(self) -> None:
        self._stats: list[dict] = []
        self._lock = threading.Lock()

    def update(self, stats: Iterable[dict]) -> None:
        with self._lock:
            self._stats = [s for s in stats if isinstance(s, dict)]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            stats = list(self._stats)
        pools = [s.get("pool", {}) for s in stats]
        yield _gauge("bdlora_groups", "Replica groups that answered the last stats call", len(stats))
        yield _gauge("bdlora_queue_length", "Requests waiting in the engines' queues",
                     sum(_num(s, "waiting") for s in stats))
        yield _gauge("bdlora_running_requests", "Requests in the engines' running batches",
                     sum(_num(s, "running") for s in stats))
        pages = GaugeMetricFamily("bdlora_pool_pages", "Unified pool pages (per TP rank) by kind", labels=["kind"])
        kinds = sorted({k for p in pools if isinstance(p, dict) for k in p
                        if k.endswith("_pages") and k != "total_pages"})
        for k in kinds:
            pages.add_metric([k.removesuffix("_pages")], sum(_num(p, k) for p in pools))
        pages.add_metric(["total"], sum(_num(p, "total_pages") for p in pools))
        yield pages
        yield _gauge("bdlora_resident_adapters", "Adapters resident in the pools",
                     sum(_num(p, "adapters") for p in pools))
        # Gauges, not counters: groups come and go, so their sum is not monotonic.
        yield _gauge("bdlora_adapter_loads", "Adapter loads into the pools, summed over live groups",
                     sum(_num(p, "loads") for p in pools))
        yield _gauge("bdlora_adapter_evictions", "Adapter evictions from the pools, summed over live groups",
                     sum(_num(p, "evictions") for p in pools))
        yield _gauge("bdlora_kv_block_evictions", "Cached KV blocks evicted from the pools, summed over live groups",
                     sum(_num(p, "block_evictions") for p in pools))
        counters = [s.get("counters", {}) for s in stats]
        yield _gauge("bdlora_prefix_cache_queries", "Prompt tokens looked up in the prefix cache at admission, "
                     "summed over live groups", sum(_num(c, "prefix_cache_queries") for c in counters))
        yield _gauge("bdlora_prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed again), "
                     "summed over live groups", sum(_num(c, "prefix_cache_hits") for c in counters))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
