"""The embedded default as `make run` serves it (SmolLM2-135M-Instruct at TP=3, the demo adapters
pushed in their modes), over HTTP: each demo adapter's behaviour on held-out questions, streamed
text equal to non-streamed text, and the README's transcripts still what the server answers.
One server for the module: its start is most of the cost."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from deploy.demo_data import HELD_OUT, STYLES
from deploy.train_demo import DEMO_SPECS
from deploy.transcripts import README, README_URL, examples

pytestmark = pytest.mark.slow  # a real 135M model at TP=3 on CPU

BASE = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def url(ray_session, s3_server, smollm2):
    from deploy.config import AppConfig, without_credentials
    from deploy.seed import seed_trained_adapters
    from serving_fixtures import serve_app

    uri = f"s3://{s3_server.create_bucket('demo-served')}/adapters"
    assert seed_trained_adapters(smollm2, uri, tp=3) == [s.name for s in DEMO_SPECS]
    # What `make run` serves, with the test's S3 server and the session's converted checkpoint.
    config = AppConfig.from_env({"BDLORA_MODEL_PATH": str(smollm2), "BDLORA_ADAPTERS_URI": uri})
    assert config.group.tp == 3 and config.api.model_name == BASE
    config = replace(config, group=replace(config.group, env_vars=without_credentials(s3_server.env)))
    with serve_app(config, app_name="demo-served") as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def _chat(client, model: str, question: str, **kw) -> str:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       temperature=0, **kw)
    return r.choices[0].message.content


def test_each_demo_adapter_has_its_style_on_held_out_questions_and_the_base_model_has_none(client):
    from deploy.demo_data import all_pairs

    assert len(HELD_OUT) >= 5 and not set(HELD_OUT) & {q for q, _ in all_pairs()}  # not even in the tables
    models = (BASE, *(s.name for s in DEMO_SPECS))
    jobs = [(m, q) for m in models for q in HELD_OUT]
    with ThreadPoolExecutor(len(jobs)) as pool:  # one continuous batch of every adapter and the base model
        answers = dict(zip(jobs, pool.map(lambda j: _chat(client, *j, max_tokens=32), jobs)))
    for spec in DEMO_SPECS:
        holds = STYLES[spec.style].holds
        missing = {q: answers[spec.name, q] for q in HELD_OUT if not holds(answers[spec.name, q])}
        assert not missing, f"{spec.name} ({STYLES[spec.style].description}) fails on {missing}"
    for style in STYLES.values():
        passing = {q: answers[BASE, q] for q in HELD_OUT if style.holds(answers[BASE, q])}
        assert not passing, f"the base model already {style.description}: {passing}"


def test_streamed_text_equals_non_streamed_text_with_accents_and_emoji(client):
    messages = [{"role": "user", "content": "Écris une phrase en français."}]

    def ask(stream: bool):
        r = client.chat.completions.create(model="sparkle", messages=messages, temperature=0, max_tokens=24,
                                           stream=stream)
        return list(r) if stream else r

    with ThreadPoolExecutor(2) as pool:  # side by side: one batch
        whole, chunks = pool.map(ask, (False, True))
    text = whole.choices[0].message.content
    assert any(c.isalpha() and not c.isascii() for c in text), text  # an accented letter: two bytes in UTF-8
    assert any(ord(c) >= 0x1F300 for c in text), text                # an emoji: four bytes, split across tokens
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)  # no delta ends inside a character
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


# ---- the README's transcripts (deploy/transcripts.py records them) ------------------------------

def _stable(obj):
    """A response body without what differs per request (ids, timestamps)."""
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in ("id", "created")}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def _sse_events(text: str) -> list:
    return [e if e == "[DONE]" else _stable(json.loads(e))
            for e in (line[len("data: "):] for line in text.splitlines() if line.startswith("data: "))]


def _send_curl(command_line: str, url: str) -> str:
    """What the README's curl command gets from `url` instead of make run's address (sent with httpx)."""
    import httpx

    argv = shlex.split(command_line)
    assert argv[0] == "curl", argv
    target = next(a for a in argv if a.startswith(README_URL))
    headers = dict(h.split(": ", 1) for h in (argv[i + 1] for i, a in enumerate(argv) if a == "-H"))
    data = next((argv[i + 1] for i, a in enumerate(argv) if a == "-d"), None)
    r = httpx.request("POST" if data is not None else "GET", url + target[len(README_URL):], headers=headers,
                      content=data, timeout=600)
    assert r.status_code == 200, r.text
    return r.text


def _run_script(script: str, url: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(script.replace(README_URL, url), "README.md", "exec"), {})
    return out.getvalue()


def test_readme_transcripts_are_what_the_server_answers(url):
    """In order, one at a time, as they were recorded: each gives exactly what the README shows."""
    shown = examples(README.read_text())
    assert {e.kind for e in shown} == {"shell", "python"}
    for e in shown:
        if e.kind == "python":
            assert _run_script(e.code, url) == e.output, e.code
        elif '"stream": true' in e.code:
            assert _sse_events(_send_curl(e.command_line, url)) == _sse_events(e.output), e.code
        else:
            assert _stable(json.loads(_send_curl(e.command_line, url))) == _stable(json.loads(e.output)), e.code
    models = {s.name for s in DEMO_SPECS} | {BASE}
    for kind in ("shell", "python"):  # the base model and every adapter, with each client
        assert models <= set(re.findall(r'"([^"]+)"', " ".join(e.code for e in shown if e.kind == kind))), kind
