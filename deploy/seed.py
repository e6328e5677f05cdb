"""Seed the embedded set-up: a tiny random Llama checkpoint and demo adapters in S3.

Everything is random and local (no model hub; `bdlora_ray.synthetic` writes
HF and PEFT formats): the checkpoint with the byte-level tokenizer, the
adapters as PEFT directories (ordinary LoRA and BD-LoRA), then pushed with
`bdlora push`, exactly as a user pushes theirs.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.exceptions import ClientError

from bdlora_ray import cli
from bdlora_ray.config import LlamaConfig
from bdlora_ray.store.s3 import parse_s3_uri
from bdlora_ray.synthetic import random_adapter, write_peft_adapter, write_random_checkpoint

log = logging.getLogger(__name__)

# The byte tokenizer has 259 ids; 264 rows keep the vocabulary divisible by any TP degree up to 8.
TINY = LlamaConfig.from_name("tiny").with_(vocab_size=264)


@dataclass(frozen=True)
class DemoAdapter:
    name: str
    rank: int
    block_diagonal: bool     # trained as BD-LoRA with nblocks = the TP degree
    mode: str                # how `bdlora push` shards it: bd | slora | replicated
    seed: int


DEMO_ADAPTERS = (
    DemoAdapter("demo-lora", rank=8, block_diagonal=False, mode="replicated", seed=1),
    DemoAdapter("demo-slora", rank=8, block_diagonal=False, mode="slora", seed=2),
    DemoAdapter("demo-bdlora", rank=8, block_diagonal=True, mode="bd", seed=3),
)


def write_checkpoint(path: Path, cfg: LlamaConfig = TINY, seed: int = 0) -> Path:
    """A random float32 HF Llama checkpoint with the byte tokenizer; kept if `path` already has one."""
    if (path / "config.json").is_file():
        return path
    # Written beside the target and renamed: an interrupted run never leaves half a checkpoint.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write_random_checkpoint(cfg, tmp, seed=seed)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote a random checkpoint (%s shapes) to %s", cfg.name, path)
    return path


def ensure_bucket(uri: str) -> None:
    bucket, _ = parse_s3_uri(uri)
    s3 = boto3.session.Session().client("s3")
    try:
        s3.create_bucket(Bucket=bucket)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def seed_adapters(model_dir: Path, peft_root: Path, uri: str, tp: int,
                  adapters: tuple[DemoAdapter, ...] = DEMO_ADAPTERS) -> list[str]:
    """Write the demo PEFT adapters under `peft_root` and push them to `uri` for TP degree `tp`."""
    cfg = LlamaConfig.from_json(model_dir)
    ensure_bucket(uri)
    for a in adapters:
        adapter = random_adapter(cfg, a.rank, nblocks=tp if a.block_diagonal else None, seed=a.seed, name=a.name)
        peft_dir = write_peft_adapter(adapter, peft_root / a.name)
        argv = ["push", str(peft_dir), f"{uri.rstrip('/')}/{a.name}", "--tp", str(tp), "--mode", a.mode,
                "--base", str(model_dir), "--quiet"]
        if cli.main(argv) != 0:  # the CLI has printed why
            raise RuntimeError(f"bdlora {' '.join(argv)} failed")
    return [a.name for a in adapters]
