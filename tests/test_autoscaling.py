"""Autoscaling across nodes with Ray's own autoscaler (bench/autoscale.py's scenario, checked here).

The scenario starts its own cluster (`AutoscalingCluster`, provider `fake_multinode`), so it runs in
a subprocess: this test session's Ray cluster (tests/conftest.py) is neither used nor disturbed.
Head: no CPU; worker node type: one TP=2 group fits, two do not; min 1 / max 2 groups.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scenario() -> dict:
    base = os.environ.get("RAY_TMPDIR", "/tmp")
    os.makedirs(base, exist_ok=True)
    # Short: Ray's socket paths live under it. The scenario's log is kept beside the test's RAY_TMPDIR.
    with tempfile.TemporaryDirectory(prefix="asc-", dir=base, ignore_cleanup_errors=True) as work:
        out = Path(work, "autoscale.json")
        p = subprocess.Popen([sys.executable, "-m", "bench", "autoscale", "--out", str(out), "--work-dir", work],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _, err = p.communicate(timeout=480)
        except subprocess.TimeoutExpired:
            p.terminate()  # the scenario shuts its cluster down on SIGTERM
            _, err = p.communicate(timeout=120)
        Path(base, "autoscale-scenario.log").write_text(err)
        assert out.is_file(), err[-4000:]
        run = json.loads(out.read_text())
    assert not run["error"] and p.returncode == 0, (run["error"], err[-4000:])
    assert run["leftover_processes"] == []   # the cluster's shutdown ended every process it had
    return run


def _changes(run: dict, key) -> list:
    """The successive distinct values of `key(sample)` over the run."""
    values = []
    for s in run["samples"]:
        v = key(s)
        if not values or values[-1] != v:
            values.append(v)
    return values


def _first(run: dict, condition, after: float = 0.0) -> float:
    return next(s["t"] for s in run["samples"] if s["t"] >= after and condition(s))


@pytest.mark.slow
def test_groups_and_nodes_follow_the_load(scenario):
    run = scenario
    running = _changes(run, lambda s: s["replicas"].get("RUNNING", 0))
    nodes = _changes(run, lambda s: len(s["worker_nodes"]))
    # One group on one node; a second group on a second node under load; back to one of each.
    assert running[-3:] == [1, 2, 1] and max(running) == 2, running
    assert nodes[-3:] == [1, 2, 1] and max(nodes) == 2, nodes
    # The autoscaler launched the second node for the second group's placement group (Serve asked
    # for the group first), and terminated it after the group was gone.
    group_asked = _first(run, lambda s: sum(s["replicas"].values()) == 2, run["phases"]["load"])
    node_up = _first(run, lambda s: len(s["worker_nodes"]) == 2, run["phases"]["load"])
    group_gone = _first(run, lambda s: sum(s["replicas"].values()) == 1, run["phases"]["drain"])
    node_gone = _first(run, lambda s: len(s["worker_nodes"]) == 1, run["phases"]["drain"])
    assert group_asked <= node_up and group_gone <= node_gone


@pytest.mark.slow
def test_every_request_completes_with_the_one_group_reference(scenario):
    reqs = scenario["requests"]
    assert all(r["status"] == 200 and not r["error"] for r in reqs), [r for r in reqs if r["status"] != 200][:3]
    refs = {(r["model"], r["prompt"]): r["text"] for r in reqs if r["kind"] == "reference"}
    assert len(refs) >= 8 and all(refs.values())
    # The adapters change the output, so an adapter applied on the wrong group (or not at all) shows.
    by_prompt = Counter(text for text in refs.values())
    assert len(by_prompt) > len(refs) // 2
    load = [r for r in reqs if r["kind"] == "load"]
    # Load ran before, during and after the second group came up.
    assert min(r["start"] for r in load) < scenario["phases"]["two groups"] < max(r["end"] for r in load)
    assert [r for r in load if r["text"] != refs[(r["model"], r["prompt"])]] == []
    assert all(r["tokens"] == r["max_tokens"] or r["finish_reason"] == "stop" for r in load)


@pytest.mark.slow
def test_a_groups_tp_workers_share_one_worker_node(scenario):
    run = scenario
    nodes = []
    for replica, stats in run["groups"].items():
        (node,) = {w["node_id"] for w in stats["workers"]}   # every rank of the group on one node
        assert len(stats["workers"]) == 2 and node != run["head_node_id"]
        nodes.append(node)
    assert len(nodes) == 2 and len(set(nodes)) == 2          # one group per node
    # What must outlive scaling stays on the head: the adapter store and the HTTP ingress.
    on = {(a["class"], a["node_id"]) for a in run["actors"]}
    assert ("AdapterStore", run["head_node_id"]) in on and ("ServeReplica:bdlora:Ingress", run["head_node_id"]) in on
    assert {n for c, n in on if c == "TPWorkerActor"} == set(nodes)
    pgs = run["placement_groups"]
    assert len(pgs) >= 2 and all(pg["strategy"] == "STRICT_PACK" and len(pg["nodes"]) == 1 for pg in pgs)


@pytest.mark.slow
def test_an_adapter_pushed_while_both_groups_run_is_served_by_both(scenario):
    run = scenario
    name = run["pushed_adapter"]
    burst = [r for r in run["requests"] if r["kind"] == "burst"]
    bursts, rest = divmod(len(burst), run["knobs"]["burst"])  # whole bursts, at most max_bursts of them
    assert rest == 0 and 1 <= bursts <= run["knobs"]["max_bursts"]
    assert run["knobs"]["burst"] > run["knobs"]["max_ongoing_requests"]
    assert len({r["text"] for r in burst}) == 1 and burst[0]["text"]   # greedy: the same on both groups
    for stats in run["groups"].values():
        assert stats["requests_per_adapter"].get(name, 0) > 0 and name in stats["resident_adapters"]


@pytest.mark.slow
def test_the_removed_group_finishes_its_streams_then_its_node_goes(scenario):
    run = scenario
    drain = run["drain"]
    streams = [r for r in run["requests"] if r["kind"] == "drain"]
    # Every group had a long stream when the load stopped; Serve stopped one group while they ran.
    assert len(streams) == sum(drain["streams_per_group"].values()) >= 2
    assert set(drain["streams_per_group"]) == set(run["groups"]) and min(drain["streams_per_group"].values()) >= 1
    assert drain["stopping_at"] < min(r["end"] for r in streams)
    (removed,) = set(run["groups"]) - set(run["final_groups"])
    (kept,) = run["final_groups"]
    for r in streams:  # finished whole, not cut at the group's removal
        assert r["status"] == 200 and r["finish_reason"] == "length" and r["tokens"] == drain["max_tokens"]
    assert len({r["text"] for r in streams}) == 1   # the drained group's output is the survivor's
    node_of = {g: s["workers"][0]["node_id"] for g, s in run["groups"].items()}
    assert run["samples"][-1]["worker_nodes"] == [node_of[kept]] != [node_of[removed]]


def test_scaling_knobs_reach_serves_autoscaling_config():
    from ray.serve.config import AutoscalingConfig

    from deploy.config import AppConfig, ScalingConfig

    env = {"BDLORA_MIN_GROUPS": "1", "BDLORA_MAX_GROUPS": "3", "BDLORA_UPSCALE_DELAY_S": "5",
           "BDLORA_DOWNSCALE_DELAY_S": "120", "BDLORA_LOOK_BACK_PERIOD_S": "20",
           "BDLORA_GRACEFUL_SHUTDOWN_TIMEOUT_S": "90"}
    s = AppConfig.from_env(env).scaling
    knobs = AutoscalingConfig(**s.autoscaling_config())
    assert (knobs.upscale_delay_s, knobs.downscale_delay_s, knobs.look_back_period_s) == (5, 120, 20)
    assert s.graceful_shutdown_timeout_s == 90
    # Unset: Serve's own defaults.
    assert set(ScalingConfig().autoscaling_config()) == {"min_replicas", "max_replicas", "initial_replicas",
                                                         "target_ongoing_requests"}
    for bad in ({"BDLORA_UPSCALE_DELAY_S": "-1"}, {"BDLORA_DOWNSCALE_DELAY_S": "soon"},
                {"BDLORA_GRACEFUL_SHUTDOWN_TIMEOUT_S": "0"}):
        with pytest.raises(ValueError, match="BDLORA_DOWNSCALE|delays|timeout"):
            AppConfig.from_env(bad)
