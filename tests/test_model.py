"""Our TP Llama with LoRA in three sharding modes equals HF transformers + PEFT."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from bdlora_ray.comm import Comm
from bdlora_ray.config import PRESETS, LlamaConfig, RopeScaling
from bdlora_ray.errors import AdapterInvalid
from bdlora_ray.lora.shard import expected_shard_shapes, load_peft_adapter, shard_adapter
from bdlora_ray.model import rope_inv_freq
from reference import hf_logits, make_adapter, make_checkpoint
from tp_harness import Job, run, spawn_tp

CFG = LlamaConfig.from_name("tiny")
TOL = 1e-4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    ckpt = make_checkpoint(CFG, d / "base")
    adapters = {
        "lora8": make_adapter(ckpt, d / "lora8", rank=8, seed=1),
        "qv4": make_adapter(ckpt, d / "qv4", rank=4, targets=["q_proj", "v_proj"], alpha=8, seed=2),
        "mlp16": make_adapter(ckpt, d / "mlp16", rank=16, targets=["o_proj", "gate_proj", "down_proj"],
                              rslora=True, seed=3),
        "bd2": make_adapter(ckpt, d / "bd2", rank=8, nblocks=2, seed=4),
        "bd1": make_adapter(ckpt, d / "bd1", rank=8, nblocks=1, seed=5),
    }
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in (7, 5, 9, 6)]
    refs: dict = {}

    def ref(adapter: str | None, prompt: list[int]) -> torch.Tensor:
        key = (adapter, tuple(prompt))
        if key not in refs:
            refs[key] = hf_logits(ckpt, torch.tensor(prompt), adapters[adapter] if adapter else None)
        return refs[key]

    return ckpt, {k: str(v) for k, v in adapters.items()}, prompts, ref


def _job(world, singles, batch, modes):
    ckpt, paths, prompts, _ = world
    slots = {f"{a}:{m}": (paths[a], m) for a, m in modes}
    return Job(CFG, str(ckpt), slots, [(s, prompts[p]) for s, p in singles], [(s, prompts[p]) for s, p in batch])


TP1_MODES = [("lora8", "slora"), ("lora8", "replicated"), ("bd1", "bd"), ("bd2", "replicated"),
             ("qv4", "replicated"), ("mlp16", "slora")]
TP2_MODES = [("lora8", "slora"), ("lora8", "replicated"), ("bd2", "bd"), ("qv4", "slora"),
             ("mlp16", "replicated")]
BATCH = [("lora8:slora", 0), ("bd2:bd", 1), ("qv4:slora", 2), (None, 3)]


@pytest.fixture(scope="module")
def tp2(world):
    singles = [(None, 0)] + [(f"{a}:{m}", i % 4) for i, (a, m) in enumerate(TP2_MODES)]
    return singles, spawn_tp(_job(world, singles, BATCH, TP2_MODES), world=2)


def _check_singles(world, singles, out):
    ref = world[3]
    for i, (slot, p) in enumerate(singles):
        adapter = slot.split(":")[0] if slot else None
        diff = (out[f"single.{i}"] - ref(adapter, world[2][p])).abs().max().item()
        assert diff <= TOL, f"{slot}: max abs diff {diff:.2e} vs HF+PEFT"


def test_tp1_logits_match_hf_peft(world):
    singles = [(None, 0)] + [(f"{a}:{m}", i % 4) for i, (a, m) in enumerate(TP1_MODES)]
    out, _ = run(_job(world, singles, [], TP1_MODES), Comm())
    _check_singles(world, singles, out)


def test_tp2_logits_match_hf_peft(world, tp2):
    singles, results = tp2
    (out0, _), (out1, _) = results
    _check_singles(world, singles, out0)
    assert "sampled" in out0 and "sampled" not in out1
    for k in out1:  # every rank ends with the same full logits
        assert torch.equal(out0[k], out1[k]), k


def test_sampled_rows_reach_rank0_only(tp2):
    """The engine's forward (logits of each sequence's last row, which rank 0 samples) gathers
    them to rank 0 alone: a gather instead of every rank receiving the full vocabulary."""
    _, [(out0, counts0), (_, counts1)] = tp2
    last = torch.tensor([len(p) for p in (out0[f"alone.{i}"] for i in range(len(BATCH)))]).cumsum(0) - 1
    rows = torch.cat([out0[f"batch.{i}"] for i in range(len(BATCH))])[last]
    assert (out0["sampled"] - rows).abs().max() <= ROW_TOL
    for counts in (counts0, counts1):
        full = counts["batch"]
        assert counts["sampled"] == {**full, "all_gather": full["all_gather"] - 1, "gather": 1}


def test_adapters_change_the_output(world, tp2):
    """Guards the comparisons above against an adapter that silently does nothing."""
    singles, [(out, _), _] = tp2
    ref = world[3]
    for i, (slot, p) in enumerate(singles[1:], start=1):
        assert (out[f"single.{i}"] - ref(None, world[2][p])).abs().max() > 100 * TOL, slot


# A row's logits in a batch differ from the row alone only by the float32
# rounding of GEMMs of another batch size (the CPU BLAS is not batch-invariant;
# rows with no adapter show the same), never by another row's adapter.
ROW_TOL = 3e-5


def test_mixed_batch_rows_equal_rows_alone(world, tp2):
    _, [(out, _), _] = tp2
    for i, (slot, p) in enumerate(BATCH):
        diff = (out[f"batch.{i}"] - out[f"alone.{i}"]).abs().max().item()
        assert diff <= ROW_TOL, f"row {i} ({slot}) differs in the batch by {diff:.2e}"
        adapter = slot.split(":")[0] if slot else None
        assert (out[f"batch.{i}"] - world[3](adapter, world[2][p])).abs().max() <= TOL


def test_mixed_batch_tp1(world):
    modes = [("lora8", "slora"), ("bd1", "bd"), ("qv4", "replicated")]
    batch = [("lora8:slora", 0), ("bd1:bd", 1), ("qv4:replicated", 2), (None, 3)]
    out, _ = run(_job(world, [], batch, modes), Comm())
    for i in range(len(batch)):
        diff = (out[f"batch.{i}"] - out[f"alone.{i}"]).abs().max().item()
        assert diff <= ROW_TOL, f"row {i} differs in the batch by {diff:.2e}"


def test_collective_counts(tp2):
    singles, results = tp2
    L = CFG.num_layers
    for _, counts in results:
        base = counts["single.0"]
        assert base == {"all_reduce": 1 + 2 * L, "all_gather": 1}  # embedding, o+down per layer, LM head
        for i, (slot, _) in enumerate(singles[1:], start=1):
            got = counts[f"single.{i}"]
            if not slot.endswith(":slora"):  # bd and replicated ride on the base collectives
                assert got == base, slot
        lora8 = counts[f"single.{[s for s, _ in singles].index('lora8:slora')}"]
        assert lora8 == {"all_reduce": base["all_reduce"] + 2 * L, "all_gather": base["all_gather"] + 2 * L}
        qv4 = counts[f"single.{[s for s, _ in singles].index('qv4:slora')}"]
        assert qv4 == {"all_reduce": base["all_reduce"], "all_gather": base["all_gather"] + L}
        # A batch mixing slora with others issues each extra collective once per layer group.
        assert counts["batch"] == lora8


def test_shards_have_expected_shapes_and_split_work(world):
    _, paths, _, _ = world
    for path, mode, tp in [(paths["lora8"], "slora", 2), (paths["lora8"], "replicated", 2),
                           (paths["bd2"], "bd", 2), (paths["qv4"], "slora", 2)]:
        shards = shard_adapter(load_peft_adapter(path), CFG, tp, mode)
        for i, shard in enumerate(shards.ranks):
            assert {k: tuple(v.shape) for k, v in shard.items()} == expected_shard_shapes(CFG, shards.meta, i)
    bd = shard_adapter(load_peft_adapter(paths["bd2"]), CFG, 2, "bd")
    assert bd.meta.block_targets == bd.meta.targets  # every target block-diagonal in its layer's factor
    a0 = bd.ranks[0]["layers.0.q_proj.lora_A"]
    assert a0.shape == (4, CFG.hidden_size)  # r/N rows: the BD saving


@pytest.mark.parametrize("case", ["nblocks", "rank", "ordinary_bd", "unknown_target", "dora", "layers"])
def test_refuses_what_cannot_be_served(world, tmp_path, case):
    _, paths, _, _ = world
    if case == "nblocks":
        adapter, tp, mode = load_peft_adapter(paths["bd2"]), 4, "bd"
    elif case == "rank":
        adapter, tp, mode = load_peft_adapter(paths["lora8"]), 2, "slora"
        adapter.rank = 3
    elif case == "ordinary_bd":
        adapter, tp, mode = load_peft_adapter(paths["lora8"]), 2, "bd"
    else:
        cfg = json.loads(open(f"{paths['qv4']}/adapter_config.json").read())
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        tensors = {key: torch.randn(4, CFG.hidden_size), key.replace("lora_A", "lora_B"): torch.randn(256, 4)}
        if case == "unknown_target":
            tensors["base_model.model.lm_head.lora_A.weight"] = torch.randn(4, CFG.hidden_size)
        elif case == "dora":
            cfg["use_dora"] = True
        else:
            cfg["layers_to_transform"] = [0]
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(tensors, tmp_path / "adapter_model.safetensors")
        with pytest.raises(AdapterInvalid):
            load_peft_adapter(tmp_path)
        return
    with pytest.raises(AdapterInvalid):
        shard_adapter(adapter, CFG, tp, mode)


def test_config_presets_and_hf_roundtrip():
    tiny = PRESETS["tiny"]
    assert (tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.num_kv_heads, tiny.vocab_size) == \
        (256, 2, 8, 4, 1024)
    for cfg in PRESETS.values():
        assert LlamaConfig.from_hf(cfg.to_hf(), name=cfg.name) == cfg
    with pytest.raises(ValueError):
        LlamaConfig.from_name("nope")
    with pytest.raises(ValueError):
        tiny.check_tp(3)


def test_llama31_rope_scaling_matches_hf():
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = PRESETS["llama-3.1-8b"]
    hf_inv, scale = ROPE_INIT_FUNCTIONS["llama3"](HFConfig(**cfg.to_hf()), "cpu")
    assert scale == 1.0
    assert torch.allclose(rope_inv_freq(cfg), hf_inv, rtol=1e-6, atol=0)


def test_tied_embeddings_and_rope_scaling_tp1(tmp_path):
    cfg = CFG.with_(name="tiny-tied", tie_word_embeddings=True,
                    rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64))
    ckpt = make_checkpoint(cfg, tmp_path / "base", seed=3)
    prompt = list(range(3, 40))
    out, _ = run(Job(cfg, str(ckpt), {}, [(None, prompt)]), Comm())
    assert (out["single.0"] - hf_logits(ckpt, torch.tensor(prompt))).abs().max() <= TOL
    assert math.isfinite(out["single.0"].sum().item())


def test_model_through_triton_kernels_equals_torch_path(world, monkeypatch):
    """The serving path on GPUs (Triton kernels) gives the CPU path's logits; here the
    kernels run under TRITON_INTERPRET=1. 22 rows: above the row-per-program limit,
    so the step's shared segments (sorted launch) are used."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before the kernels load")
    _, paths, prompts, _ = world
    modes = [("qv4", "slora"), ("mlp16", "replicated")]
    job = _job(world, [], [("qv4:slora", 1), ("mlp16:replicated", 3), (None, 0)], modes)
    assert sum(len(p) for _, p in job.batch) > 16
    monkeypatch.setenv("BDLORA_KERNEL_BACKEND", "torch")
    torch_out, _ = run(job, Comm())
    monkeypatch.setenv("BDLORA_KERNEL_BACKEND", "triton")
    from bdlora_ray import kernels
    planned = []
    plan = kernels.plan_segments
    monkeypatch.setattr(kernels, "plan_segments", lambda *a, **k: planned.append(plan(*a, **k)) or planned[-1])
    triton_out, _ = run(job, Comm())
    assert any(p is not None for p in planned)  # the batch used one shared grouping for all layers
    for k in torch_out:
        assert (torch_out[k] - triton_out[k]).abs().max() <= 1e-4, k
