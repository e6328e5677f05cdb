"""Check a downloaded shard file completely before anything keeps it.

Order, cheapest and most telling first: size and sha256 against the manifest
(catches truncation, bit flips, a stale or foreign file), then the
safetensors header parsed here and bounded before safetensors sees the bytes
(catches HTML pages, git-LFS pointers, absurd headers), then tensor names,
shapes and dtypes against what the serving model expects of this TP rank,
then the values (NaN/Inf). Only then are tensors returned. Nothing here is
pickle: JSON and safetensors only.
"""

from __future__ import annotations

import json
import math

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import Tensor

from bdlora_ray.config import LlamaConfig
from bdlora_ray.errors import AdapterInvalid
from bdlora_ray.lora.shard import expected_shard_shapes
from bdlora_ray.store.manifest import Manifest, parsing, sha256_hex

ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}  # the dtypes an adapter may use
DEFAULT_MAX_HEADER_BYTES = 4 << 20          # ~30k tensors of header: far above any real shard


def describe_foreign_body(head: bytes) -> str:
    """A hint when a body is clearly not a safetensors file ('' otherwise)."""
    h = bytes(head[:256]).lstrip().lower()
    if h.startswith(b"version https://git-lfs"):
        return " (it is a git-LFS pointer, not the file: fetch the real file with `git lfs pull`)"
    if h.startswith((b"<!doctype html", b"<html", b"<?xml", b"<")):
        return " (it is an HTML/XML page, e.g. an error page from a proxy or a wrong endpoint)"
    return ""


def parse_header(data: bytes, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                 what: str = "file") -> dict[str, dict]:
    """The tensor entries of a safetensors header, checked for sanity.

    Layout: 8-byte little-endian header length n, n bytes of JSON, then the
    tensor data; each entry's data_offsets are relative to the data start.
    """
    if len(data) < 8:
        raise AdapterInvalid(f"{what}: {len(data)} bytes is too short for safetensors{describe_foreign_body(data)}")
    n = int.from_bytes(data[:8], "little")
    if not 2 <= n <= min(max_header_bytes, len(data) - 8):
        raise AdapterInvalid(f"{what}: safetensors header length {n} out of bounds "
                             f"(file {len(data)} bytes, limit {max_header_bytes}){describe_foreign_body(data)}")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterInvalid(f"{what}: safetensors header is not JSON ({e}){describe_foreign_body(data)}") from None
    if not isinstance(header, dict):
        raise AdapterInvalid(f"{what}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterInvalid(f"{what}: __metadata__ must map strings to strings")
    data_len, spans = len(data) - 8 - n, []
    for name, e in header.items():
        ok = (isinstance(e, dict) and e.get("dtype") in ITEMSIZE
              and isinstance(e.get("shape"), list) and all(type(s) is int and s >= 0 for s in e["shape"])
              and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
              and all(type(o) is int for o in e["data_offsets"]))
        if not ok:
            raise AdapterInvalid(f"{what}: tensor {name!r}: malformed entry (dtype among {sorted(ITEMSIZE)}, "
                                 "integer shape and data_offsets required)")
        begin, end = e["data_offsets"]
        if not 0 <= begin <= end <= data_len or end - begin != math.prod(e["shape"]) * ITEMSIZE[e["dtype"]]:
            raise AdapterInvalid(f"{what}: tensor {name!r}: data_offsets {e['data_offsets']} do not fit "
                                 f"its shape or the file ({data_len} data bytes)")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise AdapterInvalid(f"{what}: tensors {a!r} and {b!r} overlap")
    return header


def validate_shard(data: bytes, manifest: Manifest, tp_rank: int, cfg: LlamaConfig,
                   max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, what: str = "shard") -> dict[str, Tensor]:
    """Rank `tp_rank`'s tensors from `data`, or AdapterInvalid; see the module docstring.

    `manifest` must already have passed `Manifest.check_serves` for `cfg`.
    """
    with parsing(what):
        return _validate_shard(data, manifest, tp_rank, cfg, max_header_bytes, what)


def _validate_shard(data: bytes, manifest: Manifest, tp_rank: int, cfg: LlamaConfig, max_header_bytes: int,
                    what: str) -> dict[str, Tensor]:
    f = manifest.files[tp_rank]
    if len(data) != f.size:
        raise AdapterInvalid(f"{what}: {len(data)} bytes, manifest says {f.size} (truncated or replaced)"
                             f"{describe_foreign_body(data)}")
    if sha256_hex(data) != f.sha256:
        raise AdapterInvalid(f"{what}: sha256 mismatch with the manifest (corrupt or replaced)"
                             f"{describe_foreign_body(data)}")
    header = parse_header(data, max_header_bytes, what)

    expected = expected_shard_shapes(cfg, manifest.meta, tp_rank)
    if missing := sorted(set(expected) - set(header)):
        raise AdapterInvalid(f"{what}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if extra := sorted(set(header) - set(expected)):
        raise AdapterInvalid(f"{what}: unexpected tensors {extra[:4]}{' ...' if len(extra) > 4 else ''}")
    for name, shape in expected.items():
        e = header[name]
        if tuple(e["shape"]) != tuple(shape):
            raise AdapterInvalid(f"{what}: tensor {name} has shape {tuple(e['shape'])}, expected {tuple(shape)} "
                                 f"for base {cfg.name!r} at TP {manifest.meta.tp} ({manifest.meta.mode})")
        if e["dtype"] != manifest.dtype:
            raise AdapterInvalid(f"{what}: tensor {name} is {e['dtype']}, manifest says {manifest.dtype}")

    try:
        tensors = load_safetensors(bytes(data))
    except (SafetensorError, ValueError) as e:
        raise AdapterInvalid(f"{what}: safetensors rejected the file ({e})") from None
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise AdapterInvalid(f"{what}: tensor {name} contains NaN or Inf")
    return tensors
