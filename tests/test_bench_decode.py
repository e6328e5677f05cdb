"""bench/decode.py runs end to end (tiny size): every scenario measured in every round, the ratios
the medians of per-round ratios of those measurements, the table printing what the JSON holds."""

import argparse
import json
import math
import statistics

import pytest


@pytest.mark.slow
def test_decode_bench_runs(tmp_path, capsys):
    from bench import decode as bench
    out = tmp_path / "decode.json"
    # 8 > batch: the resident-set path (all 8 loaded, 4 of them in the batch) runs too.
    assert bench.main(["--batch", "4", "--steps", "2", "--windows", "2", "--rank", "8", "--counts", "1,2,8",
                       "--rounds", "2", "--pages", "2048", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"] | {"tp": 2, "batch": 4, "steps": 2, "windows": 2, "rounds": 2, "rank": 8} == result["config"]

    want = [(s["scenario"], s["mode"], s["adapters"])
            for s in bench.scenarios(argparse.Namespace(batch=4, rank=8, counts=[1, 2, 8]))]
    assert [(r["scenario"], r["mode"], r["adapters"]) for r in result["rows"]] == want
    rows = {r["scenario"]: r for r in result["rows"]}
    assert set(rows) == {"no LoRA", "1 x r8 (bd)", "4 x r8 (bd)"} | {
        f"{n} mixed ({m})" for n in (1, 2, 8) for m in ("bd", "slora", "replicated")}
    assert all(len(r[k]) == 2 and all(math.isfinite(x) and x > 0 for x in r[k])
               for r in rows.values() for k in ("rounds", "cpu_rounds"))
    assert all(r["tokens_per_s"] == statistics.median(r["rounds"]) and 0 < r["flop_bound"] <= 1
               and r["cpu_tokens_per_s"] == statistics.median(r["cpu_rounds"]) for r in rows.values())
    assert rows["2 mixed (slora)"]["ranks"] == [8, 16] and rows["8 mixed (bd)"]["ranks"] == [8, 16, 32, 64]
    assert rows["no LoRA"]["flop_bound"] == 1
    assert rows["2 mixed (bd)"]["flop_bound"] < rows["1 mixed (bd)"]["flop_bound"] < 1  # rank 16 rows cost more

    # Every ratio is the median over rounds of the quotient of the two measurements of one round.
    def ratio(a: str, b: str, key: str = "rounds") -> float:
        return statistics.median(x / y for x, y in zip(rows[a][key], rows[b][key]))

    for s, r in rows.items():
        one = "no LoRA" if r["mode"] is None else ("1 x r8 (bd)" if " x r8" in s else f"1 mixed ({r['mode']})")
        assert r["vs_no_lora"] == pytest.approx(ratio(s, "no LoRA"), rel=1e-12), s
        assert r["vs_1_adapter"] == pytest.approx(ratio(s, one), rel=1e-12), s
        assert r["cpu_vs_no_lora"] == pytest.approx(ratio(s, "no LoRA", "cpu_rounds"), rel=1e-12), s
        assert r["cpu_vs_1_adapter"] == pytest.approx(ratio(s, one, "cpu_rounds"), rel=1e-12), s
        assert r["bound_vs_1_adapter"] == pytest.approx(r["flop_bound"] / rows[one]["flop_bound"], rel=1e-12), s
    assert result["acceptance"] == pytest.approx({
        "1 adapter / no LoRA (r8, bd)": ratio("1 x r8 (bd)", "no LoRA"),
        "4 adapters / 1 adapter (r8, bd)": ratio("4 x r8 (bd)", "1 x r8 (bd)"),
        "1 adapter / no LoRA (r8, bd), CPU": ratio("1 x r8 (bd)", "no LoRA", "cpu_rounds"),
        "4 adapters / 1 adapter (r8, bd), CPU": ratio("4 x r8 (bd)", "1 x r8 (bd)", "cpu_rounds")}, rel=1e-12)

    # The printed table says what the JSON says, the acceptance ratios last.
    printed = capsys.readouterr().out.strip().splitlines()
    for s, r in rows.items():
        assert any(line.startswith(f"{s:<24} {r['tokens_per_s']:>9.1f} {r['vs_no_lora']:>9.2f}x") for line in printed), s
    assert printed[-4:] == [f"{k:<45} {v:6.2f}x" for k, v in result["acceptance"].items()]
