"""How many adapters of mixed ranks fit in the same bytes: unified paging vs fixed max-rank slots.

Unified paging (S-LoRA, our `PagePool`): an adapter's per-rank shard takes
whole KV-sized pages, as many as its actual rank needs. Fixed slots (vLLM's
LoRA cache): every slot is sized for `max_rank`, whatever the adapter's rank.
Both are counted per GPU (one TP rank), for the same byte budget and the
same seeded stream of adapters with ranks drawn uniformly from `--ranks`.

    python bench/packing.py [--model llama-3.1-8b] [--tp 8] [--mode bd] [--gib 4] [--json PATH]

Prints a table, the ratio last, and writes JSON (default bench/out/packing.json).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from bdlora_ray.config import LlamaConfig
from bdlora_ray.lora.layout import TARGETS, AdapterLayout
from bdlora_ray.lora.shard import MODES, AdapterMeta, expected_shard_shapes
from bdlora_ray.memory import PoolConfig

DEFAULT_JSON = Path(__file__).parent / "out" / "packing.json"


def layout_of(cfg: LlamaConfig, tp: int, mode: str, rank: int, targets: tuple[str, ...]) -> AdapterLayout:
    """Layout of rank 0's shard (every rank's shard has the same shapes)."""
    meta = AdapterMeta(mode=mode, tp=tp, rank=rank, alpha=float(rank), scale=1.0, targets=targets,
                       num_layers=cfg.num_layers, base_model=cfg.name,
                       block_targets=targets if mode == "bd" else ())
    shapes = expected_shard_shapes(cfg, meta, 0)
    layer0 = {k.split(".", 2)[2]: v for k, v in shapes.items() if k.startswith("layers.0.")}  # "q_proj.lora_A"
    return AdapterLayout.from_shapes(cfg.num_layers, layer0)


def run(args: argparse.Namespace) -> dict:
    cfg = LlamaConfig.from_name(args.model)
    targets = TARGETS if args.targets == "all" else tuple(args.targets.split(","))
    ranks = [int(r) for r in args.ranks.split(",")]
    pool = PoolConfig.for_model(cfg, args.tp, num_pages=1, block_size=args.block_size)
    page_elems, elem_bytes = pool.elems_per_page, args.dtype_bytes
    page_bytes = page_elems * cfg.num_layers * elem_bytes  # one page id across all layers
    budget = int(args.gib * 2**30)

    layouts = {r: layout_of(cfg, args.tp, args.mode, r, targets) for r in {*ranks, args.max_rank}}
    exact = {r: lay.layer_numel * cfg.num_layers * elem_bytes for r, lay in layouts.items()}
    paged = {r: lay.num_pages(page_elems) * page_bytes for r, lay in layouts.items()}
    slot_bytes = exact[args.max_rank]  # vLLM sizes every slot for max_rank, without page rounding
    rows = [{"rank": r, "exact_bytes": exact[r], "paged_bytes": paged[r], "slot_bytes": slot_bytes} for r in ranks]

    # Same seeded stream of adapters for both schemes; count how many fit before the first that does not.
    rng = random.Random(args.seed)
    used, unified = 0, 0
    while True:
        r = rng.choice(ranks)
        if used + paged[r] > budget:
            break
        used += paged[r]
        unified += 1
    fixed = budget // slot_bytes
    return {
        "model": cfg.name, "tp": args.tp, "mode": args.mode, "targets": list(targets), "ranks": ranks,
        "max_rank": args.max_rank, "block_size": args.block_size, "dtype_bytes": elem_bytes,
        "page_elems": page_elems, "page_bytes": page_bytes, "budget_bytes": budget, "per_rank": rows,
        "unified_adapters": unified, "unified_used_bytes": used, "fixed_slot_bytes": slot_bytes,
        "fixed_adapters": fixed, "ratio": unified / fixed if fixed else float("inf"),
    }


def report(res: dict) -> None:
    mib = 2**20
    print(f"{res['model']} TP={res['tp']} mode={res['mode']}: per-GPU budget {res['budget_bytes'] / mib:.0f} MiB, "
          f"page {res['page_elems']} elems x {len(res['targets'])} targets, max rank {res['max_rank']}")
    print(f"{'rank':>6} {'exact MiB':>10} {'paged MiB':>10} {'page waste':>11} {'slot MiB':>9} {'slot waste':>11}")
    for row in res["per_rank"]:
        e, p, s = row["exact_bytes"], row["paged_bytes"], row["slot_bytes"]
        print(f"{row['rank']:>6} {e / mib:>10.3f} {p / mib:>10.3f} {(p - e) / p:>10.1%} {s / mib:>9.3f} "
              f"{(s - e) / s:>10.1%}")
    print(f"adapters that fit, unified paging: {res['unified_adapters']}")
    print(f"adapters that fit, fixed max-rank slots: {res['fixed_adapters']}")
    print(f"ratio unified/fixed: {res['ratio']:.2f}x")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", help="model preset")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--mode", choices=MODES, default="bd")
    p.add_argument("--targets", default="all", help="'all' or comma-separated target modules")
    p.add_argument("--ranks", default="8,16,32,64", help="ranks drawn uniformly")
    p.add_argument("--max-rank", type=int, default=64, help="slot size of the fixed scheme")
    p.add_argument("--gib", type=float, default=4.0, help="bytes per GPU given to adapters, in GiB")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV page (sets the page size)")
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per element (2 = bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the result")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    res = run(args)
    report(res)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
