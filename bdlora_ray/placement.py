"""Where a replica group's TP workers run: their Ray placement-group bundles.

Plain data, no Ray: the deployment computes a group's bundles while it is
configured, before any cluster exists.
"""

from __future__ import annotations

# Ray gives every cluster's head node this resource. What must outlive scaling (the adapter store, the
# HTTP ingress) asks for a sliver of it: the autoscaler removes worker nodes, never the head.
HEAD_NODE_RESOURCE = "node:__internal_head__"
ON_HEAD_NODE = {HEAD_NODE_RESOURCE: 0.001}


def group_bundles(tp: int, use_gpu: bool, worker_cpus: float, replica_cpus: float = 0.0) -> list[dict[str, float]]:
    """One bundle per TP rank (rank i -> bundle i): a whole GPU each, or a CPU fraction without GPUs.
    Bundle 0 is the group's Serve replica, which runs rank 0 and the engine loop in its own process:
    it also holds `replica_cpus` for the scheduler, the tokenizer and the request handlers."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    one = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": worker_cpus}
    return [{**one, "CPU": one["CPU"] + replica_cpus}] + [dict(one) for _ in range(tp - 1)]
