"""Where a replica group's TP workers run: their Ray placement-group bundles.

Plain data, no Ray: the deployment computes a group's bundles while it is
configured, before any cluster exists.
"""

from __future__ import annotations


def worker_bundles(tp: int, use_gpu: bool, worker_cpus: float) -> list[dict[str, float]]:
    """One bundle per TP worker (worker i -> bundle i): a whole GPU each, or a CPU fraction without GPUs."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    return [{"GPU": 1, "CPU": 1} if use_gpu else {"CPU": worker_cpus} for _ in range(tp)]
