"""The layout as a newcomer reads it: the engine (bdlora_ray/) never imports the benchmarks or the
deployment, the store and `bdlora push` need no Ray, and configuring a deployment needs no Ray."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"bench", "deploy"}  # folders of the checkout that import the engine, never the reverse


def imported_modules(source: str) -> set[str]:
    """Every module a source names in an import statement or in an importlib.import_module/__import__
    call with a literal name (relative imports excluded: they stay inside the package)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")):
            names.add(node.args[0].value)
    return names


def test_import_scan_sees_every_form():
    src = ("import bench.compare\nfrom deploy import app\nimport importlib\n"
           "def f():\n    return importlib.import_module('bench.decode'), __import__('deploy.seed')\n"
           "from . import sibling\nfrom bdlora_ray.store import push\n")
    assert imported_modules(src) == {"bench.compare", "deploy", "importlib", "bench.decode", "deploy.seed",
                                     "bdlora_ray.store"}


def test_engine_never_imports_bench_or_deploy():
    offenders = {}
    for path in sorted((ROOT / "bdlora_ray").rglob("*.py")):
        bad = {m for m in imported_modules(path.read_text()) if m.split(".")[0] in FORBIDDEN}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, offenders


def _modules_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    """The modules loaded by a fresh interpreter after running `code`."""
    probe = code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"
    p = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return set(json.loads(p.stdout.strip().splitlines()[-1]))


def test_store_package_imports_without_ray():
    loaded = _modules_after("import bdlora_ray.store, bdlora_ray.cli\nfrom bdlora_ray.store import push_adapter")
    assert "ray" not in loaded and "bdlora_ray.store.actor" not in loaded
    # The actor's names are still the package's, loaded on first use.
    assert "ray" in _modules_after("from bdlora_ray.store import AdapterStoreActor")


def test_bdlora_push_does_not_load_ray(tmp_path, s3_server):
    """`bdlora push` end to end (convert, shard, upload to a real S3 API) in a fresh interpreter: no Ray."""
    from bdlora_ray.config import LlamaConfig
    from bdlora_ray.store.s3 import AdapterBucket
    from bdlora_ray.synthetic import random_adapter, write_peft_adapter

    cfg = LlamaConfig.from_name("tiny")
    peft = write_peft_adapter(random_adapter(cfg, 4, nblocks=2, seed=0, name="layout"), tmp_path / "layout")
    uri = f"s3://{s3_server.create_bucket('layout-push')}/adapters"
    code = (f"import sys\nfrom bdlora_ray.cli import main\n"
            f"assert main(['push', {str(peft)!r}, '{uri}/layout', '--tp', '2', '--base', 'tiny', '-q']) == 0")
    loaded = _modules_after(code, env={**os.environ, **s3_server.env})
    assert "ray" not in loaded
    assert [i.name for i in AdapterBucket(uri).catalog()] == ["layout"]


def test_deploy_config_computes_bundles_without_the_group_module():
    code = ("from deploy.config import AppConfig\n"
            "c = AppConfig.from_env({'BDLORA_TP': '3', 'BDLORA_WORKER_CPUS': '0.5', 'BDLORA_REPLICA_CPUS': '0.2'})\n"
            "assert c.group.bundles() == [{'CPU': 0.7}] + [{'CPU': 0.5}] * 2, c.group.bundles()\n"
            "g = AppConfig.from_env({'BDLORA_TP': '2', 'BDLORA_USE_GPU': '1'}).group.bundles()\n"
            "assert g == [{'GPU': 1, 'CPU': 1.1}, {'GPU': 1, 'CPU': 1}] and g[0] is not g[1], g\n"
            # One specification of a group: the deployment builds the very object the engine's group takes.
            "import deploy.config, bdlora_ray.spec\n"
            "assert type(c.group) is bdlora_ray.spec.GroupConfig and not hasattr(deploy.config, 'GroupSpec')\n")
    loaded = _modules_after(code)
    assert "bdlora_ray.group" not in loaded and "ray" not in loaded


@pytest.mark.parametrize("tp", [0, -1])
def test_group_bundles_refuse_a_bad_tp(tp):
    from bdlora_ray.placement import group_bundles

    with pytest.raises(ValueError, match="tp must be >= 1"):
        group_bundles(tp, False, 0.5)


# Paths a reader may follow: a file of one of the project's folders, or a top-level document.
_PATH_REF = re.compile(r"(?<![\w/.])((?:bdlora_ray|deploy|bench|kernels|tests|docs)/[\w/.-]*\w\.(?:py|md|yaml)"
                       r"|[A-Z][A-Z_]+\.md)\b")
_MD_LINK = re.compile(r"\]\(([^)#\s]+)\)")


def referenced_paths(text: str) -> set[str]:
    return set(_PATH_REF.findall(text))


def test_path_scan_finds_both_forms():
    # (the names are split so that this file itself names no missing file)
    assert referenced_paths("see deploy/con" "fig.py, (NOWHERE" ".md) and `bench/RESULTS.md`; not x/deploy/y.py") == {
        "deploy/config.py", "NOWHERE" ".md", "bench/RESULTS.md"}


def test_docs_and_docstrings_name_only_files_that_exist():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    sources = [ROOT / f for f in tracked.split() if f.endswith((".py", ".md", ".yaml", ".toml")) or f == "Makefile"]
    missing = {}
    for path in sources:
        if not path.is_file():
            continue  # deleted in the working tree, not yet in git's index
        text = path.read_text()
        refs = {ROOT / r for r in referenced_paths(text)}
        if path.suffix == ".md":  # links are relative to the document
            refs |= {path.parent / link for link in _MD_LINK.findall(text) if "://" not in link}
        gone = sorted(str(r.relative_to(ROOT)) if r.is_relative_to(ROOT) else str(r) for r in refs if not r.exists())
        if gone:
            missing[str(path.relative_to(ROOT))] = gone
    assert not missing, missing


def test_nothing_imports_kernels_by_a_top_level_name():
    """kernels/ is installed as `bdlora_ray.kernels`; a top-level `kernels` is Hugging Face's package."""
    offenders = {}
    for folder in ("bdlora_ray", "kernels", "deploy", "bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            bad = {m for m in imported_modules(path.read_text()) if m.split(".")[0] == "kernels"}
            if bad:
                offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, offenders


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_name(tmp_path):
    """Build the wheel from this checkout's packaging: its only import name is bdlora_ray (kernels
    inside it), every package folder of the engine is in it, and it imports from outside the checkout."""
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    for folder in ("bdlora_ray", "kernels", "deploy"):
        for path in (ROOT / folder).rglob("*.py"):
            dest = src / path.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(path.read_bytes())
    out = tmp_path / "wheel"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                        str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = out.glob("bdlora_ray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"bdlora_ray"}
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "bdlora_ray").rglob("__init__.py")}
    kernel_files = {f"bdlora_ray/kernels/{f.name}" for f in (ROOT / "kernels").glob("*.py")}
    assert {f"{p}/__init__.py" for p in packages} | kernel_files <= set(names)
    # Installed apart from the checkout, the engine finds its kernels inside itself.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import bdlora_ray.kernels as k, bdlora_ray.parallel; import sys; "
             "assert k.__file__.startswith(sys.argv[1]), k.__file__; "
             "assert 'kernels' not in sys.modules and 'deploy' not in sys.modules")
    p = subprocess.run([sys.executable, "-c", probe, str(site)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(site)})
    assert p.returncode == 0, p.stderr[-3000:]
