"""What the GPU path needs that CPU can show: seeded sampling on the logits' device and a
sampling failure confined to its request; the model built in its target dtype; the GPU bound
before NCCL set-up; logits gathered to rank 0 only where only rank 0 samples; attention
paths that CUDA serves without the math backend, equal to plain attention."""

from __future__ import annotations


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bdlora_ray import attention, comm as comm_mod
from bdlora_ray.comm import Comm, init_distributed
from bdlora_ray.config import LlamaConfig
from bdlora_ray.request import SamplingParams
from bdlora_ray.sampling import RequestGenerator, SamplingError, make_generator, sample, sample_row
from bdlora_ray.synthetic import write_random_checkpoint
from bdlora_ray.tokenizer import save_byte_tokenizer
from bdlora_ray.tp import RandomWeights, TPModel
from engine_harness import local_engine, run_to_completion, tokens
from test_engine import req

CFG = LlamaConfig.from_name("tiny")


# --- sampling -----------------------------------------------------------------------------------------


def test_seeded_generator_is_made_on_the_logits_device_and_reproduces():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, seed=123)
    g = make_generator(p)
    assert isinstance(g, RequestGenerator) and make_generator(SamplingParams()) is None
    draws = [sample_row(logits, p, g) for _ in range(20)]
    assert g.on(logits.device).device == logits.device  # made where the logits were, at first use
    again = make_generator(p)
    assert [sample_row(logits, p, again) for _ in range(20)] == draws
    assert len(set(draws)) > 1
    with pytest.raises(SamplingError, match="moved"):
        g.on(torch.device("meta"))  # a new device would silently restart the stream


def test_a_row_that_cannot_be_sampled_fails_alone():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    logits[1, 7] = float("nan")
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0)]
    out = sample(logits, params, [make_generator(p) for p in params]).tokens
    assert out[0] == int(logits[0].argmax()) and isinstance(out[2], int)
    assert isinstance(out[1], SamplingError) and out[1].http_status == 500
    logits[1, 7] = float("inf")
    assert isinstance(sample(logits, params, [None] * 3).tokens[1], SamplingError)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_path")
    ckpt = write_random_checkpoint(CFG, d / "tiny")
    save_byte_tokenizer(ckpt)
    return ckpt


def test_sampling_error_fails_its_request_and_the_loop_goes_on(tiny_ckpt, monkeypatch):
    engine = local_engine(CFG, tiny_ckpt, {})
    real = engine.worker.execute

    def poisoned(msg):  # the "bad" request's row comes out non-finite (as a device fault would leave it)
        logits = real(msg).clone()
        bad = engine._seqs.get("bad")
        for row, (seq_id, *_rest) in enumerate(msg):
            if bad is not None and seq_id == bad.seq_id:
                logits[row, 3] = float("nan")
        return logits

    monkeypatch.setattr(engine.worker, "execute", poisoned)
    outs = run_to_completion(engine, [req("bad", [5, 6, 7], temperature=1.0, seed=13, max_tokens=4),
                                      req("good", [5, 6, 7], temperature=1.0, seed=14, max_tokens=4),
                                      req("greedy", [8, 9], max_tokens=4)])
    assert outs["bad"][-1].finish_reason == "error" and outs["bad"][-1].error_type == "SamplingError"
    assert outs["bad"][-1].error_status == 500 and "non-finite" in outs["bad"][-1].error
    assert len(tokens(outs["good"])) == 4 and len(tokens(outs["greedy"])) == 4
    assert engine.dead is None and engine.counters["sampling_errors"] == 1
    later = run_to_completion(engine, [req("later", [1, 2], max_tokens=3)])  # the engine still serves
    assert later["later"][-1].finish_reason == "length" and not engine.scheduler.running


# --- model build -------------------------------------------------------------------------------------


class FloatAllocations(TorchDispatchMode):
    """Records the element counts of float32 tensors that factory and conversion ops create."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device.type != "meta":
            self.sizes.append(out.numel())
        return out


def test_model_is_built_in_its_dtype_without_a_float32_copy(tmp_path):
    ckpt = write_random_checkpoint(CFG, tmp_path / "bf16", dtype=torch.bfloat16)
    with FloatAllocations() as seen:
        model = TPModel(CFG, ckpt, Comm(), dtype=torch.bfloat16)
    assert {p.dtype for p in model.model.parameters()} == {torch.bfloat16}
    assert max(seen.sizes, default=0) < CFG.hidden_size, "a float32 tensor of weight size was made"
    # The detector sees what the old build did (allocate float32, then cast): the check has teeth.
    from bdlora_ray.model import Transformer
    with torch.device("meta"):
        meta = Transformer(CFG)
    with FloatAllocations() as old:
        meta.to_empty(device="cpu").to(torch.bfloat16)
    assert max(old.sizes) >= CFG.vocab_size * CFG.hidden_size


def test_random_weights_read_only_the_asked_slice_deterministically():
    w = RandomWeights(CFG, dtype=torch.float32, seed=3)
    name = "model.layers.1.mlp.gate_proj.weight"
    full = w.read(name)
    half = w.read(name, 0, 1, 2)
    assert full.shape == (CFG.intermediate_size, CFG.hidden_size) and half.shape == (CFG.intermediate_size // 2,
                                                                                        CFG.hidden_size)
    assert torch.equal(half, w.read(name, 0, 1, 2)) and not torch.equal(half, w.read(name, 0, 0, 2))
    model = TPModel(CFG, w, Comm(), dtype=torch.bfloat16)
    ids = torch.arange(6)
    logits = model.forward(ids, ids, attention.AttentionMeta([6]))
    assert logits.shape == (6, CFG.vocab_size) and torch.isfinite(logits).all()


# --- distributed set-up ------------------------------------------------------------------------------


def test_init_distributed_binds_the_local_gpu_before_the_process_group(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(comm_mod.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(comm_mod.dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(comm_mod, "DistComm", lambda: "comm")
    assert init_distributed(5, 8, "file:///nowhere") == "comm"
    assert calls == [("set_device", 1), ("init", "nccl")]  # rank 5 of 4 visible GPUs: GPU 1, bound first
    calls.clear()
    init_distributed(5, 8, "file:///nowhere", backend="gloo", local_rank=0)
    assert calls == [("set_device", 0), ("init", "gloo")]


# --- attention ----------------------------------------------------------------------------------------


def _naive(q, k, v, mask):
    """float64 softmax attention, K/V heads repeated per query head. q (B, nh, n, hd), mask (B|1, 1, n, L)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    return (s.masked_fill(~mask, float("-inf")).softmax(-1) @ v.double()).float()


def test_grouped_decode_and_causal_prefill_equal_plain_attention():
    g = torch.Generator().manual_seed(0)
    D, nh, nkv, L, hd = 3, 8, 2, 11, 16
    q = torch.randn(D, nh, hd, generator=g)
    k, v = torch.randn(D, L, nkv, hd, generator=g), torch.randn(D, L, nkv, hd, generator=g)
    mask = torch.zeros(D, 1, 1, L, dtype=torch.bool)
    for d, n in enumerate((11, 4, 7)):
        mask[d, ..., :n] = True
    got = attention._decode(q, k, v, mask)
    want = _naive(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), mask)[:, :, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for n, total in ((9, 9), (3, 9)):  # whole sequence new (is_causal), and new rows after a context
        q2 = torch.randn(n, nh, hd, generator=g)
        k2, v2 = torch.randn(total, nkv, hd, generator=g), torch.randn(total, nkv, hd, generator=g)
        causal = torch.ones(n, total, dtype=torch.bool).tril(total - n)[None, None]
        want = _naive(q2.transpose(0, 1)[None], k2.transpose(0, 1)[None], v2.transpose(0, 1)[None], causal)[0]
        torch.testing.assert_close(attention._causal(q2, k2, v2), want.transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_attention_runs_on_a_fused_kernel_not_only_math():
    """SDPA's fused kernels take 4-D inputs only; a 3-D call silently falls to the math backend
    (full score matrices). Run with the math backend disabled: on CPU the fused one is flash."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    mask = torch.arange(9)[None, None, None, :] < torch.tensor([9, 3])[:, None, None, None]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        assert attention._decode(r(2, 8, 16), r(2, 9, 2, 16), r(2, 9, 2, 16), mask).shape == (2, 8, 16)
        assert attention._causal(r(5, 8, 16), r(5, 2, 16), r(5, 2, 16)).shape == (5, 8, 16)
