"""`bdlora`: push PEFT adapters to S3 in the per-rank format, and list them.

    bdlora push PEFT_DIR s3://bucket/prefix/<name> --tp N [--mode bd|slora|replicated] [--base MODEL]
    bdlora ls s3://bucket/prefix

S3 endpoint, credentials and region come from the usual AWS variables
(`AWS_ENDPOINT_URL` for S3-compatible servers).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from bdlora_ray.errors import BdloraError
from bdlora_ray.lora.shard import MODES
from bdlora_ray.store.push import push_adapter, split_target
from bdlora_ray.store.s3 import AdapterBucket


def push(args: argparse.Namespace) -> int:
    manifest = push_adapter(args.peft_dir, args.dest, args.tp, args.mode, args.base, quiet=args.quiet)
    store_uri, name = split_target(args.dest)
    m = manifest.meta
    print(f"pushed {name}: rank {m.rank}, mode {m.mode}, tp {m.tp}, {len(m.targets)} targets, "
          f"{manifest.total_size} bytes -> {store_uri}/{name}/")
    return 0


def human(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def ls(args: argparse.Namespace) -> int:
    infos = AdapterBucket(args.uri).catalog()
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return 0
    rows = [("NAME", "RANK", "MODE", "TP", "SIZE", "BASE")]
    for i in infos:
        if i.error:
            rows.append((i.name, "-", "-", "-", "-", f"INVALID: {i.error}"))
        else:
            rows.append((i.name, str(i.rank), i.mode, str(i.tp), human(i.size), i.base_model))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[5])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bdlora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("push", help="convert a PEFT adapter to per-rank shards and upload it")
    pp.add_argument("peft_dir", help="directory with adapter_config.json and adapter_model.safetensors")
    pp.add_argument("dest", help="s3://bucket/prefix/<name>")
    pp.add_argument("--tp", type=int, required=True, help="TP degree to shard for")
    pp.add_argument("--mode", choices=MODES, default=None,
                    help="default: bd for a BD-LoRA adapter, replicated otherwise")
    pp.add_argument("--base", default=None,
                    help="base model: preset name or HF model dir (default: the adapter's base_model_name_or_path)")
    pp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pp.set_defaults(func=push)
    pl = sub.add_parser("ls", help="list adapters under s3://bucket/prefix")
    pl.add_argument("uri")
    pl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pl.set_defaults(func=ls)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (BdloraError, ValueError) as e:
        print(f"bdlora {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
