"""The stored adapter format: `<prefix>/<name>/manifest.json` + one safetensors file per TP rank.

    s3://bucket/prefix/<name>/manifest.json
    s3://bucket/prefix/<name>/rank-0-of-N.safetensors ... rank-(N-1)-of-N.safetensors

The manifest says what the files are for (base model name and shapes, TP
degree, sharding mode, rank, targets, scale) and what they must be (size and
sha256 each), so a reader can refuse anything that does not match before
parsing it. Writers upload the shard files first and the manifest last: a
visible manifest means a complete adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from safetensors.torch import save as save_safetensors

from bdlora_ray.config import LlamaConfig
from bdlora_ray.errors import AdapterInvalid, AdapterNameInvalid, BdloraError, log_incident
from bdlora_ray.lora.shard import AdapterMeta, AdapterShards

log = logging.getLogger(__name__)

FORMAT = "bdlora-adapter"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# ASCII only and no separators, so a name is always one safe path/key component.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# The base-model dimensions an adapter's shapes depend on; a mismatch means wrong shapes.
BASE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
               "num_kv_heads", "head_dim")


def check_name(name: object) -> str:
    """Return `name` if it is a valid adapter name, else raise AdapterNameInvalid."""
    # fullmatch, not `^...$`: `$` would accept a trailing newline.
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or ".." in name:
        shown = repr(name) if not isinstance(name, str) or len(name) <= 64 else repr(name[:64]) + "..."
        raise AdapterNameInvalid(f"invalid adapter name {shown}: expected 1-128 characters of "
                                 "[A-Za-z0-9._-], starting with a letter or digit, without '..'")
    return name


@contextmanager
def parsing(what: str) -> Iterator[None]:
    """Any failure while parsing or checking a store object is AdapterInvalid.

    The checks raise typed errors that say what is wrong; anything else (RecursionError from a
    deeply nested JSON document, an overflow, a library's own exception) is logged with an error
    id, and the client is told only the id: its text is the server's business, and a hostile object
    must never turn into a 500.
    """
    try:
        yield
    except BdloraError:
        raise
    except Exception as e:
        error_id = log_incident(log, f"{what}: unexpected failure while parsing", e)
        raise AdapterInvalid(f"{what}: cannot be parsed (error id {error_id})") from None


def _no_constant(name: str) -> Any:
    raise AdapterInvalid(f"{name} is not a JSON number")


def shard_file_name(tp_rank: int, tp: int) -> str:
    return f"rank-{tp_rank}-of-{tp}.safetensors"


def base_shapes(cfg: LlamaConfig) -> dict[str, int]:
    return {f: getattr(cfg, f) for f in BASE_FIELDS}


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ShardFile:
    name: str    # file name inside the adapter's folder, `rank-<i>-of-<N>.safetensors`
    size: int    # exact byte length
    sha256: str  # lowercase hex digest of the whole file


@dataclass(frozen=True)
class Manifest:
    meta: AdapterMeta                    # mode, tp, rank, alpha, scale, targets, layers, training base
    base_name: str                       # name of the base model the shards were cut for
    base_shapes: tuple[tuple[str, int], ...]  # BASE_FIELDS of that base model, in order
    dtype: str                           # safetensors dtype of every tensor ("F32", "BF16", "F16")
    files: tuple[ShardFile, ...]         # files[i] is TP rank i's shard
    format_version: int = FORMAT_VERSION

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": self.format_version,
            "base_model": {"name": self.base_name, "shapes": dict(self.base_shapes)},
            "adapter": self.meta.to_dict(), "dtype": self.dtype,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in self.files],
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, what: str = "manifest") -> "Manifest":
        """Parse and structurally check a manifest; AdapterInvalid on anything unexpected."""
        with parsing(what):
            return cls._from_json(data, what)

    @classmethod
    def _from_json(cls, data: bytes, what: str) -> "Manifest":
        try:
            d = json.loads(data, parse_constant=_no_constant)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterInvalid(f"{what}: not valid JSON ({e})") from None
        except AdapterInvalid as e:
            raise AdapterInvalid(f"{what}: {e}") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise AdapterInvalid(f"{what}: not a {FORMAT} manifest")
        if d.get("format_version") != FORMAT_VERSION:
            raise AdapterInvalid(f"{what}: format version {d.get('format_version')!r} is not supported "
                                 f"(this server reads version {FORMAT_VERSION})")
        if not isinstance(d.get("adapter"), dict):
            raise AdapterInvalid(f"{what}: missing 'adapter' section")
        try:
            meta = AdapterMeta.from_dict(d["adapter"])
        except AdapterInvalid as e:
            raise AdapterInvalid(f"{what}: {e}") from None
        if not (math.isfinite(meta.alpha) and math.isfinite(meta.scale)):
            raise AdapterInvalid(f"{what}: alpha and scale must be finite")
        base, files = d.get("base_model"), d.get("files")
        if (not isinstance(base, dict) or not isinstance(base.get("name"), str)
                or not isinstance(base.get("shapes"), dict)
                or set(base["shapes"]) != set(BASE_FIELDS)
                or not all(type(base["shapes"][f]) is int for f in BASE_FIELDS)):
            raise AdapterInvalid(f"{what}: 'base_model' must have a name and integer shapes {BASE_FIELDS}")
        if d.get("dtype") not in ("F32", "BF16", "F16"):
            raise AdapterInvalid(f"{what}: unsupported dtype {d.get('dtype')!r}")
        if not isinstance(files, list) or len(files) != meta.tp:
            raise AdapterInvalid(f"{what}: expected {meta.tp} shard files (one per TP rank)")
        parsed = []
        for i, f in enumerate(files):
            ok = (isinstance(f, dict) and f.get("name") == shard_file_name(i, meta.tp)
                  and type(f.get("size")) is int and f["size"] > 8
                  and isinstance(f.get("sha256"), str) and _SHA256.fullmatch(f["sha256"]))
            if not ok:
                raise AdapterInvalid(f"{what}: files[{i}] must be {{name: {shard_file_name(i, meta.tp)!r}, "
                                     "size: int, sha256: 64 hex digits}")
            parsed.append(ShardFile(f["name"], f["size"], f["sha256"]))
        return cls(meta=meta, base_name=base["name"],
                   base_shapes=tuple((f, base["shapes"][f]) for f in BASE_FIELDS),
                   dtype=d["dtype"], files=tuple(parsed))

    def check_serves(self, cfg: LlamaConfig, tp: int, max_rank: int, check_base_name: bool = True) -> None:
        """Raise AdapterInvalid unless this adapter fits the serving model, TP degree and rank limit."""
        if dict(self.base_shapes) != base_shapes(cfg):
            diff = {k: (v, getattr(cfg, k)) for k, v in self.base_shapes if v != getattr(cfg, k)}
            raise AdapterInvalid(f"made for base model {self.base_name!r} with other shapes "
                                 f"(adapter, served): {diff}")
        if check_base_name and self.base_name != cfg.name:
            raise AdapterInvalid(f"made for base model {self.base_name!r}, serving {cfg.name!r}")
        if self.meta.tp != tp:
            raise AdapterInvalid(f"sharded for TP degree {self.meta.tp}, serving TP degree {tp}; push it again "
                                 f"with --tp {tp}")
        if self.meta.num_layers != cfg.num_layers:
            raise AdapterInvalid(f"has {self.meta.num_layers} layers, base model {cfg.num_layers}")
        if self.meta.mode != "replicated" and self.meta.rank % tp:
            raise AdapterInvalid(f"rank {self.meta.rank} is not divisible by TP degree {tp} (mode {self.meta.mode})")
        if not set(self.meta.block_targets) <= set(self.meta.targets):
            raise AdapterInvalid(f"block targets {self.meta.block_targets} are not among targets {self.meta.targets}")
        if self.meta.rank > max_rank:
            raise AdapterInvalid(f"rank {self.meta.rank} exceeds the served maximum {max_rank}")


_DTYPE_NAMES = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}


def build_adapter_files(shards: AdapterShards, cfg: LlamaConfig) -> tuple[Manifest, list[bytes]]:
    """Serialise per-rank shards as safetensors and describe them in a manifest."""
    dtypes = {str(t.dtype) for shard in shards.ranks for t in shard.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPE_NAMES:
        raise AdapterInvalid(f"shards must share one dtype among float32/bfloat16/float16, got {sorted(dtypes)}")
    blobs = [save_safetensors({k: t.contiguous() for k, t in shard.items()}) for shard in shards.ranks]
    files = tuple(ShardFile(shard_file_name(i, len(blobs)), len(b), sha256_hex(b)) for i, b in enumerate(blobs))
    manifest = Manifest(meta=shards.meta, base_name=cfg.name,
                        base_shapes=tuple(base_shapes(cfg).items()),
                        dtype=_DTYPE_NAMES[next(iter(dtypes))], files=files)
    return manifest, blobs
