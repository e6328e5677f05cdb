"""The GPU check: prove and measure the CUDA path on one H100/H200 in minutes, without Ray.

    python bench/gpu.py --out DIR            # on a CUDA GPU: ~8 minutes on one H200
    python bench/gpu.py --dry-run --out DIR  # the same, end to end on CPU at tiny shapes

Writes DIR/gpu.json and DIR/gpu.md. Sections, each timed and guarded (one failing
does not stop the others) and cut short at its time budget:

1. kernel_tests: the CUDA cases of tests/test_kernels.py (pytest, junit XML);
2. model_tp1: our model at TP=1 on the device, fp32 and bf16, against HF + PEFT
   (base, LoRA, BD-LoRA), through the serving path (worker, paged pool, kernels);
3. model_tp2: TP=2 in two processes on the one GPU, over gloo (NCCL refuses two
   ranks on one device; gloo carries CUDA tensors through host memory);
4. kernel_sweep: the LoRA kernels at Llama-3.1-8B shapes at TP=8 and TP=1, mixed
   ranks 8-64, 1/16/64/256 tokens, 1..256 distinct adapters of 512 resident:
   GB/s over the bytes that must move, as % of the HBM floor, against the torch
   path and a dense gathered bmm, with the base GEMM of the same layer;
5. decode: the engine's decode loop at TP=1 on a random bf16 Llama-3.1-8B-shaped
   model: tok/s with no LoRA and 1/16/64/256 distinct adapters at batch 64 and 256.

Needs torch, triton, transformers, peft, safetensors (and pytest for section 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: its folder would shadow the `kernels` package
    sys.path[0] = str(ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

log = logging.getLogger("bench.gpu")

HBM_FLOOR_GBPS = {"H200": 4800.0, "H100": 3350.0}  # datasheet bandwidth (H100: SXM)


@dataclass(frozen=True)
class Plan:
    """Sizes of every section: the GPU run's, or the CPU dry run's."""

    device: str
    kernel_test_args: tuple[str, ...]        # pytest selection of tests/test_kernels.py
    model_tol_fp32: float                    # max |ours - HF+PEFT| over the logits, fp32
    sweep_tps: tuple[int, ...]
    sweep_layers: tuple[str, ...]
    sweep_tokens: tuple[int, ...]
    sweep_adapters: tuple[int, ...]          # distinct adapters in a batch (those > tokens are skipped)
    sweep_slots: int                         # adapters resident in the pool
    sweep_ranks: tuple[int, ...]             # adapter ranks, mixed over slots (shard rank r / TP)
    sweep_page: int                          # elements per pool page
    decode_model: str                        # LlamaConfig preset
    decode_batches: tuple[int, ...]
    decode_adapters: tuple[int, ...]         # 0 = no LoRA
    decode_ranks: tuple[int, ...]
    decode_steps: int                        # timed steps per scenario
    budget_s: dict                           # section -> seconds before it stops adding cases


GPU = Plan(device="cuda", kernel_test_args=("-m", "cuda"), model_tol_fp32=1e-3,
           sweep_tps=(8, 1), sweep_layers=("qkv", "o", "gate_up", "down"), sweep_tokens=(1, 16, 64, 256),
           sweep_adapters=(1, 16, 64, 256), sweep_slots=512, sweep_ranks=(8, 16, 32, 64), sweep_page=4096,
           decode_model="llama-3.1-8b", decode_batches=(64, 256), decode_adapters=(0, 1, 16, 64, 256),
           decode_ranks=(8, 16, 32, 64), decode_steps=10,
           budget_s={"kernel_tests": 120, "model_tp1": 50, "model_tp2": 50, "kernel_sweep": 120, "decode": 120})
DRY = Plan(device="cpu", kernel_test_args=("-k", "test_dispatch_with_shared_segments_matches_dense and cpu"),
           model_tol_fp32=1e-4, sweep_tps=(2,), sweep_layers=("tiny",), sweep_tokens=(1, 3),
           sweep_adapters=(1, 2), sweep_slots=4, sweep_ranks=(2, 4), sweep_page=10,
           decode_model="tiny", decode_batches=(4,), decode_adapters=(0, 2), decode_ranks=(2, 4), decode_steps=2,
           budget_s={"kernel_tests": 120, "model_tp1": 60, "model_tp2": 120, "kernel_sweep": 60, "decode": 60})


def _sync(plan: Plan) -> None:
    if plan.device == "cuda":
        torch.cuda.synchronize()


def time_us(fn: Callable[[], Any], plan: Plan) -> float:
    """Median microseconds: triton's do_bench on CUDA (short runs), perf_counter on CPU."""
    if plan.device == "cuda":
        import triton.testing

        return 1e3 * triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")
    fn()  # CPU (the dry run): one warm call, one timed; the interpreter is slow and the figure only a smoke test
    t0 = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - t0)


# ---- 1. the CUDA cases of the kernel tests ----------------------------------------------------------


def kernel_tests(plan: Plan, work: Path, deadline: float) -> dict:
    import importlib.util

    xml = work / "kernel_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "tests/test_kernels.py", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *plan.kernel_test_args]
    if plan.device == "cuda" and importlib.util.find_spec("xdist"):  # Triton compiles dominate: use the cores
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10.0, deadline - time.time()))
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return {"ok": proc.returncode == 0 and passed > 0, "command": " ".join(cmd[1:]), "passed": passed, **n,
            "failed_tests": failed, "output_tail": proc.stdout[-2000:]}


# ---- 2, 3. the model against HF + PEFT --------------------------------------------------------------

PROMPT_LEN, DECODE_ROWS = 12, 4  # prefill the first 8 tokens in one batch, then 4 decode steps


def model_files(work: Path) -> tuple[Any, Path, dict[str, Path], list[int]]:
    """A random tiny Llama and three PEFT adapters (LoRA r8; BD-LoRA r8 with 1 and 2 blocks)."""
    from bdlora_ray.config import LlamaConfig
    from bdlora_ray.synthetic import random_adapter, write_peft_adapter, write_random_checkpoint

    cfg = LlamaConfig.from_name("tiny")
    root = work / "model_files"
    if not (root / "model" / "config.json").exists():
        write_random_checkpoint(cfg, root / "model", seed=0)
        for name, nblocks, seed in (("lora", None, 1), ("bd1", 1, 2), ("bd2", 2, 3)):
            write_peft_adapter(random_adapter(cfg, 8, nblocks=nblocks, seed=seed, name=name), root / name)
    prompt = torch.randint(3, cfg.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()
    return cfg, root / "model", {n: root / n for n in ("lora", "bd1", "bd2")}, prompt


_HF_CACHE: dict[tuple, torch.Tensor] = {}  # sections 2 and 3 compare against the same references


@torch.no_grad()
def hf_logits(ckpt: Path, adapter: Path | None, prompt: list[int], device: str, dtype: torch.dtype) -> torch.Tensor:
    """HF transformers (+ PEFT) logits at the positions we compare: (DECODE_ROWS + 1, vocab) float32."""
    key = (str(ckpt), str(adapter), tuple(prompt), device, dtype)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = _hf_logits(ckpt, adapter, prompt, device, dtype)
    return _HF_CACHE[key]


def _hf_logits(ckpt: Path, adapter: Path | None, prompt: list[int], device: str, dtype: torch.dtype) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=dtype).to(device)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).to(device)
    with torch.no_grad():
        logits = model.eval()(torch.tensor([prompt], device=device)).logits[0].float().cpu()
    return logits[PROMPT_LEN - DECODE_ROWS - 1:]


def ours_logits(cfg, ckpt: Path, adapters: dict[str, tuple[str, str]], cases: list[str | None], prompt: list[int],
                comm, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """Every case's sequence in one mixed batch through the serving path: a prefill step, then
    DECODE_ROWS decode steps; the logits of each step's last rows (rank 0; None elsewhere)."""
    from bdlora_ray.memory import PoolConfig
    from bdlora_ray.worker import LocalShardSource, StepChannel, TPWorker

    tp = comm.world_size
    pool = PoolConfig.for_model(cfg, tp, 512, 16, dtype, device)
    worker = TPWorker(cfg, str(ckpt), comm, pool, LocalShardSource(adapters, cfg, tp), StepChannel(tp), device, dtype)
    for name in {c for c in cases if c is not None}:
        worker.apply("load_adapter", [name])
    for seq in range(len(cases)):
        worker.apply("allocate_kv", [seq, PROMPT_LEN])
    first = PROMPT_LEN - DECODE_ROWS
    steps = [worker.execute([[i, c, 0, prompt[:first]] for i, c in enumerate(cases)])]
    for pos in range(first, PROMPT_LEN):
        steps.append(worker.execute([[i, c, pos, [prompt[pos]]] for i, c in enumerate(cases)]))
    if steps[0] is None:
        return None
    stacked = torch.stack([s.float().cpu() for s in steps], 1)  # (cases, DECODE_ROWS + 1, vocab)
    return {str(c): stacked[i] for i, c in enumerate(cases)}


def _peft_has_bd() -> bool:
    import peft

    return hasattr(peft, "BdLoraConfig")


def model_tp1(plan: Plan, work: Path, deadline: float) -> dict:
    from bdlora_ray.comm import Comm

    cfg, ckpt, paths, prompt = model_files(work)
    cases = {"base": None, "lora (slora)": ("lora", "slora"), "lora (replicated)": ("lora", "replicated"),
             "BD-LoRA 1 block (bd)": ("bd1", "bd"), "BD-LoRA 2 blocks (replicated)": ("bd2", "replicated")}
    if not _peft_has_bd():  # an older PEFT would read a BD adapter as an ordinary one: no reference
        cases = {k: v for k, v in cases.items() if v is None or not v[0].startswith("bd")}
    adapters = {f"{a}-{m}": (str(paths[a]), m) for a, m in (v for v in cases.values() if v)}
    names = [None if v is None else f"{v[0]}-{v[1]}" for v in cases.values()]
    rows, ok = [], True
    ref32 = {a: hf_logits(ckpt, paths.get(a), prompt, plan.device, torch.float32) for a in
             {None if v is None else v[0] for v in cases.values()}}
    for dtype in (torch.float32, torch.bfloat16):
        ours = ours_logits(cfg, ckpt, adapters, names, prompt, Comm(), plan.device, dtype)
        ref16 = {a: hf_logits(ckpt, paths.get(a), prompt, plan.device, dtype) for a in ref32} \
            if dtype == torch.bfloat16 else None
        for (label, v), name in zip(cases.items(), names):
            a = None if v is None else v[0]
            err = (ours[str(name)] - ref32[a]).abs().max().item()
            if dtype == torch.float32:
                tol, hf_err = plan.model_tol_fp32, None
            else:  # ours in bf16 may be off fp32 by at most twice what HF + PEFT in bf16 is
                hf_err = (ref16[a] - ref32[a]).abs().max().item()
                tol = max(2 * hf_err, 1e-2)
            moved = None if a is None else (ours[str(name)] - ours["None"]).abs().max().item()
            good = err <= tol and (moved is None or moved > 10 * plan.model_tol_fp32)
            ok &= good
            rows.append({"dtype": str(dtype).removeprefix("torch."), "case": label, "max_abs_err": err,
                         "hf_bf16_err": hf_err, "tol": tol, "adapter_effect": moved, "ok": good})
    fused = attention_without_math(plan)
    ok &= fused in (None, "ok")
    return {"ok": ok, "rows": rows, "peft_bd": _peft_has_bd(), "attention_without_math": fused,
            "tolerances": f"fp32: max |ours - HF+PEFT fp32| <= {plan.model_tol_fp32:g}; bf16: <= max(2 x HF+PEFT "
                          f"bf16's own error vs fp32, 1e-2); each adapter must move the logits by > "
                          f"{10 * plan.model_tol_fp32:g}"}


def attention_without_math(plan: Plan) -> str | None:
    """On CUDA: decode attention (grouped query heads, boolean mask) and whole-sequence prefill
    (is_causal) at Llama-3.1-8B head shapes in bf16 run with SDPA's math backend disabled
    ("ok"), or the error saying they cannot. None on CPU, which has only the math path here."""
    if plan.device != "cuda":
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bdlora_ray import attention

    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    D, L, n = 64, 700, 300
    mask = torch.arange(L, device="cuda")[None, None, None, :] < torch.randint(1, L, (D, 1, 1, 1), device="cuda")
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            attention._decode(r(D, 32, 128), r(D, L, 8, 128), r(D, L, 8, 128), mask)
            attention._causal(r(n, 32, 128), r(n, 8, 128), r(n, 8, 128))
        return "ok"
    except RuntimeError as e:
        return f"needs the math backend: {str(e)[:300]}"


TP2_CASES = {"base": None, "lora (slora)": ("lora", "slora"), "lora (replicated)": ("lora", "replicated"),
             "BD-LoRA 2 blocks (bd)": ("bd2", "bd")}


def _tp2_rank(rank: int, init: str, device: str, work: str, out: str) -> None:
    from safetensors.torch import save_file

    from bdlora_ray.comm import end_spawned_rank, init_distributed, leave_world

    torch.set_num_threads(1)
    comm = init_distributed(rank, 2, init, backend="gloo")  # gloo: NCCL refuses two ranks on one GPU
    cfg, ckpt, paths, prompt = model_files(Path(work))
    cases = {k: v for k, v in TP2_CASES.items() if v is None or not v[0].startswith("bd") or _peft_has_bd()}
    adapters = {f"{a}-{m}": (str(paths[a]), m) for a, m in (v for v in cases.values() if v)}
    names = [None if v is None else f"{v[0]}-{v[1]}" for v in cases.values()]
    ours = ours_logits(cfg, ckpt, adapters, names, prompt, comm, device, torch.float32)
    if rank == 0:
        save_file(ours, os.path.join(out, "tp2_rank0.safetensors"))
    Path(out, f"tp2_rank{rank}.json").write_text(json.dumps({"got_logits": ours is not None,
                                                              "counts": dict(comm.counts)}))
    leave_world(barrier=True)
    end_spawned_rank()


def model_tp2(plan: Plan, work: Path, deadline: float) -> dict:
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    _, ckpt, paths, prompt = model_files(work)  # written once, here, before the ranks read it
    out = work / "tp2"
    out.mkdir(exist_ok=True)
    mp.spawn(_tp2_rank, args=(f"file://{out / 'init'}", plan.device, str(work), str(out)), nprocs=2, join=True)
    ours = load_file(out / "tp2_rank0.safetensors")
    info = [json.loads((out / f"tp2_rank{r}.json").read_text()) for r in range(2)]
    rows, ok = [], not info[1]["got_logits"]  # only rank 0 samples, so only rank 0 receives logits
    for label, v in TP2_CASES.items():
        name = "None" if v is None else f"{v[0]}-{v[1]}"
        if name not in ours:
            continue
        err = (ours[name] - hf_logits(ckpt, None if v is None else paths[v[0]], prompt, plan.device,
                                      torch.float32)).abs().max().item()
        ok &= err <= plan.model_tol_fp32
        rows.append({"case": label, "max_abs_err": err, "tol": plan.model_tol_fp32, "ok": err <= plan.model_tol_fp32})
    return {"ok": ok and len(rows) > 0, "rows": rows, "transport": "gloo over CUDA tensors" if plan.device == "cuda"
            else "gloo (cpu)", "rank1_got_logits": info[1]["got_logits"], "counts": [i["counts"] for i in info]}


# ---- 4. the kernels at Llama-3.1-8B shapes ----------------------------------------------------------


def copy_gbps(plan: Plan) -> float | None:
    """Device-to-device copy bandwidth (read + write), a measured ceiling beside the datasheet's."""
    if plan.device != "cuda":
        return None
    a = torch.empty(2**29, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / time_us(lambda: b.copy_(a), plan) / 1e3


def hbm_floor_gbps() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in HBM_FLOOR_GBPS.items() if k in name), None)


def kernel_sweep(plan: Plan, work: Path, deadline: float) -> dict:
    from bench.kernels import layer_shape, make_problem

    dtype = torch.bfloat16 if plan.device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    floor, copy = hbm_floor_gbps(), copy_gbps(plan)
    rows, wrong, cut = [], [], False
    for tp in plan.sweep_tps:
        for layer in plan.sweep_layers:
            d_in, out_lens = layer_shape(layer, tp)
            shard_ranks = [max(1, plan.sweep_ranks[i % len(plan.sweep_ranks)] // tp) for i in range(plan.sweep_slots)]
            p = make_problem(d_in, out_lens, shard_ranks, plan.sweep_page, dtype, plan.device, gen)
            W = torch.randn(sum(out_lens), d_in, generator=gen).to(dtype).to(plan.device)  # the base layer's weight
            for T in plan.sweep_tokens:
                for n in (a for a in plan.sweep_adapters if a <= T):
                    if time.time() > deadline:
                        cut = True
                        break
                    row = {"tp": tp, "layer": layer, **_kernel_case(p, W, d_in, out_lens, T, n, dtype, plan, gen)}
                    for k in ("shrink", "expand"):
                        row[f"{k}_pct_hbm_floor"] = None if floor is None else 100 * row[f"{k}_GBps"] / floor
                        row[f"{k}_pct_copy"] = None if copy is None else 100 * row[f"{k}_GBps"] / copy
                    if not row["agrees_with_torch_path"]:
                        wrong.append(f"tp{tp} {layer} T={T} adapters={n}")
                    rows.append(row)
            del p, W
    return {"ok": not wrong and not cut and len(rows) > 0, "rows": rows, "wrong": wrong, "cut_short": cut,
            "dtype": str(dtype), "hbm_floor_GBps": floor, "copy_GBps": copy,
            "device": torch.cuda.get_device_name() if plan.device == "cuda" else "cpu (triton interpreter)"}


def _kernel_case(p, W, d_in: int, out_lens: tuple[int, ...], T: int, n_adapters: int, dtype: torch.dtype,
                 plan: Plan, gen: torch.Generator) -> dict:
    from bdlora_ray import kernels

    dev = plan.device
    S, n = p.rank.shape
    slots = torch.randperm(S, generator=gen)[:n_adapters]
    idx = slots[torch.randperm(T, generator=gen) % n_adapters].to(torch.int32).to(dev)  # (T,) every slot used
    x = torch.randn(T, d_in, generator=gen).to(dtype).to(dev)                          # (T, d_in)
    y = torch.randn(T, sum(out_lens), generator=gen).to(dtype).to(dev)                 # (T, d_out)
    args = (p.pool, p.page_table, idx)
    seg = kernels.plan_segments(idx, S, backend="triton")  # once per step in the model, shared by layers

    def shrink(backend: str) -> torch.Tensor:
        return kernels.lora_shrink(x, *args, p.a_offset, p.rank, p.max_rank, backend=backend,
                                   segments=seg if backend == "triton" else None)

    def expand(backend: str, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return kernels.lora_expand(h, *args, p.b_offset, p.rank, p.out_start, p.out_len, p.scale, out,
                                   backend=backend, segments=seg if backend == "triton" else None)

    h = shrink("triton")                                                             # (T, n, R) float32
    h_torch = shrink("torch")
    y_tri, y_torch = expand("triton", h_torch, y.clone()), expand("torch", h_torch, y.clone())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    err = max((h - h_torch).abs().max().item() / (1 + h_torch.abs().max().item()),
              (y_tri.float() - y_torch.float()).abs().max().item() / (1 + y_torch.float().abs().max().item()))

    # Dense baseline: each token's factors gathered ahead (not timed), one bmm per slice.
    R = p.max_rank
    A_g = torch.empty(n, T, R, d_in, dtype=dtype, device=dev).normal_(0, 0.02)          # (n, T, R, d_in)
    B_g = [torch.empty(T, L, R, dtype=dtype, device=dev).normal_(0, 0.02) for L in out_lens]  # (T, L, R)
    starts = [sum(out_lens[:s]) for s in range(n)]
    h_dense = h.to(dtype)

    def bmm_shrink():
        return [torch.bmm(A_g[s], x[:, :, None]) for s in range(n)]                   # n x (T, R, 1)

    def bmm_expand():
        for s, (o, L) in enumerate(zip(starts, out_lens)):
            y[:, o:o + L] += torch.bmm(B_g[s], h_dense[:, s, :, None])[..., 0]

    elt = torch.finfo(dtype).bits // 8
    distinct = p.rank[slots.to(dev).long()].long()                                    # (n_adapters, n)
    w_a = int((distinct * d_in).sum()) * elt
    w_b = int((distinct * p.out_len[0].long()).sum()) * elt
    h_bytes = T * n * R * 4
    row = {"T": T, "adapters": n_adapters, "d_in": d_in, "out_lens": list(out_lens), "max_rel_err_vs_torch": err,
           "agrees_with_torch_path": err <= tol, "shrink_bytes": w_a + T * d_in * elt + h_bytes,
           "expand_bytes": w_b + h_bytes + 2 * T * sum(out_lens) * elt,
           "base_gemm_us": time_us(lambda: F.linear(x, W), plan)}
    for k, tri, tor, dense in (
        ("shrink", lambda: shrink("triton"), lambda: shrink("torch"), bmm_shrink),
        ("expand", lambda: expand("triton", h, y), lambda: expand("torch", h, y), bmm_expand),
    ):
        row[f"{k}_triton_us"] = time_us(tri, plan)
        row[f"{k}_torch_us"] = time_us(tor, plan)
        row[f"{k}_bmm_us"] = time_us(dense, plan)
        row[f"{k}_GBps"] = row[f"{k}_bytes"] / row[f"{k}_triton_us"] / 1e3
        row[f"{k}_vs_torch"] = row[f"{k}_torch_us"] / row[f"{k}_triton_us"]
        row[f"{k}_vs_bmm"] = row[f"{k}_bmm_us"] / row[f"{k}_triton_us"]
    return row


# ---- 5. the engine's decode loop ----------------------------------------------------------------------


class RandomShardSource:
    """Adapters named `random-<i>` of mixed ranks, random weights made once per rank and shared by
    every name of that rank: each name still gets its own pages in the pool (the copies, the page
    tables and the kernels' reads are those of distinct adapters; only the values repeat)."""

    def __init__(self, cfg, ranks: tuple[int, ...]) -> None:
        self.cfg, self.ranks = cfg, ranks
        self._made: dict[int, tuple] = {}  # rank -> (meta, shard)

    def get_shard(self, name: str, tp_rank: int):
        from bdlora_ray.lora.shard import shard_adapter
        from bdlora_ray.synthetic import random_adapter

        r = self.ranks[int(name.rsplit("-", 1)[1]) % len(self.ranks)]
        if r not in self._made:
            shards = shard_adapter(random_adapter(self.cfg, r, seed=r, std=0.02, name=f"random-r{r}"), self.cfg, 1,
                                   "replicated")
            self._made[r] = (shards.meta, shards.ranks[0])
        return self._made[r]


class SilentTokenizer:
    """Decodes to nothing: the random model's tokens mean nothing, and this times the step loop alone."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def decode(plan: Plan, work: Path, deadline: float) -> dict:
    from bdlora_ray.comm import Comm
    from bdlora_ray.config import LlamaConfig
    from bdlora_ray.engine import Engine, EngineConfig
    from bdlora_ray.memory import PoolConfig
    from bdlora_ray.tp import RandomWeights
    from bdlora_ray.worker import StepChannel, TPWorker

    cfg, dtype, dev = LlamaConfig.from_name(plan.decode_model), torch.bfloat16, plan.device
    prompt_len, batch_max = 8, max(plan.decode_batches)
    t0 = time.perf_counter()
    weights = RandomWeights(cfg, dev, dtype)
    page_bytes = PoolConfig.for_model(cfg, 1, 1, 16, dtype, dev).nbytes  # one page id across all layers
    if dev == "cuda":  # what the weights leave, less room for activations
        model_bytes = 2 * sum(math.prod(s) for s in weights.shapes.values())
        pool_bytes = int(0.7 * (torch.cuda.mem_get_info()[0] - model_bytes))
    else:
        pool_bytes = 1024 * page_bytes
    pages = pool_bytes // page_bytes
    config = EngineConfig(max_num_seqs=batch_max, max_num_batched_tokens=batch_max * prompt_len,
                          max_model_len=prompt_len + plan.decode_steps + 8, num_pages=pages, max_lora_rank=64)
    worker = TPWorker(cfg, weights, Comm(), PoolConfig.for_model(cfg, 1, pages, 16, dtype, dev),
                      RandomShardSource(cfg, plan.decode_ranks), StepChannel(1), dev, dtype)
    engine = Engine(worker, SilentTokenizer(), config)
    build_s = time.perf_counter() - t0
    rows, cut = [], False
    for B in plan.decode_batches:
        # No LoRA once more at the end of each batch size: the first H200 run had it slower than one
        # adapter, and only a repeat tells an order effect (clocks, allocator, first use) from the path.
        counts = [a for a in plan.decode_adapters if a <= B]
        for n in counts + [0] * (0 in counts):
            if time.time() > deadline:
                cut = True
                break
            rows.append({"batch": B, "adapters": n, **_decode_rate(engine, B, n, prompt_len, plan)})
    engine.stop()
    base: dict[int, float] = {}  # the faster of the two no-LoRA runs at each batch size
    for r in rows:
        if r["adapters"] == 0:
            base[r["batch"]] = max(base.get(r["batch"], 0.0), r["tokens_per_s"])
    for r in rows:
        r["vs_no_lora"] = r["tokens_per_s"] / base[r["batch"]] if r["batch"] in base else None
    return {"ok": not cut and len(rows) > 0, "rows": rows, "cut_short": cut, "model": cfg.name, "dtype": "bfloat16",
            "pool_pages": pages, "build_s": build_s, "ranks": list(plan.decode_ranks),
            "note": "engine stepped in this process, no Ray; detokenization left out (SilentTokenizer)"}


def _decode_rate(engine, B: int, n: int, prompt_len: int, plan: Plan) -> dict:
    from bdlora_ray.request import GenerationRequest, SamplingParams

    warm = 5
    g = torch.Generator().manual_seed(B * 1000 + n)
    outs: dict[str, list] = {}
    params = SamplingParams(max_tokens=warm + plan.decode_steps + 2, temperature=0.0, ignore_eos=True)
    for i in range(B):
        rid = f"b{B}-a{n}-{i}-{time.monotonic_ns()}"
        outs[rid] = []
        prompt = tuple(torch.randint(3, 1000, (prompt_len,), generator=g).tolist())
        engine.submit(GenerationRequest(rid, prompt, None if n == 0 else f"random-{i % n}", params), outs[rid].append)
    t0 = time.perf_counter()
    while not all(outs.values()):  # until every sequence has its first token: prefill and adapter loads done
        if not engine.step():
            engine.wait_for_work(0.01)
        if time.perf_counter() - t0 > 300:
            raise TimeoutError(f"batch {B}, {n} adapters: prefill did not finish")
    prefill_s = time.perf_counter() - t0
    if len(engine.scheduler.running) != B:
        raise RuntimeError(f"{len(engine.scheduler.running)} of {B} sequences running: the pool is too small")
    for _ in range(warm):  # kernels of these shapes compile here, not in the timed steps
        engine.step()
    _sync(plan)
    t0 = time.perf_counter()
    for _ in range(plan.decode_steps):
        engine.step()
    _sync(plan)
    dt = time.perf_counter() - t0
    for rid in outs:
        engine.abort(rid)
    for _ in range(100):  # the aborts free every sequence's pages before the next scenario
        engine.step()
        if not (engine.scheduler.running or engine.scheduler.waiting):
            break
    return {"tokens_per_s": B * plan.decode_steps / dt, "step_ms": 1e3 * dt / plan.decode_steps,
            "prefill_and_load_s": prefill_s}


# ---- report -------------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[Plan, Path, float], dict]] = {
    "kernel_tests": kernel_tests, "model_tp1": model_tp1, "model_tp2": model_tp2,
    "kernel_sweep": kernel_sweep, "decode": decode}


def run_section(name: str, plan: Plan, work: Path) -> dict:
    t0 = time.perf_counter()
    try:
        res = SECTIONS[name](plan, work, time.time() + plan.budget_s[name])
    except Exception as e:  # noqa: BLE001  one section's failure is reported, the others still run
        log.exception("section %s failed", name)
        res = {"ok": False, "error": repr(e), "traceback": traceback.format_exc()[-4000:]}
    res["seconds"] = time.perf_counter() - t0
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    log.info("%s: %s in %.1f s", name, "ok" if res["ok"] else "FAILED", res["seconds"])
    return res


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _table(rows: list[dict], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return out + ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]


def markdown(report: dict) -> str:
    m, s = report["meta"], report["sections"]
    out = [f"# GPU check ({'dry run on CPU' if m['dry_run'] else m['device']})", "",
           f"`{m['command']}`: torch {m['torch']}, triton {m['triton']}, {m['total_s']:.0f} s in all.", ""]
    cols = {"kernel_tests": None,
            "model_tp1": ["dtype", "case", "max_abs_err", "hf_bf16_err", "tol", "adapter_effect", "ok"],
            "model_tp2": ["case", "max_abs_err", "tol", "ok"],
            "kernel_sweep": ["tp", "layer", "T", "adapters", "shrink_triton_us", "shrink_GBps", "shrink_pct_hbm_floor",
                             "shrink_vs_torch", "shrink_vs_bmm", "expand_triton_us", "expand_GBps",
                             "expand_pct_hbm_floor", "expand_vs_torch", "expand_vs_bmm", "base_gemm_us"],
            "decode": ["batch", "adapters", "tokens_per_s", "step_ms", "vs_no_lora"]}
    for i, name in enumerate(SECTIONS, 1):
        r = s.get(name, {"ok": False, "error": "not run", "seconds": 0.0})
        out += [f"## {i}. {name}: {'ok' if r['ok'] else 'FAILED'} ({r['seconds']:.1f} s)", ""]
        if "error" in r:
            out += ["```", r.get("traceback", r["error"]).strip(), "```", ""]
            continue
        if name == "kernel_tests":
            out += [f"`{r['command']}`: {r['passed']} passed, {r['failures']} failed, {r['errors']} errors, "
                    f"{r['skipped']} skipped." + (f" Failing: {', '.join(r['failed_tests'])}" if r["failed_tests"] else ""), ""]
            continue
        extra = {k: v for k, v in r.items() if k not in ("rows", "ok", "seconds") and not isinstance(v, (list, dict))}
        out += [", ".join(f"{k}: {_fmt(v)}" for k, v in extra.items()), ""]
        out += _table(r.get("rows", []), cols[name]) + [""]
    if "projection" in report:
        from bench.projection import markdown as projection_table

        out += ["## Projection: bd over slora at TP=8 (bench/projection.py, this run's parts)", "",
                projection_table(report["projection"]), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    ap.add_argument("--dry-run", action="store_true", help="run everything on CPU at tiny shapes")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, in order")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU here; --dry-run runs the same script on CPU", file=sys.stderr)
        return 2
    if args.dry_run:  # before any Triton kernel is defined: the sweep runs them interpreted
        os.environ.setdefault("TRITON_INTERPRET", "1")
    plan = DRY if args.dry_run else GPU
    names = [n for n in args.sections.split(",") if n]
    unknown = set(names) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {list(SECTIONS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    t0 = time.perf_counter()
    sections: dict[str, dict] = {}
    report = {"meta": {"dry_run": args.dry_run, "plan": asdict(plan), "torch": torch.__version__,
                       "triton": triton.__version__, "total_s": 0.0,
                       "device": torch.cuda.get_device_name() if plan.device == "cuda" else "cpu",
                       "command": "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])},
              "sections": sections}
    with tempfile.TemporaryDirectory() as d:
        for n in names:  # the report is rewritten after each section: a run cut off keeps what it measured
            sections[n] = run_section(n, plan, Path(d))
            report["meta"]["total_s"] = time.perf_counter() - t0
            (args.out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
    if sections.get("kernel_sweep", {}).get("rows"):  # the TP=8 projection with this run's measured parts
        from bench.projection import project

        report["projection"] = project(report)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "gpu.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(r["ok"] for r in sections.values()) else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.exit(main())
