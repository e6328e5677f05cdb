"""Per-request sampling parameters (bdlora_ray.sampling, bdlora_ray.guided) against HF's logits
processors and log_softmax, alone on random logits and through the engine with base and adapter
rows mixed in one batch."""

from __future__ import annotations

import functools
import json
from collections import Counter

import jsonschema
import pytest
import torch
from transformers.generation import logits_process as hf

from bdlora_ray.config import LlamaConfig
from bdlora_ray.errors import InvalidRequest
from bdlora_ray.request import GenerationRequest, SamplingParams, StructuredOutput
from bdlora_ray.sampling import _top_k_top_p, make_generator, process_logits, sample
from engine_harness import engine_files, local_engine, run_to_completion, tokens
from reference import hf_logits

CFG = LlamaConfig.from_name("tiny")
V = 97


def _history(g: torch.Generator, prompt: int, output: int) -> tuple[list[int], int]:
    return torch.randint(0, V, (prompt + output,), generator=g).tolist(), prompt


def test_logits_processing_equals_the_hf_processors_row_by_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, V, generator=g) * 3
    eos = [2, 5]
    rows = [  # (params, prompt length, output length)
        (SamplingParams(), 6, 4),
        (SamplingParams(repetition_penalty=1.3), 5, 9),
        (SamplingParams(repetition_penalty=0.7), 8, 3),
        (SamplingParams(logit_bias=((3, 5.0), (40, -7.5), (96, 100.0))), 4, 2),
        (SamplingParams(frequency_penalty=0.5, presence_penalty=0.8), 3, 20),
        (SamplingParams(min_tokens=4), 5, 2),    # too short: EOS held back
        (SamplingParams(min_tokens=2), 5, 3),    # long enough: untouched
    ]
    histories = [_history(g, p, o) for _, p, o in rows]
    x = process_logits(logits, [p for p, _, _ in rows], histories, stop_ids=eos)

    def ref(i: int, proc) -> torch.Tensor:
        return proc(torch.tensor([histories[i][0]]), logits[i:i + 1].clone())[0]

    assert torch.equal(x[0], logits[0]) and torch.equal(x[6], logits[6])
    torch.testing.assert_close(x[1], ref(1, hf.RepetitionPenaltyLogitsProcessor(1.3)), rtol=0, atol=1e-6)
    torch.testing.assert_close(x[2], ref(2, hf.RepetitionPenaltyLogitsProcessor(0.7)), rtol=0, atol=1e-6)
    bias = hf.SequenceBiasLogitsProcessor({(3,): 5.0, (40,): -7.5, (96,): 100.0})
    torch.testing.assert_close(x[3], ref(3, bias), rtol=0, atol=1e-5)
    min_new = hf.MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=5, min_new_tokens=4, eos_token_id=eos)
    assert torch.equal(x[5], ref(5, min_new)) and x[5, eos].eq(float("-inf")).all()
    # OpenAI's definition (HF has none): mu[j] - c[j] * frequency - (c[j] > 0) * presence, output tokens only.
    counts = Counter(histories[4][0][3:])
    want = logits[4].clone()
    for t, c in counts.items():
        want[t] -= 0.5 * c + 0.8
    torch.testing.assert_close(x[4], want, rtol=0, atol=1e-5)
    assert not torch.equal(x[4], logits[4])


def test_top_k_then_top_p_keep_what_the_hf_warpers_keep():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, V, generator=g) * 2
    cuts = [(0, 0.9), (7, 1.0), (7, 0.5), (1, 1.0), (50, 0.3)]
    ours = _top_k_top_p(x, [k for k, _ in cuts], [p for _, p in cuts])
    only_k = _top_k_top_p(x[1:], [k for k, _ in cuts[1:]], [p for _, p in cuts[1:]])  # top-k on every row
    assert torch.equal(only_k, ours[1:])
    for i, (k, p) in enumerate(cuts):
        ref = x[i:i + 1].clone()
        if k:
            ref = hf.TopKLogitsWarper(k)(None, ref)
        if p < 1.0:
            ref = hf.TopPLogitsWarper(p)(None, ref)
        assert torch.equal(torch.isfinite(ours[i]), torch.isfinite(ref[0])), i
        assert torch.equal(ours[i][torch.isfinite(ours[i])], x[i][torch.isfinite(ours[i])])


def test_batched_draws_follow_softmax_and_seeded_rows_reproduce_anywhere_in_the_batch():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    n = 4000
    params = [SamplingParams(temperature=0.8)] * n
    toks = sample(logits.expand(n, -1), params, [None] * n).tokens
    freq = torch.bincount(torch.tensor(toks), minlength=5).float() / n
    torch.testing.assert_close(freq, (logits / 0.8).softmax(-1), rtol=0, atol=0.03)
    seeded = SamplingParams(temperature=1.0, seed=99)
    mixed = [SamplingParams(temperature=0.0), seeded, SamplingParams(temperature=1.0)]
    first = [sample(logits.expand(3, -1), mixed, [make_generator(p) for p in mixed]).tokens[1]]
    gen = make_generator(seeded)
    alone = [sample(logits[None], [seeded], [gen]).tokens[0] for _ in range(10)]
    gen2 = make_generator(seeded)
    in_batch = [sample(logits.expand(3, -1), mixed, [None, gen2, None]).tokens[1] for _ in range(10)]
    assert alone == in_batch and alone[0] == first[0] and len(set(alone)) > 1


# ---- through the engine: base and adapter rows in one batch --------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return engine_files(tmp_path_factory.mktemp("sampling"), CFG)


@pytest.fixture(scope="module")
def engine(files):
    ckpt, adapters = files
    return local_engine(CFG, ckpt, adapters)


@functools.cache
def _hf_model(ckpt, adapter):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


class OpenAIPenalties(hf.LogitsProcessor):
    """OpenAI's frequency/presence penalties on the generated tokens (transformers has none)."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores).scatter_add_(1, input_ids[:, self.prompt_len:],
                                                       torch.ones_like(input_ids[:, self.prompt_len:], dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).float()


@torch.no_grad()
def _hf_generate(files, adapter, prompt, max_new, **kw) -> list[int]:
    ckpt, adapters = files
    model = _hf_model(ckpt, adapters[adapter][0] if adapter else None)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kw)
    new = out[0, len(prompt):].tolist()
    eos = model.config.eos_token_id
    return new[:new.index(eos) + 1] if eos in new else new


def _req(rid, prompt, adapter=None, **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    return GenerationRequest(rid, tuple(prompt), adapter, SamplingParams(**params))


def test_logprobs_equal_hf_log_softmax_for_base_and_adapter_rows_in_one_batch(files, engine):
    ckpt, adapters = files
    p = [11, 12, 13, 14, 15]
    reqs = [_req("base", p, None, max_tokens=6, logprobs=5), _req("small", p, "small", max_tokens=6, logprobs=3),
            _req("bd", p, "bd", max_tokens=6, logprobs=0, temperature=1.0, seed=4),
            _req("plain", p, "small", max_tokens=6)]
    outs = run_to_completion(engine, reqs)
    assert all(e.logprobs is None for e in outs["plain"])
    for r in reqs[:3]:
        out = tokens(outs[r.request_id])
        lps = [lp for e in outs[r.request_id] for lp in (e.logprobs or ())]
        assert [lp.token_id for lp in lps] == out and len(out) == 6
        ref = torch.log_softmax(hf_logits(ckpt, torch.tensor(p + out), adapters[r.adapter][0] if r.adapter else None),
                                -1)[len(p) - 1:-1]                                             # (6, vocab)
        k = r.params.logprobs
        for j, lp in enumerate(lps):
            assert abs(lp.logprob - float(ref[j, out[j]])) < 1e-4, (r.request_id, j)
            top_v, top_i = ref[j].topk(k) if k else (ref[j, :0], ref[j, :0].long())
            assert [t.token_id for t in lp.top] == top_i.tolist()
            assert max((abs(t.logprob - v) for t, v in zip(lp.top, top_v.tolist())), default=0) < 1e-4


@pytest.mark.slow
def test_penalties_bias_and_min_tokens_equal_hf_generate_in_one_mixed_batch(files, engine):
    p = [39] * 6  # the tiny model repeats itself after this prompt: each penalty has work to do
    eos = _hf_model(files[0], None).config.eos_token_id
    n = 14
    cases = {  # request -> (adapter, our parameters, HF generate's)
        "rep-base": (None, dict(repetition_penalty=2.0), dict(repetition_penalty=2.0)),
        "rep-small": ("small", dict(repetition_penalty=2.0), dict(repetition_penalty=2.0)),
        "freq-bd": ("bd", dict(frequency_penalty=1.5, presence_penalty=2.0),
                    dict(logits_processor=hf.LogitsProcessorList([OpenAIPenalties(len(p), 1.5, 2.0)]))),
        "bias-min-small": ("small", dict(logit_bias=((eos, 100.0),), min_tokens=3),
                           dict(sequence_bias={(eos,): 100.0}, min_new_tokens=3)),
        "greedy-bd": ("bd", {}, {}),
    }
    outs = run_to_completion(engine, [_req(rid, p, a, max_tokens=n, **ours) for rid, (a, ours, _) in cases.items()])
    for rid, (adapter, ours, theirs) in cases.items():
        assert tokens(outs[rid]) == _hf_generate(files, adapter, p, n, **theirs), rid
    assert tokens(outs["bias-min-small"])[-1] == eos and len(tokens(outs["bias-min-small"])) == 4
    plain = {a: _hf_generate(files, a, p, n) for a in (None, "small", "bd")}
    assert tokens(outs["rep-base"]) != plain[None] and tokens(outs["rep-small"]) != plain["small"]
    assert tokens(outs["freq-bd"]) != plain["bd"]  # each penalty changed something


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"enum": ["ann", "bob"]}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "ok": {"type": "boolean"}}}


def test_json_schema_outputs_validate_greedy_and_sampled_base_and_adapter_rows(files, engine):
    guide = StructuredOutput("json_schema", json.dumps(SCHEMA))
    p = [21, 22, 23]
    reqs = [_req(f"{a}-{t}-{s}", p, a, max_tokens=60, temperature=t, seed=s, guide=guide)
            for a in (None, "small", "bd") for t, s in ((0.0, None), (1.0, 1), (1.0, 2))]
    reqs += [_req("regex", p, "bd", max_tokens=20, temperature=1.0, seed=3,
                  guide=StructuredOutput("regex", "(yes|no)-[0-9]{2}")),
             _req("object", p, None, max_tokens=60, guide=StructuredOutput("json")),
             _req("free", p, "small", max_tokens=8)]
    outs = run_to_completion(engine, reqs)
    for r in reqs[:9]:
        text = "".join(e.text for e in outs[r.request_id])
        assert outs[r.request_id][-1].finish_reason == "stop", (r.request_id, text)
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({"".join(e.text for e in outs[r.request_id]) for r in reqs[:9]}) > 1
    import re
    assert re.fullmatch("(yes|no)-[0-9]{2}", "".join(e.text for e in outs["regex"]))
    obj = "".join(e.text for e in outs["object"])
    assert outs["object"][-1].finish_reason == "length" or isinstance(json.loads(obj), dict)
    assert obj.startswith("{")
    assert tokens(outs["free"]) == _hf_generate(files, "small", p, 8)  # a row without a grammar: untouched
    assert not engine._guides  # matchers leave with their requests


def _deep_schema(levels: int) -> str:
    return '{"type": "object", "properties": {"a": ' * levels + '{"type": "integer"}' + "}}" * levels


@pytest.mark.parametrize("guide", [StructuredOutput("json_schema", '{"type": "nonsense"}'),
                                   StructuredOutput("json_schema", "not json"), StructuredOutput("regex", "("),
                                   StructuredOutput("json_schema", _deep_schema(40))])
def test_unusable_grammars_fail_their_request_alone_with_a_400(engine, guide):
    outs = run_to_completion(engine, [_req("bad", [5, 6], max_tokens=4, guide=guide), _req("good", [5, 6], max_tokens=4)])
    assert outs["bad"][-1].finish_reason == "error" and outs["bad"][-1].error_type == "InvalidRequest"
    assert outs["bad"][-1].error_status == 400 and len(tokens(outs["good"])) == 4


def test_a_request_aborted_while_its_grammar_compiles_ends_at_once(engine):
    events = []
    engine.submit(_req("slow", [5, 6], max_tokens=4, guide=StructuredOutput("json_schema", _deep_schema(30))),
                  events.append)
    engine.abort("slow")
    while not events:
        engine.step() or engine.wait_for_work(0.05)
    assert [(e.finished, e.finish_reason) for e in events] == [(True, "abort")]
    engine.step()
    assert "slow" not in engine._seqs and not engine._compiling


def test_logit_bias_outside_the_vocabulary_is_refused(engine):
    with pytest.raises(InvalidRequest, match="logit_bias"):
        engine.submit(_req("bad", [5, 6], max_tokens=4, logit_bias=((CFG.vocab_size, 1.0),)), lambda _: None)
