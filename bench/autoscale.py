"""Autoscaling across nodes: replica groups, nodes and throughput over time, from one run of the scenario.

    python -m bench autoscale [--out bench/out/autoscale.json] [--plot docs/autoscale.png]

Ray's own autoscaler drives the nodes: `ray.cluster_utils.AutoscalingCluster`
with the `fake_multinode` provider starts real raylets on this machine when a
placement group cannot be placed, and terminates them when idle. The head has
no CPU (no group fits there); a worker node fits exactly one TP=2 group. The
app runs the tiny random Llama with min 1 / max 2 groups, and the scenario is:

1. one group (its placement group brought up the first node); reference greedy
   outputs, one request at a time;
2. load: closed-loop clients past `target_ongoing_requests`: Serve adds a group,
   its placement group is pending, the autoscaler launches a second node;
3. both groups serve: an adapter pushed now is requested in a burst larger than
   one group's `max_ongoing_requests`, so both groups serve it;
4. the load stops, and long streams start until each group runs one: Serve
   removes a group, which finishes its stream first (graceful shutdown); then
   the autoscaler terminates the idle node.

Every request and a sample of the cluster every half second go to the JSON;
tests/test_autoscaling.py runs this scenario and checks them, the plot shows them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray.cluster_utils import AutoscalingCluster

from bdlora_ray.placement import HEAD_NODE_RESOURCE

log = logging.getLogger("bench.autoscale")

APP = "bdlora"
GROUP_DEPLOYMENT = "EngineGroup"
WORKER_TYPE = "group_node"
PROMPTS = ("The autoscaler", "Replica groups come and go", "A node joins the cluster")


@dataclass(frozen=True)
class Knobs:
    """The scenario's timing and load (the same knobs as cluster.yaml and deploy/serve_config.yaml,
    scaled down from minutes to seconds)."""

    target_ongoing_requests: float = 4.0   # per group: the drain streams stay under it, `clients` go past it
    max_ongoing_requests: int = 4          # per group: a burst larger than this spills to the other group
    clients: int = 10                      # closed-loop load
    max_drain_streams: int = 4             # long streams started until each group has one
    burst: int = 10                        # requests for the adapter pushed while both groups run
    # Requests each group must have served before the push: a group that has just started answers
    # Serve's routing probes late (its process still warming up on shared cores) and gets little traffic.
    settle_requests: int = 8
    # Tokens per burst request: long enough that the requests queued behind the group holding the
    # adapter wait past Serve's multiplex matching timeout (1-2 s), after which its router tries the others.
    burst_tokens: int = 96
    max_bursts: int = 3                    # bursts sent at most, until both groups served the pushed adapter
    max_tokens: int = 16                   # per load request
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 6.0
    look_back_period_s: float = 3.0
    metrics_push_interval_s: float = 0.5   # replicas' and handles' load reports to Serve's controller
    graceful_shutdown_timeout_s: float = 120.0  # the drain streams must finish well within it
    idle_timeout_minutes: float = 0.05     # the autoscaler terminates a node idle this long (3 s)
    drain_stream_s: float = 40.0           # aimed length of each drain stream (from the measured rate)
    max_model_len: int = 4096
    phase_timeout_s: float = 240.0         # any one wait of the scenario


class LocalAutoscalingCluster(AutoscalingCluster):
    """Ray's AutoscalingCluster kept to itself: its own temp dir, GCS port and process session.

    The parent's `start` and `shutdown` run `ray stop --force`, which kills every Ray process on the
    machine (other clusters included): here `shutdown` ends only the processes of this cluster's
    session. The installed wheel lacks the parent's base config file (fake_multi_node/example.yaml):
    `_generate_config` writes the same fields."""

    def __init__(self, head_resources: dict, worker_node_types: dict, temp_dir: str, **config_kwargs: Any) -> None:
        self.port = _free_port()
        self.temp_dir = temp_dir
        self.session: int | None = None       # session id of every process of the cluster
        self.address = f"{_node_ip()}:{self.port}"
        super().__init__(head_resources, worker_node_types, **config_kwargs)

    def _generate_config(self, head_resources: dict, worker_node_types: dict, autoscaler_v2: bool = False,
                         **config_kwargs: Any) -> dict:
        return {"cluster_name": "fake_multinode",
                "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
                "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                             "disable_launch_config_check": True, "gcs_address": self.address},
                "available_node_types": {**worker_node_types, "ray.head.default": {
                    "resources": head_resources, "node_config": {}, "max_workers": 0}},
                "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
                "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
                "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
                "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
                "rsync_exclude": [], "rsync_filter": [], **config_kwargs}

    def start(self, _system_config: dict | None = None, override_env: dict | None = None) -> None:
        os.makedirs(self.temp_dir, exist_ok=True)
        config = Path(self.temp_dir, "autoscaling.json")
        config.write_text(json.dumps(self._config))
        head = dict(self._head_resources)
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={self.port}",
               f"--temp-dir={self.temp_dir}", f"--autoscaling-config={config}", f"--num-cpus={head.pop('CPU', 0)}",
               "--include-dashboard=false", "--disable-usage-stats",
               *(f"--{p}={_free_port()}" for p in ("dashboard-port", "ray-client-server-port", "metrics-export-port",
                                                    "dashboard-agent-listen-port", "runtime-env-agent-port"))]
        if head:
            cmd.append(f"--resources={json.dumps(head)}")
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", **(override_env or {})}
        # A session of its own: every process of the cluster (and of the nodes the autoscaler adds)
        # inherits it, so that shutdown can end exactly those.
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        self.session = proc.pid
        _, err = proc.communicate(timeout=180)
        if proc.returncode != 0:
            self.shutdown()
            raise RuntimeError(f"ray start --head failed: {err[-2000:]}")

    def shutdown(self) -> None:
        if self.session is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)  # other processes exiting: nothing to await

    def processes(self) -> list[int]:
        """The live processes of this cluster (its session), nodes the autoscaler added included."""
        if self.session is None:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getsid(int(entry)) == self.session and not _zombie(int(entry)):
                        found.append(int(entry))
                except (ProcessLookupError, PermissionError):
                    pass
        return found


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _node_ip() -> str:
    import ray._private.services

    return ray._private.services.get_node_ip_address()


@dataclass
class Record:
    """One request as the client saw it."""

    kind: str                 # reference | load | burst | drain
    model: str                # the base model or an adapter
    prompt: str
    max_tokens: int
    start: float              # seconds since the scenario began
    end: float = 0.0
    status: int = 0           # HTTP status; 200 for a completion
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    error: str = ""


@dataclass
class Run:
    knobs: Knobs
    t0: float = field(default_factory=time.monotonic)
    requests: list[Record] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)       # t, replica states, worker nodes
    phases: dict[str, float] = field(default_factory=dict)  # phase name -> start time
    groups: dict[str, dict] = field(default_factory=dict)   # replica id -> stats while both groups run
    final_groups: dict[str, dict] = field(default_factory=dict)  # the same at the end
    actors: list[dict] = field(default_factory=list)        # live actors' classes and nodes, both groups running
    placement_groups: list[dict] = field(default_factory=list)
    head_node_id: str = ""
    pushed_adapter: str = ""
    drain: dict = field(default_factory=dict)
    error: str = ""
    leftover_processes: list[int] = field(default_factory=list)  # of the cluster, after its shutdown
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def phase(self, name: str) -> None:
        self.phases[name] = self.now()
        log.info("%.1fs: %s", self.phases[name], name)

    def to_json(self) -> dict:
        return {"knobs": asdict(self.knobs), "requests": [asdict(r) for r in self.requests], "samples": self.samples,
                "phases": self.phases, "groups": self.groups,
                "final_groups": self.final_groups, "actors": self.actors, "placement_groups": self.placement_groups,
                "head_node_id": self.head_node_id, "pushed_adapter": self.pushed_adapter, "drain": self.drain,
                "error": self.error, "leftover_processes": self.leftover_processes}


def complete(run: Run, url: str, kind: str, model: str, prompt: str, max_tokens: int, stream: bool = False,
             ignore_eos: bool = False) -> Record:
    """One greedy completion with the official client (no retries: a lost request must show)."""
    import openai

    rec = Record(kind, model, prompt, max_tokens, run.now())
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    args = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                extra_body={"ignore_eos": True} if ignore_eos else None)
    try:
        if stream:
            parts = []
            for chunk in client.completions.create(**args, stream=True, stream_options={"include_usage": True}):
                if chunk.choices:
                    parts.append(chunk.choices[0].text)
                    rec.finish_reason = chunk.choices[0].finish_reason or rec.finish_reason
                if chunk.usage:
                    rec.tokens = chunk.usage.completion_tokens
            rec.text = "".join(parts)
        else:
            r = client.completions.create(**args)
            rec.text, rec.finish_reason = r.choices[0].text, r.choices[0].finish_reason
            rec.tokens = r.usage.completion_tokens
        rec.status = 200
    except openai.APIStatusError as e:
        rec.status, rec.error = e.status_code, str(e)[:500]
    except Exception as e:  # connection lost, timeout: no status at all
        rec.error = f"{type(e).__name__}: {e}"[:500]
    rec.end = run.now()
    with run.lock:
        run.requests.append(rec)
    return rec


def wait_for(run: Run, condition: Callable[[], Any], what: str, poll_s: float = 0.5) -> Any:
    deadline = time.monotonic() + run.knobs.phase_timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)  # another process's state: nothing to await here
    raise TimeoutError(f"timed out after {run.knobs.phase_timeout_s:.0f}s waiting for {what}")


class Sampler(threading.Thread):
    """Replica states and live worker nodes, every `period_s`."""

    def __init__(self, run: Run, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.run_, self.period_s, self.stopped = run, period_s, threading.Event()

    def run(self) -> None:
        import ray
        from ray import serve

        while not self.stopped.wait(self.period_s):
            try:
                app = serve.status().applications.get(APP)
                deployment = app.deployments.get(GROUP_DEPLOYMENT) if app else None
                replicas = deployment.replica_states if deployment else {}
                states = {str(getattr(k, "value", k)): v for k, v in replicas.items()}
                nodes = sorted(n["NodeID"] for n in ray.nodes()
                               if n["Alive"] and HEAD_NODE_RESOURCE not in n.get("Resources", {}))
            except Exception as e:  # a sample lost is a gap in the plot, nothing more
                log.warning("sample failed: %r", e)
                continue
            self.run_.samples.append({"t": self.run_.now(), "replicas": states, "worker_nodes": nodes})

    def last(self) -> dict:
        return self.run_.samples[-1] if self.run_.samples else {"replicas": {}, "worker_nodes": []}


def actor_nodes() -> list[dict]:
    """Every live actor's class and node (from the GCS: this cluster runs no dashboard)."""
    import ray._private.state

    return sorted(({"class": a["ActorClassName"], "node_id": a["Address"]["NodeID"]}
                   for a in ray._private.state.actors().values() if a["State"] == "ALIVE"),
                  key=lambda a: (a["class"], a["node_id"]))


def group_stats(handle: Any) -> dict[str, dict]:
    """Each running group's stats, by replica id (Serve's broadcast reaches every running replica; one
    that is at its max_ongoing_requests may reject the call, and is left out)."""
    return {s["replica"]: s for s in handle.broadcast("stats").results(timeout_s=60) if isinstance(s, dict)}


def run_scenario(knobs: Knobs, work_dir: Path) -> Run:
    import ray
    from ray import serve

    from bdlora_ray.spec import EngineConfig, GroupConfig, without_credentials
    from deploy import build_app
    from deploy.config import AppConfig, ScalingConfig
    from deploy.local_s3 import LocalS3
    from deploy.seed import seed_adapters, write_checkpoint

    run = Run(knobs)
    # A throwaway loopback cluster needs no token (as the tests' own cluster); this process and,
    # through `ray start`, every node's processes read it.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    s3 = LocalS3().start()
    os.environ.update(s3.env)  # this process (pushes) and, through `ray start`, every node's processes
    model = write_checkpoint(work_dir / "tiny-llama")
    uri = f"s3://{s3.create_bucket('autoscale')}/adapters"
    adapters = seed_adapters(model, work_dir / "peft", uri, 2)
    group = GroupConfig(model_path=str(model), adapters_uri=uri, tp=2, worker_cpus=0.25, replica_cpus=0.1,
                        max_ongoing_requests=knobs.max_ongoing_requests,
                        engine=EngineConfig(max_model_len=knobs.max_model_len), env_vars=without_credentials(s3.env))
    need = sum(b["CPU"] for b in group.bundles())  # 0.6: a node of 1 CPU holds one group, not two
    cluster = LocalAutoscalingCluster(
        head_resources={"CPU": 0}, temp_dir=str(work_dir / "r"), idle_timeout_minutes=knobs.idle_timeout_minutes,
        worker_node_types={WORKER_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0,
                                          "max_workers": 2}})
    assert need <= 1 < 2 * need
    scaling = ScalingConfig(min_groups=1, max_groups=2, target_ongoing_requests=knobs.target_ongoing_requests,
                            upscale_delay_s=knobs.upscale_delay_s, downscale_delay_s=knobs.downscale_delay_s,
                            look_back_period_s=knobs.look_back_period_s,
                            graceful_shutdown_timeout_s=knobs.graceful_shutdown_timeout_s)
    sampler = Sampler(run)
    try:
        cluster.start(override_env={
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH")])),
            # Serve's metrics reach its controller every 10 s by default, which suits a look-back of
            # 30 s; with seconds-long windows they must come faster, or the average sees a gap (and
            # Serve removes a group under load).
            **{f"RAY_SERVE_{who}_AUTOSCALING_METRIC_PUSH_INTERVAL_S": str(knobs.metrics_push_interval_s)
               for who in ("HANDLE", "REPLICA")}})
        ray.init(address=cluster.address, log_to_driver=False)
        run.head_node_id = next(n["NodeID"] for n in ray.nodes() if HEAD_NODE_RESOURCE in n["Resources"])
        port = _free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        sampler.start()
        run.phase("deploy")
        serve.run(build_app(AppConfig(group=group, scaling=scaling)), name=APP, route_prefix="/")
        _scenario(run, f"http://127.0.0.1:{port}", serve.get_deployment_handle(GROUP_DEPLOYMENT, APP), sampler,
                  [group.served_name, *adapters], model, uri, work_dir)
    except Exception as e:
        log.exception("scenario failed")
        run.error = f"{type(e).__name__}: {e}"
    finally:
        sampler.stopped.set()
        if ray.is_initialized():  # else serve.shutdown would start a local cluster to shut down
            try:
                serve.shutdown()
            except Exception:
                log.warning("serve did not shut down cleanly", exc_info=True)
            ray.shutdown()
        cluster.shutdown()
        run.leftover_processes = cluster.processes()
        s3.stop()
    return run


def _scenario(run: Run, url: str, handle: Any, sampler: Sampler, models: list[str], model_dir: Path, uri: str,
              work_dir: Path) -> None:
    """`models`: the base model, then the adapters. The load asks for adapters only; the drain
    streams ask for the base model, so that each group's base-model count says where they run."""
    import ray

    from deploy.seed import DemoAdapter, seed_adapters

    k = run.knobs
    base, adapters = models[0], models[1:]
    running = lambda: sampler.last()["replicas"].get("RUNNING", 0)  # noqa: E731
    run.phase("one group")
    refs = [complete(run, url, "reference", m, p, k.max_tokens) for m in models for p in PROMPTS]
    rate = sum(r.tokens for r in refs) / max(1e-3, sum(r.end - r.start for r in refs))  # tokens/s, one at a time

    run.phase("load")
    stop = threading.Event()

    def client(i: int) -> None:
        n = i
        while not stop.is_set():
            complete(run, url, "load", adapters[n % len(adapters)], PROMPTS[n % len(PROMPTS)], k.max_tokens)
            n += 1

    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(k.clients)]
    for t in clients:
        t.start()
    wait_for(run, lambda: running() >= 2, "Serve to run a second group")
    run.phase("two groups")
    wait_for(run, lambda: len(stats := group_stats(handle)) == 2 and all(
        sum(s["requests_per_adapter"].values()) >= k.settle_requests for s in stats.values()),
        "both groups to serve requests")

    # An adapter pushed while both groups run, requested in a burst that one group cannot take alone.
    run.phase("push")
    run.pushed_adapter = "pushed-live"
    seed_adapters(model_dir, work_dir / "peft", uri, 2, (DemoAdapter(run.pushed_adapter, 8, False, "replicated", 41),))
    # Serve's router decides where a queued request spills; on shared cores it sometimes keeps a whole
    # burst on the first group, so up to `max_bursts` bursts are sent until both groups served the adapter.
    for _ in range(k.max_bursts):
        burst = [threading.Thread(target=complete, args=(run, url, "burst", run.pushed_adapter, PROMPTS[0],
                                                         k.burst_tokens), daemon=True) for _ in range(k.burst)]
        for t in burst:
            t.start()
        for t in burst:
            t.join()
        # A group at max_ongoing_requests may turn a stats call away: ask until both answer.
        run.groups = wait_for(run, lambda: len(g := group_stats(handle)) == 2 and g, "stats from both groups")
        if all(s["requests_per_adapter"].get(run.pushed_adapter, 0) > 0 for s in run.groups.values()):
            break
    run.actors = actor_nodes()

    # The load stops; long streams start one at a time, until each group runs one. With the groups
    # idle, Serve's router sees where each stream went and sends the next to the other group.
    run.phase("load stops")
    stop.set()
    for t in clients:
        t.join()
    run.phase("drain streams")
    n = max(k.max_tokens, min(int(rate * k.drain_stream_s), k.max_model_len - 64))
    run.drain = {"max_tokens": n, "rate_tokens_per_s": rate}
    before = {g: s["requests_per_adapter"].get("", 0) for g, s in group_stats(handle).items()}
    streams: list[threading.Thread] = []

    def streams_per_group() -> dict[str, int]:
        return {g: s["requests_per_adapter"].get("", 0) - before.get(g, 0) for g, s in group_stats(handle).items()}

    while len(streams) < k.max_drain_streams:
        streams.append(threading.Thread(target=complete, args=(run, url, "drain", base, PROMPTS[1], n, True, True),
                                        daemon=True))
        streams[-1].start()
        placed = wait_for(run, lambda: (c := streams_per_group()) and sum(c.values()) == len(streams) and c,
                          "a drain stream to start", poll_s=0.1)
        if len(placed) == 2 and min(placed.values()) >= 1:
            break
    run.drain["streams_per_group"] = placed
    # Nothing polls the groups now: Serve counts every call to a replica as load, and would keep both.
    wait_for(run, lambda: sampler.last()["replicas"].get("STOPPING", 0) >= 1, "Serve to stop a group", poll_s=0.2)
    run.drain["stopping_at"] = run.now()
    run.phase("drain")
    wait_for(run, lambda: running() == 1 and not sampler.last()["replicas"].get("STOPPING"),
             "the removed group to be gone")
    run.phase("one group again")
    for t in streams:
        t.join(timeout=k.phase_timeout_s)
    wait_for(run, lambda: len(sampler.last()["worker_nodes"]) == 1, "the autoscaler to terminate the idle node")
    run.phase("node gone")
    run.final_groups = group_stats(handle)
    run.placement_groups = [{"strategy": pg["strategy"], "state": pg["state"],
                             "nodes": sorted(set(pg["bundles_to_node_id"].values()))}
                            for pg in ray.util.placement_group_table().values()]
    time.sleep(1.0)  # one more sample after the end


def throughput(run: dict, bucket_s: float = 2.0) -> tuple[list[float], list[float]]:
    """Completion tokens per second of finished requests, in `bucket_s` buckets by end time."""
    ends = [(r["end"], r["tokens"]) for r in run["requests"] if r["status"] == 200 and r["kind"] != "drain"]
    if not ends:
        return [], []
    n = int(max(t for t, _ in ends) // bucket_s) + 1
    tokens = [0.0] * n
    for t, k in ends:
        tokens[int(t // bucket_s)] += k
    return [i * bucket_s for i in range(n)], [x / bucket_s for x in tokens]


def plot(run: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [s["t"] for s in run["samples"]]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, dpi=80)
    ax1.step(ts, [s["replicas"].get("RUNNING", 0) for s in run["samples"]], where="post", label="groups running")
    ax1.step(ts, [sum(s["replicas"].values()) for s in run["samples"]], where="post", ls="--",
             label="groups (any state)")
    ax1.step(ts, [len(s["worker_nodes"]) for s in run["samples"]], where="post", ls=":", lw=2, label="worker nodes")
    ax1.set_ylabel("count")
    ax1.set_yticks([0, 1, 2])
    ax1.set_ylim(-0.1, 2.9)
    ax1.legend(loc="upper left", fontsize=8)
    xs, tps = throughput(run)
    ax2.bar(xs, tps, width=2.0, align="edge", color="C2", alpha=0.7, label="tokens/s of finished requests")
    ax2.set_ylabel("tokens/s")
    ax2.set_xlabel("seconds")
    grid = [i * 0.5 for i in range(int(max(ts, default=0) / 0.5) + 1)]
    ax3 = ax2.twinx()
    ax3.plot(grid, [sum(r["start"] <= t < r["end"] for r in run["requests"]) for t in grid], color="C3", lw=1,
             label="requests in flight")
    ax3.set_ylabel("in flight")
    ax2.legend(loc="upper left", fontsize=8)
    ax3.legend(loc="upper right", fontsize=8)
    for i, (name, t) in enumerate(run["phases"].items()):
        for ax in (ax1, ax2):
            ax.axvline(t, color="grey", lw=0.6)
        ax1.annotate(name, (t, 2.1 + 0.35 * (i % 2)), fontsize=7, rotation=20, annotation_clip=False)
    k = run["knobs"]
    fig.suptitle(f"Serve + Ray autoscaler (fake_multinode): min 1 / max 2 TP=2 groups, one group per node; "
                 f"target {k['target_ongoing_requests']:g} ongoing, {k['clients']} clients", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def summary(run: dict) -> str:
    reqs = run["requests"]
    ok = sum(r["status"] == 200 for r in reqs)
    rows = [("requests", f"{len(reqs)} ({ok} completed, {len(reqs) - ok} failed)"),
            ("max groups running", str(max((s["replicas"].get("RUNNING", 0) for s in run["samples"]), default=0))),
            ("max worker nodes", str(max((len(s["worker_nodes"]) for s in run["samples"]), default=0)))]
    rows += [(f"phase: {name}", f"{t:.1f}s") for name, t in run["phases"].items()]
    if run["error"]:
        rows.append(("error", run["error"]))
    return "\n".join(f"{a:<28} {b}" for a, b in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench autoscale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/out/autoscale.json"))
    ap.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="checkpoint, adapters and Ray temp dir (default: a fresh one)")
    args = ap.parse_args(argv)
    # Terminated (a test's timeout): unwind, so that the cluster is shut down on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Ray's temp paths (sockets) must stay short: a fresh dir under RAY_TMPDIR (or /tmp).
    work = args.work_dir
    if work is None:
        parent = os.environ.get("RAY_TMPDIR")
        if parent:
            os.makedirs(parent, exist_ok=True)  # as Ray makes it
        work = Path(tempfile.mkdtemp(prefix="asc-", dir=parent))
    result = run_scenario(Knobs(), work).to_json()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    print(summary(result))
    return 1 if result["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
