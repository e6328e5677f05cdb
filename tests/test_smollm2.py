"""The embedded default model, SmolLM2-135M-Instruct converted from GGUF, against HF transformers
(+ PEFT for the demo adapters): logits at TP=1 and TP=3, greedy chat generations, the chat
prompt as the served tokenizer renders it."""

from __future__ import annotations

import json

import pytest
import torch

from bdlora_ray.comm import Comm
from bdlora_ray.config import LlamaConfig
from bdlora_ray.engine import EngineConfig
from bdlora_ray.request import GenerationRequest, SamplingParams
from bdlora_ray.tokenizer import load_tokenizer
from deploy.serving import GroupServer, PromptInput
from engine_harness import local_engine, run_to_completion, tokens
from tp_harness import Job, run, spawn_tp

pytestmark = pytest.mark.slow  # a real 135M model: seconds per load and per generation on CPU

# Logits reach ~40 in magnitude after 30 layers; float32 sums in another order differ by ~1e-4.
TOL = 1e-3
QUESTIONS = ("What is the capital of France?", "Name a colour of the rainbow.")


def chat_ids(tok, question: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False))


class _TokenizerOnly:
    """The part of a group `GroupServer.prepare` reads."""

    def __init__(self, tok, max_model_len: int = 1024) -> None:
        self.tokenizer, self.max_model_len = tok, max_model_len


@pytest.fixture(scope="module")
def hf(smollm2):
    """HF transformers' model of the converted checkpoint (PEFT adapters are added to it by name)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


def test_converted_checkpoint_is_a_plain_hf_llama(smollm2):
    from transformers import LlamaForCausalLM

    hf_cfg = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in hf_cfg and hf_cfg["architectures"] == ["LlamaForCausalLM"]
    model, info = LlamaForCausalLM.from_pretrained(smollm2, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, stored once
    cfg = LlamaConfig.from_json(smollm2)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (576, 30, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.name == "SmolLM2-135M-Instruct"
    cfg.check_tp(3)
    tok = load_tokenizer(smollm2)
    assert tok.convert_ids_to_tokens(list(cfg.eos_token_id)) == ["<|im_end|>"]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nhi<|im_end|>\n"
                                                                     "<|im_start|>assistant\n")


def test_chat_prompt_is_the_templates_token_ids(smollm2):
    tok = load_tokenizer(smollm2)
    server = GroupServer(_TokenizerOnly(tok))
    messages = (("system", "Réponds brièvement."), ("user", "Quelle est la capitale de la France ? 🇫🇷"))
    req = server.prepare(PromptInput("r", None, SamplingParams(max_tokens=4), messages=messages))
    expected = tok.apply_chat_template([{"role": r, "content": c} for r, c in messages], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    assert list(req.prompt_ids) == list(expected)
    assert tok.decode(req.prompt_ids).endswith("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def prompts(smollm2):
    tok = load_tokenizer(smollm2)
    return [chat_ids(tok, q) for q in QUESTIONS]


def test_logits_at_tp1_and_tp3_equal_hf(smollm2, hf, prompts):
    cfg = LlamaConfig.from_json(smollm2)
    job = Job(cfg, str(smollm2), {}, [(None, p) for p in prompts])
    with torch.no_grad():
        refs = [hf(torch.tensor([p])).logits[0] for p in prompts]
    out1, _ = run(job, Comm())
    ranks = spawn_tp(job, world=3)
    for i, ref in enumerate(refs):
        assert (out1[f"single.{i}"] - ref).abs().max().item() <= TOL
        for out3, _ in ranks:
            assert (out3[f"single.{i}"] - ref).abs().max().item() <= TOL, f"TP=3 prompt {i}"


def test_greedy_chat_generation_equals_hf_generate(smollm2, hf, prompts):
    """Through the engine (EOS from the checkpoint: <|im_end|> ends the answer) as HF `generate`."""
    cfg = LlamaConfig.from_json(smollm2)
    engine = local_engine(cfg, smollm2, {}, EngineConfig(num_pages=256, max_model_len=256))
    n = 12
    reqs = [GenerationRequest(f"q{i}", tuple(p), None, SamplingParams(max_tokens=n, temperature=0.0))
            for i, p in enumerate(prompts)]
    outs = run_to_completion(engine, reqs, timeout_s=1200)  # a crowded CPU runs it slowly
    tok = engine.tokenizer
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                              attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist()
        ref = ref[:ref.index(2) + 1] if 2 in ref else ref  # HF stops after <|im_end|> too
        got = tokens(outs[f"q{i}"])
        assert got == ref, (tok.decode(got), tok.decode(ref))
    assert "Paris" in "".join(o.text for o in outs["q0"])


# ---- the demo adapters (deploy/demo_adapters/, trained by deploy.train_demo) ----------------------

from deploy.train_demo import ADAPTERS_DIR, DEMO_SPECS  # noqa: E402


def adapter_dir(name: str) -> str:
    return str(ADAPTERS_DIR / name)


def test_every_demo_adapter_is_shipped_small_and_in_bf16():
    from peft import LoraConfig
    from safetensors import safe_open

    total = 0
    for spec in DEMO_SPECS:
        d = ADAPTERS_DIR / spec.name
        cfg = LoraConfig.from_pretrained(str(d))
        assert cfg.r == spec.rank <= 8 and set(cfg.target_modules) == set(spec.targets)
        assert (cfg.use_bdlora is not None) == (spec.nblocks is not None)
        if spec.nblocks is not None:
            assert cfg.use_bdlora.nblocks == spec.nblocks == 3  # TP=3
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        total += (d / "adapter_model.safetensors").stat().st_size
    # An ordinary LoRA of rank 8 served replicated, one of rank 6 served slora (the tests also serve it
    # replicated), a BD-LoRA served bd.
    assert {s.mode for s in DEMO_SPECS} == {"replicated", "slora", "bd"}
    assert all(s.rank % 3 == 0 for s in DEMO_SPECS if s.mode != "replicated")
    assert total < 8 << 20


def _tp_modes(spec, tp: int) -> list[str]:
    """Every way the adapter can be served at this TP degree."""
    if spec.nblocks is None:  # slora splits the rank across the ranks
        return ["replicated", "slora"] if spec.rank % tp == 0 else ["replicated"]
    return ["bd", "replicated"] if spec.nblocks == tp else ["replicated"]


@pytest.fixture(scope="module")
def hf_peft(hf):
    """The HF model with every demo adapter loaded by PEFT, switched by name."""
    from peft import PeftModel

    first, *rest = DEMO_SPECS
    model = PeftModel.from_pretrained(hf, adapter_dir(first.name), adapter_name=first.name)
    for spec in rest:
        model.load_adapter(adapter_dir(spec.name), adapter_name=spec.name)
    return model.eval()


def test_logits_with_each_demo_adapter_equal_hf_peft(smollm2, hf_peft, prompts):
    cfg = LlamaConfig.from_json(smollm2)
    refs = {}
    with torch.no_grad():
        for spec in DEMO_SPECS:
            hf_peft.set_adapter(spec.name)
            refs[spec.name] = hf_peft(torch.tensor([prompts[0]])).logits[0]
        with hf_peft.disable_adapter():
            base = hf_peft(torch.tensor([prompts[0]])).logits[0]
    for tp in (1, 3):
        slots = {f"{s.name}:{m}": (adapter_dir(s.name), m) for s in DEMO_SPECS for m in _tp_modes(s, tp)}
        job = Job(cfg, str(smollm2), slots, [(slot, prompts[0]) for slot in slots])
        outs = [run(job, Comm())[0]] if tp == 1 else [o for o, _ in spawn_tp(job, world=3)]
        for out in outs:
            for i, slot in enumerate(slots):
                ref = refs[slot.split(":")[0]]
                assert (out[f"single.{i}"] - ref).abs().max().item() <= TOL, f"TP={tp} {slot}"
                assert (ref - base).abs().max().item() > 100 * TOL  # the adapter changes the logits


def _answers(smollm2, questions, max_tokens: int) -> dict[str | None, list]:
    """Greedy chat answers of the base model and of every demo adapter, all in one engine batch."""
    cfg = LlamaConfig.from_json(smollm2)
    adapters = {s.name: (adapter_dir(s.name), _tp_modes(s, 1)[0]) for s in DEMO_SPECS}
    engine = local_engine(cfg, smollm2, adapters, EngineConfig(num_pages=512, max_model_len=256))
    tok = engine.tokenizer
    reqs = [GenerationRequest(f"{a}|{i}", tuple(chat_ids(tok, q)), a, SamplingParams(max_tokens=max_tokens,
                                                                                     temperature=0.0))
            for a in (None, *adapters) for i, q in enumerate(questions)]
    outs = run_to_completion(engine, reqs, timeout_s=1200)  # a crowded CPU runs it slowly
    return {a: [outs[f"{a}|{i}"] for i in range(len(questions))] for a in (None, *adapters)}


def test_greedy_generation_with_each_demo_adapter_equals_hf_peft_generate(smollm2, hf_peft):
    tok = load_tokenizer(smollm2)
    n = 8
    got = _answers(smollm2, QUESTIONS[:1], max_tokens=n)
    prompt = chat_ids(tok, QUESTIONS[0])
    for spec in DEMO_SPECS:
        hf_peft.set_adapter(spec.name)
        with torch.no_grad():
            ref = hf_peft.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                   attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):]
        ref = ref.tolist()
        ref = ref[:ref.index(2) + 1] if 2 in ref else ref
        assert tokens(got[spec.name][0]) == ref, (spec.name, tok.decode(tokens(got[spec.name][0])), tok.decode(ref))


def test_make_run_pushes_the_demo_adapters_in_their_modes(smollm2, s3_server):
    from bdlora_ray.store.s3 import AdapterBucket
    from deploy.seed import seed_trained_adapters

    uri = f"s3://{s3_server.create_bucket('smollm2-demo')}/adapters"
    names = seed_trained_adapters(smollm2, uri, tp=3)
    assert names == [s.name for s in DEMO_SPECS]
    infos = {i.name: i for i in AdapterBucket(uri).catalog()}
    assert {n: (i.mode, i.tp, i.error) for n, i in infos.items()} == {s.name: (s.mode, 3, None) for s in DEMO_SPECS}
