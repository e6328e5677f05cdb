"""bench/gpu.py's dry run: the GPU check end to end on CPU at tiny shapes, so it cannot rot
before a GPU is there to run it."""

from __future__ import annotations

import json

import pytest

from bench import gpu


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    rc = gpu.main(["--dry-run", "--out", str(out)])
    return rc, json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


@pytest.mark.slow
def test_dry_run_writes_every_section_with_sane_content(report):
    rc, rep, md = report
    s = rep["sections"]
    assert list(s) == list(gpu.SECTIONS) and rep["meta"]["dry_run"]
    failed = {k: v.get("error") for k, v in s.items() if not v["ok"]}
    assert rc == 0 and not failed, failed
    assert all(v["seconds"] > 0 for v in s.values())

    assert s["kernel_tests"]["passed"] >= 1 and s["kernel_tests"]["failures"] == 0

    tp1 = s["model_tp1"]["rows"]
    assert {r["dtype"] for r in tp1} == {"float32", "bfloat16"} and len(tp1) == 10  # 5 cases x 2 dtypes
    for r in tp1:
        assert r["ok"] and 0 <= r["max_abs_err"] <= r["tol"]
        assert r["case"] == "base" or r["adapter_effect"] > 10 * gpu.DRY.model_tol_fp32
    assert all(r["hf_bf16_err"] > 0 for r in tp1 if r["dtype"] == "bfloat16")

    tp2 = s["model_tp2"]
    assert [r["case"] for r in tp2["rows"]] == list(gpu.TP2_CASES) and all(r["ok"] for r in tp2["rows"])
    assert tp2["rank1_got_logits"] is False and tp2["counts"][0]["gather"] == tp2["counts"][1]["gather"] > 0

    sweep = s["kernel_sweep"]["rows"]
    assert len(sweep) == 3 and not s["kernel_sweep"]["cut_short"]
    for r in sweep:
        assert r["agrees_with_torch_path"] and r["adapters"] <= r["T"]
        for k in ("shrink", "expand"):
            assert r[f"{k}_triton_us"] > 0 and r[f"{k}_torch_us"] > 0 and r[f"{k}_bmm_us"] > 0
            assert r[f"{k}_bytes"] > 0 and r[f"{k}_GBps"] == pytest.approx(r[f"{k}_bytes"] / r[f"{k}_triton_us"] / 1e3)
        assert r["base_gemm_us"] > 0

    dec = s["decode"]["rows"]
    assert [(r["batch"], r["adapters"]) for r in dec] == [(4, 0), (4, 2), (4, 0)]  # no LoRA first and last
    assert all(r["tokens_per_s"] > 0 for r in dec)
    assert max(dec[0]["vs_no_lora"], dec[2]["vs_no_lora"]) == 1.0 and min(dec[0]["vs_no_lora"], dec[2]["vs_no_lora"]) <= 1.0

    for i, name in enumerate(gpu.SECTIONS, 1):
        assert f"## {i}. {name}: ok" in md
    assert "| float32 | lora (slora) |" in md and "| 4 | 2 |" in md
    assert rep["projection"] and "## Projection: bd over slora at TP=8" in md  # estimates: no TP=8 8B rows here


def test_no_gpu_and_unknown_sections_are_refused(tmp_path, capsys):
    import torch

    if not torch.cuda.is_available():
        assert gpu.main(["--out", str(tmp_path)]) == 2  # the real check needs a GPU
    with pytest.raises(SystemExit):
        gpu.main(["--dry-run", "--out", str(tmp_path), "--sections", "nope"])


def test_one_failing_section_does_not_stop_the_others(tmp_path, monkeypatch):
    def broken(plan, work, deadline):
        raise RuntimeError("boom")

    monkeypatch.setitem(gpu.SECTIONS, "kernel_tests", broken)
    monkeypatch.setitem(gpu.SECTIONS, "model_tp1", lambda plan, work, deadline: {"ok": True, "rows": []})
    assert gpu.main(["--dry-run", "--out", str(tmp_path), "--sections", "kernel_tests,model_tp1"]) == 1
    rep = json.loads((tmp_path / "gpu.json").read_text())["sections"]
    assert not rep["kernel_tests"]["ok"] and "boom" in rep["kernel_tests"]["error"] and rep["model_tp1"]["ok"]
    assert "RuntimeError: boom" in (tmp_path / "gpu.md").read_text()


@pytest.mark.slow
def test_the_check_imports_no_ray_and_no_boto3():
    """The GPU machine has neither: everything the check runs must import without them."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('ray', 'boto3', 'botocore'): sys.modules[m] = None  # importing them now fails\n"
            "import bench.gpu, bench.projection, bench.kernels, kernels\n"
            "from bdlora_ray import engine, worker, tp, synthetic, memory\n")
    subprocess.run([sys.executable, "-c", code], cwd=gpu.ROOT, check=True)
