"""The embedded default model, SmolLM2-135M-Instruct converted from GGUF, against HF transformers
(+ PEFT for the demo adapters): logits at TP=1 and TP=3, greedy chat generations, the chat
prompt as the served tokenizer renders it."""

from __future__ import annotations

import json
from pathlib import Path

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
