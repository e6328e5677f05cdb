"""`bdlora`: push PEFT adapters to S3 in the per-rank format, and list them.

    bdlora push PEFT_DIR s3://bucket/prefix/<name> --tp N [--mode bd|slora|replicated] [--base MODEL]
    bdlora ls s3://bucket/prefix
    bdlora bench {modes,scaling,peft,cold} [...]   benchmark comparisons (bench/compare.py; needs a
                                                   source checkout: bench/ is not installed)

S3 endpoint, credentials and region come from the usual AWS variables
(`AWS_ENDPOINT_URL` for S3-compatible servers).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from bdlora_ray.config import PRESETS, LlamaConfig
from bdlora_ray.errors import BdloraError
from bdlora_ray.lora.shard import MODES, load_peft_adapter, shard_adapter
from bdlora_ray.store.manifest import Manifest, build_adapter_files, check_name
from bdlora_ray.store.s3 import AdapterBucket


def resolve_base(base: str) -> LlamaConfig:
    """A preset name, or a directory (or file) holding an HF `config.json`."""
    if base in PRESETS:
        return LlamaConfig.from_name(base)
    path = Path(base)
    if (path.is_dir() and (path / "config.json").is_file()) or path.is_file():
        return LlamaConfig.from_json(path)
    raise ValueError(f"--base {base!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                     "nor a directory with config.json")


def split_target(uri: str) -> tuple[str, str]:
    """'s3://bucket/prefix/name' -> ('s3://bucket/prefix', 'name'), the name checked."""
    head, _, name = uri.rstrip("/").rpartition("/")
    if not head.startswith("s3://") or head == "s3:/":
        raise ValueError(f"expected s3://bucket[/prefix]/<name>, got {uri!r}")
    return head, check_name(name)


def push_adapter(peft_dir: str | Path, dest: str, tp: int, mode: str | None = None, base: str | None = None,
                 bucket: AdapterBucket | None = None, quiet: bool = True) -> Manifest:
    """What `bdlora push` does, callable: convert the PEFT adapter at `peft_dir` and upload it to `dest`
    (s3://bucket/prefix/<name>). `bucket`, if given, must be `dest`'s store (callers pushing many
    adapters share one S3 client)."""
    store_uri, name = split_target(dest)
    if bucket is None:
        bucket = AdapterBucket(store_uri)  # a bad URI fails before any conversion work
    elif bucket.uri != store_uri.rstrip("/"):
        raise ValueError(f"bucket {bucket.uri} is not the store of {dest}")
    adapter = load_peft_adapter(peft_dir, name=name)
    base = base or adapter.base_model
    if not base:
        raise ValueError("the adapter names no base model; pass --base PRESET_OR_DIR")
    cfg = resolve_base(base)
    shards = shard_adapter(adapter, cfg, tp, mode)
    manifest, blobs = build_adapter_files(shards, cfg)
    with tqdm(total=sum(map(len, blobs)), unit="B", unit_scale=True, desc=name, disable=quiet) as bar:
        bucket.upload_adapter(name, manifest, blobs, progress=bar.update)
    return manifest


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


def bench(argv: list[str]) -> int:
    """`bdlora bench ...` runs `bench.compare` (bench/ is a folder of the source checkout, not installed)."""
    try:
        compare = _import_bench()
    except ModuleNotFoundError as e:
        print(f"bdlora bench: {e}", file=sys.stderr)
        return 2
    return compare.main(argv, prog="bdlora bench")


def _import_bench():
    import importlib

    try:
        return importlib.import_module("bench.compare")
    except ModuleNotFoundError as e:
        if e.name not in ("bench", "bench.compare"):
            raise  # a dependency is missing: say which
    # An editable install: the checkout is the package's parent folder.
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "compare.py").is_file():
        raise ModuleNotFoundError(
            "the benchmarks (bench/) are not installed with the package; run `bdlora bench` from a source "
            "checkout of bdlora-ray (pip install -e '.[test,bench]' there)", name="bench")
    sys.path.insert(0, str(root))
    return importlib.import_module("bench.compare")


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
    # Parsed by bench.compare (see `main`); listed here for --help.
    sub.add_parser("bench", add_help=False,
                   help="benchmark comparisons: bdlora bench {modes,scaling,peft,cold} ... (source checkout only)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options belong to bench.compare's parser, imported only now
        return bench(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (BdloraError, ValueError) as e:
        print(f"bdlora {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
