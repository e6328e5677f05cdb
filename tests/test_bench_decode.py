"""bench/decode.py runs end to end (tiny size): every scenario measured, the ratios computed from
those measurements, the table printing what the JSON holds."""

import argparse
import json
import math

import pytest


@pytest.mark.slow
def test_decode_bench_runs(tmp_path, capsys):
    from bench import decode as bench
    argv = ["--batch", "4", "--steps", "2", "--rank", "8", "--pages", "512", "--json", str(tmp_path / "decode.json")]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "decode.json").read_text())
    assert result["config"] | {"tp": 2, "batch": 4, "steps": 2, "rank": 8} == result["config"]

    rows = result["rows"]
    want = bench.scenarios(argparse.Namespace(batch=4))
    assert [(r["scenario"], r["mode"], r["adapters"]) for r in rows] == want
    assert {r["scenario"] for r in rows} >= {"no LoRA", "1 adapter (bd)", "4 adapters (bd)", "4 adapters slora",
                                             "4 adapters replicated"}
    rate = {r["scenario"]: r["tokens_per_s"] for r in rows}
    assert all(math.isfinite(v) and v > 0 for v in rate.values())

    # Every ratio is the quotient of the two measurements it names, and each adapter row has one.
    expected = {f"{s} / no LoRA": v / rate["no LoRA"] for s, v in rate.items() if s != "no LoRA"}
    expected["bd / slora (4 adapters)"] = rate["4 adapters (bd)"] / rate["4 adapters slora"]
    expected["bd / replicated (4 adapters)"] = rate["4 adapters (bd)"] / rate["4 adapters replicated"]
    assert result["ratios"] == pytest.approx(expected, rel=1e-12)

    # The printed table says what the JSON says: each scenario's rate, then each ratio, ratios last.
    out = capsys.readouterr().out.strip().splitlines()
    for s, v in rate.items():
        assert f"{s:<28} {v:>12.1f}" in out, s
    assert out[-len(expected):] == [f"{k:<34} {v:6.2f}x" for k, v in result["ratios"].items()]
    assert out[-1].startswith("bd / replicated")
