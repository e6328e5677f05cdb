"""OpenAI / vLLM API parity, driven by the official `openai` client: logprobs, n, penalties,
logit_bias, min_tokens, structured output, prompt lists, `base:adapter` ids, GET /v1/models/{id}
and vLLM's load/unload_lora_adapter.

The API runs in process over a real engine (tiny random Llama at TP=1, its loop on a thread)
behind `GroupServer`, so the whole path from the client to the sampler runs without Ray.
"""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from bdlora_ray.config import LlamaConfig
from bdlora_ray.group import EngineGroup
from bdlora_ray.tokenizer import make_byte_tokenizer, save_byte_tokenizer
from deploy.api import make_api
from deploy.config import ApiConfig
from deploy.routing import LocalRouter
from deploy.serving import GroupServer
from engine_harness import local_engine
from reference import hf_logits, make_adapter, make_checkpoint

CFG = LlamaConfig.from_name("tiny")
BASE = "tiny-llama"
TOKEN = "admin-secret"
EOS = 2


class InProcessGroup:
    """EngineGroup's serving interface over an engine in this process (its loop on a thread, TP=1, no
    Ray): EngineGroup's own request path, without the TP workers and the adapter store."""

    generate = EngineGroup.generate
    abort = EngineGroup.abort
    load_adapter = EngineGroup.load_adapter
    _deliver = EngineGroup._deliver

    def __init__(self, ckpt, adapters: dict) -> None:
        self.adapters, self.deliveries = adapters, 0
        self.engine = local_engine(CFG, ckpt, adapters, deliver=self._deliver)
        self.tokenizer, self.model_name = self.engine.tokenizer, BASE
        self.max_model_len = self.engine.config.max_model_len

    async def unload_adapter(self, name: str) -> None:
        await asyncio.wrap_future(self.engine.unload(name))

    def resident_adapters(self) -> list[str]:
        return list(self.engine.stats().get("resident_adapters", ()))

    async def list_adapters(self) -> list[dict]:
        return [{"name": n, "rank": 4, "mode": mode, "tp": 1} for n, (_, mode) in sorted(self.adapters.items())]

    async def stats(self) -> dict:
        return self.engine.stats()

    async def pool_usage(self) -> list[dict]:
        return [self.engine.stats()["pool"]]

    async def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        self.engine.stop()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    ckpt = make_checkpoint(CFG, d / "tiny")
    save_byte_tokenizer(ckpt)
    adapters = {"small": (str(make_adapter(ckpt, d / "small", rank=4, targets=["q_proj", "v_proj"], seed=21)),
                          "replicated"),
                "bd": (str(make_adapter(ckpt, d / "bd", rank=8, nblocks=1, seed=22)), "bd")}
    group = InProcessGroup(ckpt, adapters)
    engine = group.engine
    engine.start()
    http = TestClient(make_api(LocalRouter([GroupServer(group)]), ApiConfig(model_name=BASE, admin_token=TOKEN)),
                      raise_server_exceptions=False)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
    yield client, ckpt, adapters, engine
    engine.stop()


def _chat(client, model, content="hi", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def test_chat_and_completion_logprobs(api):
    client, ckpt, adapters, _ = api
    ids = make_byte_tokenizer().apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=False)
    for model, adapter in ((BASE, None), ("small", adapters["small"][0])):
        r = _chat(client, model, max_tokens=5, temperature=0, logprobs=True, top_logprobs=4)
        content = r.choices[0].logprobs.content
        assert len(content) == r.usage.completion_tokens == 5
        assert "".join(c.token for c in content) == r.choices[0].message.content
        for c in content:  # greedy: the chosen token is the most likely one
            assert len(c.top_logprobs) == 4 and c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-6)
            assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
            assert c.bytes == list(c.token.encode())
        ref = torch.log_softmax(hf_logits(ckpt, torch.tensor(ids), adapter)[-1], -1).topk(4).values
        assert max(abs(a.logprob - b) for a, b in zip(content[0].top_logprobs, ref.tolist())) < 1e-4
    chunks = list(_chat(client, "small", max_tokens=5, temperature=0, logprobs=True, top_logprobs=4, stream=True))
    streamed = [c for ch in chunks for choice in ch.choices if choice.logprobs for c in choice.logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)
    plain = _chat(client, BASE, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None
    c = client.completions.create(model="bd", prompt="abc", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == c.choices[0].text and lp.text_offset[0] == 0
    assert all(len(t) <= 2 for t in lp.top_logprobs)  # two alternatives (fewer if two share a text)
    with pytest.raises(openai.BadRequestError):
        _chat(client, BASE, top_logprobs=2)  # without logprobs: true


def test_n_choices_reproduce_with_a_seed_and_differ_from_each_other(api):
    client = api[0]

    def run(model):
        r = client.completions.create(model=model, prompt="hello", n=3, seed=11, temperature=1.0, max_tokens=6,
                                      logprobs=0)
        assert [ch.index for ch in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 18
        assert r.usage.prompt_tokens == 5  # one prompt, counted once
        return [(ch.text, tuple(ch.logprobs.token_logprobs)) for ch in r.choices]

    with ThreadPoolExecutor(2) as pool:  # base and adapter choices in the engine's batches together
        first = list(pool.map(run, [BASE, "small"]))
    # Batches differ between runs (float sums in another order): the same tokens, logprobs within 1e-4.
    for before, after in zip(first, [run(BASE), run("small")]):
        assert [t for t, _ in before] == [t for t, _ in after]
        assert [lp for _, lps in before for lp in lps] == pytest.approx([lp for _, lps in after for lp in lps],
                                                                        abs=1e-4)
        assert len({lps for _, lps in before}) == 3  # three different samples
    chat = [_chat(client, "bd", n=2, seed=3, temperature=1.0, max_tokens=4) for _ in range(2)]
    assert [c.message.content for c in chat[0].choices] == [c.message.content for c in chat[1].choices]
    # A stream with n=2 carries both choices, by index, and ends with one usage chunk.
    chunks = list(_chat(client, "bd", n=2, seed=3, temperature=1.0, max_tokens=4, stream=True,
                        stream_options={"include_usage": True}))
    text = {0: "", 1: ""}
    for ch in chunks[:-1]:
        for choice in ch.choices:
            text[choice.index] += choice.delta.content or ""
    assert [text[0], text[1]] == [c.message.content for c in chat[0].choices]
    assert chunks[-1].usage.completion_tokens == 8


def test_penalties_bias_and_min_tokens_through_the_client(api):
    client, ckpt, adapters, _ = api
    from transformers import LlamaForCausalLM

    prompt = [39] * 6  # the tiny model repeats itself after this: the penalty has work to do
    model = LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, repetition_penalty=2.0,
                        attention_mask=torch.ones(1, 6, dtype=torch.long))[0, 6:].tolist()
    r = client.completions.create(model=BASE, prompt=prompt, max_tokens=10, temperature=0, logprobs=0,
                                  extra_body={"repetition_penalty": 2.0, "ignore_eos": True})
    tok = make_byte_tokenizer()
    assert r.choices[0].logprobs.tokens == [tok.decode([t]) for t in hf]
    plain = client.completions.create(model=BASE, prompt=prompt, max_tokens=10, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True})
    assert plain.choices[0].logprobs.token_logprobs != r.choices[0].logprobs.token_logprobs
    pen = client.completions.create(model="small", prompt=prompt, max_tokens=10, temperature=0, logprobs=0,
                                    frequency_penalty=2.0, presence_penalty=2.0)
    assert pen.choices[0].logprobs.token_logprobs != client.completions.create(
        model="small", prompt=prompt, max_tokens=10, temperature=0, logprobs=0).choices[0].logprobs.token_logprobs
    # EOS made certain by logit_bias, held back for min_tokens: exactly 3 tokens, then EOS.
    for m in (BASE, "bd"):
        r = client.completions.create(model=m, prompt="x", max_tokens=10, logit_bias={str(EOS): 100}, logprobs=0,
                                      extra_body={"min_tokens": 3})
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 4
        lp = r.choices[0].logprobs  # EOS has its logprob, and no text (as in the completion's text)
        assert len(lp.tokens) == 4 and lp.tokens[-1] == "" and "".join(lp.tokens) == r.choices[0].text
    # The greedy token banned by logit_bias: the next best comes instead (its raw logprob is lower).
    greedy_id = int(hf_logits(ckpt, torch.tensor(prompt))[-1].argmax())
    first = client.completions.create(model=BASE, prompt=prompt, max_tokens=1, temperature=0, logprobs=0)
    banned = client.completions.create(model=BASE, prompt=prompt, max_tokens=1, temperature=0, logprobs=0,
                                       logit_bias={str(greedy_id): -100})
    assert banned.choices[0].logprobs.token_logprobs[0] < first.choices[0].logprobs.token_logprobs[0]


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "size", "coastal"],
          "properties": {"city": {"enum": ["Oslo", "Lima", "Pune"]},
                         "size": {"type": "integer", "minimum": 1, "maximum": 999}, "coastal": {"type": "boolean"}}}


def test_structured_output_validates_for_base_and_adapter_rows_greedy_and_sampled(api):
    client = api[0]
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}

    def run(args):
        model, temperature, seed = args
        return _chat(client, model, max_tokens=80, temperature=temperature, seed=seed, response_format=fmt)

    cases = [(m, t, s) for m in (BASE, "small", f"{BASE}:bd") for t, s in ((0, None), (1.0, 5), (1.0, 6))]
    with ThreadPoolExecutor(4) as pool:  # rows of several requests in the same engine steps
        results = list(pool.map(run, cases))
    for args, r in zip(cases, results):
        assert r.choices[0].finish_reason == "stop", (args, r.choices[0].message.content)
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    assert len({r.choices[0].message.content for r in results}) > 1
    obj = _chat(client, "small", max_tokens=120, response_format={"type": "json_object"}, temperature=0)
    assert obj.choices[0].message.content.startswith("{")
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    rx = client.completions.create(model="bd", prompt="p", max_tokens=12, seed=1,
                                   extra_body={"guided_regex": "(cat|dog)s? [0-9]{3}"})
    assert re.fullmatch("(cat|dog)s? [0-9]{3}", rx.choices[0].text)
    with pytest.raises(openai.BadRequestError):
        _chat(client, BASE, response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                                  "schema": {"type": "nope"}}})


def test_prompt_lists_aliases_and_model_cards(api):
    client = api[0]
    r = client.completions.create(model="small", prompt=["ab", "cde"], n=2, max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    alone = [client.completions.create(model="small", prompt=p, max_tokens=3, temperature=0).choices[0].text
             for p in ("ab", "cde")]
    assert [c.text for c in r.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12
    ids = client.completions.create(model="small", prompt=[[97, 98], [99, 100, 101]], max_tokens=3, temperature=0)
    assert len(ids.choices) == 2
    alias = client.completions.create(model=f"{BASE}:small", prompt="ab", max_tokens=3, temperature=0)
    assert alias.choices[0].text == alone[0] and alias.model == f"{BASE}:small"
    echo = client.completions.create(model="small", prompt="ab", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text == "ab" + alone[0]
    assert client.models.retrieve(BASE).id == BASE
    card = client.models.retrieve("bd")
    assert card.id == "bd" and card.owned_by == "bdlora" and card.model_extra["parent"] == BASE
    assert client.models.retrieve(f"{BASE}:small").model_extra["mode"] == "replicated"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing")
    with pytest.raises(openai.BadRequestError):
        client.models.retrieve("../etc")


def test_vllm_lora_adapter_endpoints_need_the_admin_token(api):
    client, _, _, engine = api
    admin = client.with_options(api_key=TOKEN)
    with pytest.raises(openai.AuthenticationError):
        client.post("/load_lora_adapter", body={"lora_name": "bd"}, cast_to=str)
    assert "added" in admin.post("/load_lora_adapter", body={"lora_name": "bd"}, cast_to=str)
    assert "bd" in engine._prefetched or "bd" in engine.pool  # its shards are on the host (or in the pool)
    with pytest.raises(openai.BadRequestError):
        admin.post("/load_lora_adapter", body={"lora_name": "bd", "lora_path": "/etc/passwd"}, cast_to=str)
    with pytest.raises(openai.NotFoundError):
        admin.post("/load_lora_adapter", body={"lora_name": "nope"}, cast_to=str)
    client.completions.create(model="bd", prompt="x", max_tokens=2)  # now in the pool
    assert "removed" in admin.post("/unload_lora_adapter", body={"lora_name": f"{BASE}:bd"}, cast_to=str)
    assert "bd" not in engine.pool
    with pytest.raises(openai.AuthenticationError):
        client.post("/unload_lora_adapter", body={"lora_name": "bd"}, cast_to=str)
