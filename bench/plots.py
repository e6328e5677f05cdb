"""Plots of the comparisons' JSON results (matplotlib, Agg backend: no display needed).

    python -m bench plots bench/out/{modes,scaling,peft,cold}.json -o bench/plots/summary.png

`plot(name, result, path)` draws one comparison (what `--plot` writes);
`summary(results, path)` puts every comparison given into one figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DPI = 80


def _bars(ax, labels: list[str], values: list[float], ylabel: str, title: str, fmt: str = "{:.0f}") -> None:
    bars = ax.bar(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    for b, v in zip(bars, values):
        ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                    fontsize=8)


def draw_modes(ax, result: dict) -> None:
    runs = result["runs"]
    r = result["ratios"]
    _bars(ax, [f"{x['name']}\nr={x['rank']}" for x in runs], [x["summary"]["tokens_per_s"] for x in runs],
          "tokens/s", f"(a) TP={result['config']['tp']}, equal params: bd/slora {r['bd / slora']:.2f}x, "
          f"bd/replicated {r['bd / replicated']:.2f}x\nanchor (8xA100): 1.3-1.8x over slora")


def draw_scaling(ax, result: dict) -> None:
    runs = result["runs"]
    labels = ["base" if x["adapters"] == 0 else str(x["adapters"]) for x in runs]
    _bars(ax, labels, [x["vs_base"] for x in runs], "throughput / base model", "", fmt="{:.2f}")
    ax.axhline(0.95, color="gray", ls="--", lw=1)
    ax.text(len(runs) - 0.5, 0.96, "S-LoRA ~0.95", ha="right", va="bottom", fontsize=7, color="gray")
    ax.set_xlabel("distinct adapters in the workload", fontsize=8)
    ax.set_title(f"(b) adapters vs base model alone: {runs[-1]['adapters']} adapters "
                 f"{runs[-1]['vs_base']:.2f}x", fontsize=9)


def draw_peft(ax, result: dict) -> None:
    runs = result["runs"]
    ratio = next(iter(result["ratios"].values()))
    _bars(ax, ["bdlora-ray\n(HTTP, TP=2)", "HF PEFT\n(in process)"], [x["summary"]["tokens_per_s"] for x in runs],
          "tokens/s", f"(c) vs PEFT set_adapter per request: {ratio:.2f}x\nanchor (A100): S-LoRA up to ~30x")


def draw_cold(ax, result: dict) -> None:
    runs = result["runs"]
    p50 = [1e3 * x["ttft_s"]["p50"] for x in runs]
    p90 = [1e3 * x["ttft_s"]["p90"] for x in runs]
    _bars(ax, [x["name"] for x in runs], p50, "TTFT p50 (ms), bar to p90", "")
    ax.errorbar(range(len(runs)), p50, yerr=[[0] * len(runs), [b - a for a, b in zip(p50, p90)]], fmt="none",
                ecolor="black", capsize=3, lw=1)
    ratio = result["ratios"]["cold / warm (p50 TTFT)"]
    ax.set_title(f"(d) first-token latency: cold / warm {ratio:.1f}x", fontsize=9)


def draw_tax(ax, result: dict) -> None:
    rows = result["http"]
    fronts = result["config"]["fronts"]
    budget = result["config"].get("stream_budgets", [None])[0]  # the servers' default
    labels = [(f"{r['front']}\n" if len(fronts) > 1 else "") + f"{r['batch']} {r['variant']}\n"
              f"{'SSE' if r['stream'] else 'JSON'}"
              + (f" /{r['stream_interval']}" if r.get("stream_interval", 1) != 1 else "")
              + (f" b{r['stream_budget']}" if r.get("stream_budget") not in (None, budget) else "")
              + (" ingress" if r.get("ingress", "auto") != "auto" else "") for r in rows]
    _bars(ax, labels, [r["http_over_engine"] for r in rows], "HTTP tok/s / engine-alone tok/s", "", fmt="{:.2f}")
    ax.axhline(0.8, color="gray", ls="--", lw=1)
    ax.tick_params(axis="x", labelsize=5 if len(fronts) > 1 else 6)
    b = max(result["config"]["batches"])
    title = []
    for front in fronts:
        mine = {r["variant"]: r["http_over_engine"] for r in rows
                if r["front"] == front and r["batch"] == b and not r["stream"] and r.get("ingress", "auto") == "auto"}
        title.append(f"{front} front {mine['base']:.2f}x (base), {mine['mixed']:.2f}x (mixed)")
    ax.set_title(f"serving tax, HTTP / engine at batch {b}: " + "; ".join(title), fontsize=8)


DRAW = {"modes": draw_modes, "scaling": draw_scaling, "peft": draw_peft, "cold": draw_cold, "tax": draw_tax}


def plot(name: str, result: dict, path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    DRAW[name](ax, result)
    return _save(fig, path)


def summary(results: dict[str, dict], path: str | Path) -> Path:
    names = [n for n in DRAW if n in results]
    cols = 2 if len(names) > 1 else 1
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        DRAW[name](ax, results[name])
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("bdlora-ray on a 2-core CPU, tiny Llama, TP=2 (ratios matter, not absolute numbers)", fontsize=10)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="JSON files written by bench.compare")
    p.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args(argv)
    results = {}
    for f in args.results:
        r = json.loads(f.read_text())
        if r.get("comparison") not in DRAW:
            p.error(f"{f} is not a result of bench.compare (no known 'comparison' field)")
        results[r["comparison"]] = r
    print(summary(results, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
