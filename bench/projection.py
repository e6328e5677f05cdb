"""Projected decode speed-up of bd over slora at TP=8, from its parts.

One decode step of a TP=8 Llama, per layer: the base GEMMs of one rank's
shard, the LoRA kernels (shrink + expand per fused linear), and the base
model's two all-reduces (o, down); slora adds four small collectives per
layer (an all-gather of the rank-space vector after each column shrink, qkv
and gate|up; an all-reduce after each row shrink, o and down), bd none
(README.md, "How it works"). Step time = layers x that + the LM head and the embedding
all-reduce; speed-up = slora step / bd step.

Inputs: GEMM and kernel times measured on a GPU when `bench/gpu.py` has run
there (its JSON), else a stated roofline estimate; collective latencies from
published NVLink NCCL measurements (sources below). Run:

    python bench/projection.py [--gpu-json DIR/gpu.json] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bdlora_ray.config import PRESETS, LlamaConfig

TP = 8
BATCHES = (1, 8, 16, 32, 64)
PAPER = {"llama-3.1-8b": 1.63, "llama-3.1-70b": 1.79}  # BD-LoRA (arXiv 2510.23346), 8xA100, end to end

# Published NVLink small-message NCCL latencies (microseconds), each with its source.
LATENCIES_US = {
    "NCCL all-reduce in a CUDA graph, 2 KiB": (16.5, "sgl-project/sglang PR #10571, table 'pynccl graph time'"),
    "NCCL all-reduce, eager, 2 KiB": (48.7, "sgl-project/sglang PR #10571, table 'torch eager time'"),
}

# Roofline stand-ins for what a GPU run measures (A100-SXM4-80GB, the paper's GPU, by its datasheet).
HBM_BYTES_PER_S = 2.039e12
HBM_EFFICIENCY = 0.8        # share of the datasheet bandwidth a decode GEMM reaches (assumed)
KERNEL_FLOOR_US = 4.0       # launch + tail of one small kernel (assumed)
LORA_RANK = 16              # both modes at equal rank: a rank-16 adapter's shard is r/8 = 2 per rank


@dataclass(frozen=True)
class LayerParts:
    """One decoder layer of one TP rank, microseconds."""

    gemm_us: float      # qkv, o, gate|up, down of the base model
    lora_us: float      # shrink + expand of the 4 fused linears (both modes run the same kernels)
    source: str         # "measured" or "estimate"


def _shard_weight_bytes(cfg: LlamaConfig, tp: int) -> float:
    H, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return 2.0 * (H * (q + 2 * kv) + q * H + H * 2 * inter + inter * H) / tp  # bf16


def estimate_layer(cfg: LlamaConfig, batch: int) -> LayerParts:
    """Decode GEMMs at HBM speed (weights dominate up to batch 64); LoRA kernels at their launch floor."""
    gemm = 1e6 * _shard_weight_bytes(cfg, TP) / (HBM_BYTES_PER_S * HBM_EFFICIENCY)
    return LayerParts(gemm, 8 * KERNEL_FLOOR_US, "estimate")


def measured_layer(gpu: dict, cfg: LlamaConfig, batch: int) -> LayerParts | None:
    """From bench/gpu.py's kernel sweep: TP=8 rows of Llama-3.1-8B shapes at `batch` tokens, 16 adapters
    (or all, if fewer); only for the 8B model, whose shapes the sweep uses."""
    if cfg.name != "llama-3.1-8b":
        return None
    rows = [r for r in gpu.get("sections", {}).get("kernel_sweep", {}).get("rows", [])
            if r["tp"] == TP and r["T"] == batch and r["adapters"] == min(16, batch)]
    if len({r["layer"] for r in rows}) != 4:
        return None
    gemm = sum(r["base_gemm_us"] for r in rows)
    lora = sum(r["shrink_triton_us"] + r["expand_triton_us"] for r in rows)
    return LayerParts(gemm, lora, "measured")


def step_us(cfg: LlamaConfig, parts: LayerParts, latency_us: float, mode: str) -> float:
    head = 1e6 * 2.0 * cfg.vocab_size * cfg.hidden_size / TP / (HBM_BYTES_PER_S * HBM_EFFICIENCY)
    per_layer = parts.gemm_us + parts.lora_us + 2 * latency_us + (4 * latency_us if mode == "slora" else 0.0)
    return cfg.num_layers * per_layer + head + 2 * latency_us  # + embedding all-reduce, logits gather


def project(gpu: dict | None = None) -> list[dict]:
    rows = []
    for name in PAPER:
        cfg = PRESETS[name]
        for batch in BATCHES:
            parts = (measured_layer(gpu, cfg, batch) if gpu else None) or estimate_layer(cfg, batch)
            for label, (lat, _) in LATENCIES_US.items():
                bd, slora = step_us(cfg, parts, lat, "bd"), step_us(cfg, parts, lat, "slora")
                rows.append({"model": name, "batch": batch, "latency": label, "latency_us": lat,
                             "layer_gemm_us": parts.gemm_us, "layer_lora_us": parts.lora_us, "parts": parts.source,
                             "bd_step_us": bd, "slora_step_us": slora, "speedup": slora / bd, "paper": PAPER[name]})
    return rows


def markdown(rows: list[dict]) -> str:
    """The table; batches whose figures are all equal (estimates do not vary with batch) share a row."""
    out = ["| model | batch | collective latency | layer GEMMs us | layer LoRA us | parts | bd step ms "
           "| slora step ms | projected bd/slora | paper |", "|---|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    fields = ("layer_gemm_us", "layer_lora_us", "parts", "bd_step_us", "slora_step_us")
    groups: list[list[dict]] = []
    for r in sorted(rows, key=lambda r: (r["model"], r["latency_us"], r["batch"])):
        last = groups[-1][-1] if groups else None
        same = last and (last["model"], last["latency"]) == (r["model"], r["latency"]) and all(
            round(last[f], 1) == round(r[f], 1) if isinstance(r[f], float) else last[f] == r[f] for f in fields)
        groups[-1].append(r) if same else groups.append([r])
    for g in groups:
        r, b = g[0], f"{g[0]['batch']}" if len(g) == 1 else f"{g[0]['batch']}-{g[-1]['batch']}"
        out.append(f"| {r['model']} | {b} | {r['latency_us']:.1f} us ({r['latency']}) | "
                   f"{r['layer_gemm_us']:.1f} | {r['layer_lora_us']:.1f} | {r['parts']} | {r['bd_step_us'] / 1e3:.2f} | "
                   f"{r['slora_step_us'] / 1e3:.2f} | **{r['speedup']:.2f}x** | {r['paper']:.2f}x |")
    out.append("")
    out += [f"- {label}: {lat} us, {src}" for label, (lat, src) in LATENCIES_US.items()]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu-json", type=Path, help="bench/gpu.py's JSON: use its measured TP=8 parts")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    gpu = json.loads(args.gpu_json.read_text()) if args.gpu_json else None
    rows = project(gpu)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
