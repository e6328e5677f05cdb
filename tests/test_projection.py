"""bench/projection.py: the TP=8 step model, and measured parts replacing the estimates."""

from __future__ import annotations

import pytest

from bench import projection as proj
from bdlora_ray.config import PRESETS


def test_slora_pays_four_collectives_per_layer_and_bd_none():
    cfg = PRESETS["llama-3.1-8b"]
    parts = proj.LayerParts(gemm_us=30.0, lora_us=20.0, source="estimate")
    bd, slora = proj.step_us(cfg, parts, 10.0, "bd"), proj.step_us(cfg, parts, 10.0, "slora")
    assert slora - bd == pytest.approx(4 * 10.0 * cfg.num_layers)
    assert proj.step_us(cfg, parts, 0.0, "slora") == proj.step_us(cfg, parts, 0.0, "bd")


def test_estimates_cover_both_models_batches_and_latencies():
    rows = proj.project()
    assert {r["model"] for r in rows} == set(proj.PAPER)
    assert len(rows) == len(proj.PAPER) * len(proj.BATCHES) * len(proj.LATENCIES_US)
    assert all(r["parts"] == "estimate" and r["speedup"] > 1 for r in rows)
    eight = [r for r in rows if r["model"] == "llama-3.1-8b" and r["batch"] == 1]
    assert eight[0]["speedup"] != eight[1]["speedup"]  # the latency matters
    md = proj.markdown(rows)
    assert "sgl-project/sglang PR #10571" in md and "| llama-3.1-8b | 1-64 |" in md


def test_measured_parts_replace_the_estimates_for_8b():
    gpu_rows = [{"tp": 8, "T": 16, "adapters": 16, "layer": layer, "base_gemm_us": 10.0, "shrink_triton_us": 2.0,
                 "expand_triton_us": 3.0} for layer in ("qkv", "o", "gate_up", "down")]
    rows = proj.project({"sections": {"kernel_sweep": {"rows": gpu_rows}}})
    measured = [r for r in rows if r["parts"] == "measured"]
    assert {(r["model"], r["batch"]) for r in measured} == {("llama-3.1-8b", 16)}
    assert all(r["layer_gemm_us"] == 40.0 and r["layer_lora_us"] == 20.0 for r in measured)
