"""Turn a PEFT adapter into N per-rank shards (README.md, "How it works").

Per target, on TP rank i of N (O_i: rank i's output rows, I_i: its input
columns, R_i: the i-th r/N block of the rank dimension):

    mode        column layer (q k v gate up)          row layer (o down)
    bd          A[R_i, :],  B_i (block of B)           A_i (block of A), B[:, R_i]
    slora       A[R_i, :],  B[O_i, :]  + all-gather    A[:, I_i], B[O_i, :]  + all-reduce
    replicated  A,          B[O_i, :]                  A[:, I_i], B

`bd` is served only for adapters trained block-diagonal with nblocks = N; a
target of a BD adapter that is not block-diagonal in the factor its layer
needs is served `replicated` (exact, no collective).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor

from bdlora_ray.config import LlamaConfig
from bdlora_ray.errors import AdapterInvalid
from bdlora_ray.lora.layout import COLUMN_TARGETS, TARGETS, tensor_name
from bdlora_ray.lora.peft import PeftAdapter, load_peft_adapter

MODES = ("bd", "slora", "replicated")


@dataclass(frozen=True)
class AdapterMeta:
    mode: str                          # "bd" | "slora" | "replicated"
    tp: int                            # TP degree N the shards are for
    rank: int                          # global LoRA rank r
    alpha: float                       # lora_alpha
    scale: float                       # s in y += s * B(Ax)
    targets: tuple[str, ...]           # TARGETS order
    num_layers: int
    base_model: str                    # name the adapter was trained on (informational)
    block_targets: tuple[str, ...] = ()  # served block-diagonally (mode "bd" only)

    def target_mode(self, target: str) -> str:
        """How one target is sharded: a non-block target of a bd adapter is replicated."""
        if self.mode == "bd" and target not in self.block_targets:
            return "replicated"
        return self.mode

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterMeta":
        try:
            meta = cls(mode=str(d["mode"]), tp=int(d["tp"]), rank=int(d["rank"]), alpha=float(d["alpha"]),
                       scale=float(d["scale"]), targets=tuple(d["targets"]), num_layers=int(d["num_layers"]),
                       base_model=str(d.get("base_model", "")),
                       block_targets=tuple(d.get("block_targets", ())))
        except KeyError as e:
            raise AdapterInvalid(f"adapter metadata lacks the field {e.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError):
            raise AdapterInvalid("adapter metadata malformed: mode must be a string, tp, rank and num_layers "
                                 "integers, alpha and scale numbers, targets a list of names") from None
        if meta.mode not in MODES:
            raise AdapterInvalid(f"unknown mode {meta.mode!r}")
        if unknown := set(meta.targets) - set(TARGETS):
            raise AdapterInvalid(f"unknown targets {sorted(unknown)}")
        if meta.tp < 1 or meta.rank < 1 or meta.num_layers < 1:
            raise AdapterInvalid("tp, rank and num_layers must be positive")
        return meta


@dataclass
class AdapterShards:
    meta: AdapterMeta
    ranks: list[dict[str, Tensor]]  # ranks[i]: rank i's shard, keys from layout.tensor_name


def local_ranks(meta: AdapterMeta, target: str) -> tuple[int, int]:
    """(rows of a rank's A, columns of its B) for one target."""
    r, n, mode = meta.rank, meta.tp, meta.target_mode(target)
    if mode == "bd":
        return r // n, r // n
    if mode == "slora" and target in COLUMN_TARGETS:
        return r // n, r
    return r, r


def expected_shard_shapes(cfg: LlamaConfig, meta: AdapterMeta, tp_rank: int) -> dict[str, tuple[int, int]]:
    """Every tensor name of rank `tp_rank`'s shard and its shape."""
    if not 0 <= tp_rank < meta.tp:
        raise ValueError(f"tp_rank {tp_rank} outside TP degree {meta.tp}")
    n, shapes = meta.tp, {}
    for target in meta.targets:
        d_in, d_out = cfg.in_features(target), cfg.out_features(target)
        r_a, r_b = local_ranks(meta, target)
        mode = meta.target_mode(target)
        if target in COLUMN_TARGETS:
            a_shape, b_shape = (r_a, d_in), (d_out // n, r_b)
        else:
            a_shape = (r_a, d_in // n)
            b_shape = (d_out // n if mode == "slora" else d_out, r_b)
        for layer in range(meta.num_layers):
            shapes[tensor_name(layer, target, "A")] = a_shape
            shapes[tensor_name(layer, target, "B")] = b_shape
    return shapes


def _check(adapter: PeftAdapter, cfg: LlamaConfig, tp: int, mode: str) -> tuple[str, ...]:
    """Refuse what cannot be served; return the targets to serve block-diagonally."""
    if mode not in MODES:
        raise AdapterInvalid(f"unknown mode {mode!r}; expected one of {MODES}")
    cfg.check_tp(tp)
    if adapter.num_layers != cfg.num_layers:
        raise AdapterInvalid(f"adapter has {adapter.num_layers} layers, base model {cfg.num_layers}")
    bd = adapter.block_diagonal
    for target in adapter.targets:
        A, B = adapter.dense(0, target)
        want = ((adapter.rank, cfg.in_features(target)), (cfg.out_features(target), adapter.rank))
        if (tuple(A.shape), tuple(B.shape)) != want:
            raise AdapterInvalid(f"{target}: A {tuple(A.shape)}, B {tuple(B.shape)} do not fit the base "
                                 f"model (expected {want[0]}, {want[1]})")
    if mode == "replicated":
        return ()
    if adapter.rank % tp:
        raise AdapterInvalid(f"rank {adapter.rank} is not divisible by TP degree {tp} (mode {mode})")
    if mode == "slora":
        return ()
    if bd is None:
        raise AdapterInvalid("mode bd needs an adapter trained as BD-LoRA (use_bdlora); "
                             "serve an ordinary LoRA as slora or replicated")
    if bd.nblocks != tp:
        raise AdapterInvalid(f"BD-LoRA adapter has nblocks={bd.nblocks}, serving TP degree is {tp}")
    return tuple(t for t in adapter.targets
                 if (t in COLUMN_TARGETS and t in bd.b_targets) or (t not in COLUMN_TARGETS and t in bd.a_targets))


def _rank_factors(adapter: PeftAdapter, meta: AdapterMeta, layer: int, target: str, i: int) -> tuple[Tensor, Tensor]:
    n, r = meta.tp, meta.rank
    mode = meta.target_mode(target)
    R = slice(i * r // n, (i + 1) * r // n)
    column = target in COLUMN_TARGETS
    if mode == "bd":
        A, B = adapter.tensors[(layer, target, "A")], adapter.tensors[(layer, target, "B")]  # stacked blocks
        if column:  # B stored (d_out, r/N): block i = its rows O_i
            d = B.shape[0] // n
            return A[R], B[i * d:(i + 1) * d]
        return A[R], B[:, R]  # A stored (r, d_in/N): block i = rows R_i
    A, B = adapter.dense(layer, target)  # (r, d_in), (d_out, r)
    d_in, d_out = A.shape[1] // n, B.shape[0] // n
    O, I = slice(i * d_out, (i + 1) * d_out), slice(i * d_in, (i + 1) * d_in)
    if column:
        return (A[R] if mode == "slora" else A), B[O]
    return A[:, I], (B[O] if mode == "slora" else B)


def shard_adapter(adapter: PeftAdapter, cfg: LlamaConfig, tp: int, mode: str | None = None) -> AdapterShards:
    """Split `adapter` into `tp` per-rank shards. mode None: bd for a BD-LoRA adapter, else replicated."""
    mode = mode or ("bd" if adapter.block_diagonal else "replicated")
    block_targets = _check(adapter, cfg, tp, mode)
    meta = AdapterMeta(mode=mode, tp=tp, rank=adapter.rank, alpha=adapter.alpha, scale=adapter.scale,
                       targets=adapter.targets, num_layers=adapter.num_layers,
                       base_model=adapter.base_model or cfg.name, block_targets=block_targets)
    ranks = []
    for i in range(tp):
        shard = {}
        for layer in range(meta.num_layers):
            for target in meta.targets:
                A, B = _rank_factors(adapter, meta, layer, target, i)
                shard[tensor_name(layer, target, "A")] = A.contiguous()
                shard[tensor_name(layer, target, "B")] = B.contiguous()
        ranks.append(shard)
    return AdapterShards(meta, ranks)


__all__ = ["AdapterMeta", "AdapterShards", "MODES", "expected_shard_shapes", "load_peft_adapter",
           "local_ranks", "shard_adapter"]
