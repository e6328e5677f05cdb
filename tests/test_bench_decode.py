"""bench/decode.py runs end to end (tiny size) and reports every ratio."""

import json

import pytest


@pytest.mark.slow
def test_decode_bench_runs(tmp_path, capsys):
    from bench import decode as bench
    out = tmp_path / "decode.json"
    assert bench.main(["--batch", "4", "--steps", "2", "--rank", "8", "--pages", "512", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {r["scenario"] for r in result["rows"]} >= {"no LoRA", "1 adapter (bd)", "4 adapters (bd)",
                                                        "4 adapters slora", "4 adapters replicated"}
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    assert set(result["ratios"]) >= {"bd / slora (4 adapters)", "bd / replicated (4 adapters)"}
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("bd / replicated")
