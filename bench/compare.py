"""What every serving comparison shares: a local server, adapters pushed to it, reports, and the CLI.

    python -m bench {modes,scaling,peft,cold,tax} [options] [--json PATH] [--plot PATH]

`local_server` starts the whole system in this process's machine, as
`serve run deploy:app` would: a moto S3 server in a subprocess on
127.0.0.1, a tiny random Llama checkpoint (deploy.seed), adapters written as
PEFT directories and pushed with `bdlora push`'s own function (many at once,
one shared S3 client), a local Ray cluster, and the Serve app built by
`deploy.build_app` on 127.0.0.1:<free port>. Everything is shut down after.

Each comparison module (bench/modes.py, scaling.py, baseline_peft.py, tax.py,
cold.py) has NAME, add_arguments(parser), run(args) -> result dict and
report(result) -> lines: a markdown table, its ratio LAST, beside the
published anchor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
from tqdm import tqdm

from bdlora_ray.config import LlamaConfig
from deploy.local_s3 import LocalS3, free_port
from deploy.seed import TINY, DemoAdapter

log = logging.getLogger(__name__)

OUT_DIR = Path(__file__).parent / "out"
PLOT_DIR = Path(__file__).parent / "plots"
BUCKET = "bdlora-bench"
ADAPTERS_URI = f"s3://{BUCKET}/adapters"
APP_NAME = "bdlora-bench"
# Base models (random weights, byte tokenizer): `tiny` is the embedded default's; `small` has 16x the
# weights per layer, so that a forward pass is bound by reading weights as decoding on a GPU is.
MODELS: dict[str, LlamaConfig] = {
    "tiny": TINY,
    "small": TINY.with_(name="small", hidden_size=1024, intermediate_size=2816, num_layers=4, num_heads=16,
                        num_kv_heads=8, head_dim=64),
}

# A local throwaway cluster needs no auth token (and must not write one under ~/.ray).
_RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


@dataclass(frozen=True)
class ServerConfig:
    model: str = "tiny"                          # a name in MODELS
    tp: int = 2                                  # TP degree of the one replica group
    worker_cpus: float = 0.5                     # Ray CPUs per TP worker (one torch thread each)
    replica_cpus: float = 0.1
    ray_cpus: int = 2                            # CPUs of the local Ray cluster
    engine: tuple[tuple[str, Any], ...] = ()     # EngineConfig overrides, (field, value)
    push_workers: int = 8                        # parallel adapter uploads
    ray_temp_dir: str = "/tmp/bdlora-bench"
    front: str = "python"                        # Serve's HTTP front (deploy/cluster_env.py)
    ingress: str = "auto"                        # where the API runs (ApiConfig.ingress, deploy/app.py)
    startup_timeout_s: float = 300.0

    def engine_setting(self, name: str, default: Any) -> Any:
        return dict(self.engine).get(name, default)


@dataclass(frozen=True)
class Served:
    url: str                 # http://127.0.0.1:PORT
    base_model: str          # served name of the base model
    model_dir: Path          # the HF checkpoint (for HF/PEFT baselines)
    peft_dirs: dict[str, Path] = field(default_factory=dict)  # adapter name -> PEFT directory
    s3_env: dict[str, str] = field(default_factory=dict, repr=False)


@contextlib.contextmanager
def local_s3() -> Iterator[dict[str, str]]:
    """The local S3 server (deploy.local_s3) in a subprocess, its own GIL, so that it does not slow
    the client down; yields the AWS variables that point clients at it, set in os.environ meanwhile."""
    with LocalS3(in_process=False) as s3, mock.patch.dict(os.environ, s3.env):
        yield s3.env


def peft_dir(model_dir: Path, peft_root: Path, spec: DemoAdapter, tp: int) -> Path:
    """`spec` as a PEFT adapter directory of random weights (BD-LoRA with nblocks = tp if it is
    block-diagonal); kept if already written."""
    from bdlora_ray.config import LlamaConfig
    from bdlora_ray.synthetic import random_adapter, write_peft_adapter

    path = peft_root / spec.name
    if not (path / "adapter_config.json").is_file():
        cfg = LlamaConfig.from_json(model_dir)
        adapter = random_adapter(cfg, spec.rank, nblocks=tp if spec.block_diagonal else None, seed=spec.seed,
                                 name=spec.name)
        write_peft_adapter(adapter, path)
    return path


def write_files(workdir: Path, specs: Sequence[DemoAdapter], tp: int, model: str = "tiny"
                ) -> tuple[Path, dict[str, Path]]:
    """The checkpoint (deploy.seed) and every adapter's PEFT directory under `workdir` (kept if there)."""
    from deploy.seed import write_checkpoint

    model_dir = write_checkpoint(workdir / f"{model}-llama", MODELS[model])
    return model_dir, {a.name: peft_dir(model_dir, workdir / "peft", a, tp) for a in specs}


def push_adapters(model_dir: Path, peft_root: Path, specs: Sequence[DemoAdapter], tp: int, uri: str = ADAPTERS_URI,
                  workers: int = 8, progress: bool = True) -> dict[str, Path]:
    """Each adapter's PEFT directory (written if missing), pushed with `bdlora push`'s function,
    `workers` at a time over one S3 client (making a client costs more than uploading a tiny adapter)."""
    from bdlora_ray.store.push import push_adapter
    from bdlora_ray.store.s3 import AdapterBucket
    from deploy.seed import ensure_bucket

    ensure_bucket(uri)
    bucket = AdapterBucket(uri)

    def one(a: DemoAdapter) -> Path:
        path = peft_dir(model_dir, peft_root, a, tp)
        push_adapter(path, f"{uri.rstrip('/')}/{a.name}", tp, a.mode, str(model_dir), bucket=bucket)
        return path

    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(specs), desc="push adapters", unit="adapter",
                                                    disable=not progress, leave=False) as bar:
        dirs = {}
        for a, d in zip(specs, pool.map(one, specs)):
            dirs[a.name] = d
            bar.update(1)
    return dirs


@contextlib.contextmanager
def local_server(workdir: Path, adapters: Sequence[DemoAdapter], server: ServerConfig = ServerConfig(),
                 progress: bool = True) -> Iterator[Served]:
    """The whole system on 127.0.0.1 (see the module docstring); shut down on exit."""
    import ray
    from ray import serve

    from deploy import build_app
    from deploy.cluster_env import cluster_env
    from bdlora_ray.spec import EngineConfig, GroupConfig
    from deploy.config import ApiConfig, AppConfig, ScalingConfig, without_credentials
    for name in ("ray", "ray.serve", "werkzeug", "botocore", "urllib3", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with local_s3() as s3_env:
        model_dir, _ = write_files(workdir, (), server.tp, server.model)
        t = time.monotonic()
        peft_dirs = push_adapters(model_dir, workdir / "peft", adapters, server.tp, workers=server.push_workers,
                                  progress=progress)
        log.info("pushed %d adapters in %.1f s", len(adapters), time.monotonic() - t)
        spec = GroupConfig(model_path=str(model_dir), adapters_uri=ADAPTERS_URI, tp=server.tp,
                           worker_cpus=server.worker_cpus, replica_cpus=server.replica_cpus,
                           engine=EngineConfig.from_overrides(dict(server.engine)),
                           max_ongoing_requests=4096, env_vars=without_credentials(s3_env))
        config = AppConfig(group=spec, scaling=ScalingConfig(min_groups=1, max_groups=1),
                           api=ApiConfig(model_name=spec.served_name, ingress=server.ingress))
        port = free_port()
        with mock.patch.dict(os.environ, {**_RAY_ENV, **cluster_env(server.front)}):
            ray.init(address="local", num_cpus=server.ray_cpus, include_dashboard=False, log_to_driver=False,
                     _temp_dir=server.ray_temp_dir, _node_ip_address="127.0.0.1")
        try:
            t = time.monotonic()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(config), name=APP_NAME, route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, server.startup_timeout_s)
            log.info("server up on %s in %.1f s", url, time.monotonic() - t)
            yield Served(url, spec.served_name, model_dir, peft_dirs, s3_env)
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=10)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        time.sleep(0.5)  # another process's state: nothing to await
    raise TimeoutError(f"{url}/health not ready after {timeout_s:.0f}s ({last})")


def load_adapters(url: str, names: Sequence[str], concurrency: int = 8, timeout_s: float = 120.0,
                  progress: bool = True) -> None:
    """POST /v1/adapters for each name: fetched from S3 into host memory before a timed run, as
    S-LoRA keeps every adapter in host memory."""
    import asyncio

    async def go() -> None:
        sem = asyncio.Semaphore(concurrency)
        bar = tqdm(total=len(names), desc="load adapters", unit="adapter", disable=not progress, leave=False)
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:
            async def one(name: str) -> None:
                async with sem:
                    r = await client.post("/v1/adapters", json={"name": name})
                    if r.status_code != 200:
                        raise RuntimeError(f"loading {name}: HTTP {r.status_code} {r.text[:200]}")
                    bar.update(1)
            await asyncio.gather(*(one(n) for n in names))
        bar.close()

    asyncio.run(go())


# ---- workloads and runs ------------------------------------------------------------

def int_range(text: str) -> tuple[int, int]:
    """'8-64' -> (8, 64); '16' -> (16, 16)."""
    lo, _, hi = text.partition("-")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO-HI or N, got {text!r}") from None


def add_workload_arguments(p: argparse.ArgumentParser, requests: int, rate: float, input_len: str = "8-64",
                           output_len: str = "16-48", time_limit: float = 240.0) -> None:
    g = p.add_argument_group("workload (S-LoRA style: power-law adapters, Gamma arrivals, uniform lengths)")
    g.add_argument("--requests", type=int, default=requests, help="requests per run")
    g.add_argument("--rate", type=float, default=rate, help="mean arrival rate, req/s")
    g.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of arrivals (1 = Poisson)")
    g.add_argument("--alpha", type=float, default=1.0,
                   help="power-law exponent of adapter popularity, S-LoRA's: 1 uniform, < 1 skewed")
    g.add_argument("--input-len", type=int_range, default=int_range(input_len), help="prompt tokens LO-HI")
    g.add_argument("--output-len", type=int_range, default=int_range(output_len), help="output tokens LO-HI")
    g.add_argument("--trace", type=Path, default=None,
                   help="replay this JSONL trace instead (bench/workload.py: read_trace)")
    g.add_argument("--time-limit", type=float, default=time_limit, help="seconds per run at most")
    g.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT target, s")
    g.add_argument("--slo-tpot", type=float, default=0.25, help="per-token latency target, s")


def workload(args: argparse.Namespace, num_adapters: int, prefix: str = "adapter", seed: int | None = None) -> list:
    """The run's requests: the trace (its adapter names mapped onto this run's, by first appearance), or
    generated from the arguments."""
    from bench.workload import Request, WorkloadConfig, adapter_name, generate, read_trace

    seed = args.seed if seed is None else seed
    if args.trace is None:
        return generate(WorkloadConfig(
            num_requests=args.requests, num_adapters=num_adapters, alpha=args.alpha, rate=args.rate, cv=args.cv,
            input_len=args.input_len, output_len=args.output_len, adapter_prefix=prefix, seed=seed))
    reqs = read_trace(args.trace, seed=seed)
    names: dict[str, str] = {}
    out = []
    for r in reqs:
        adapter = None
        if r.adapter is not None and num_adapters > 0:
            k = names.setdefault(r.adapter, adapter_name(prefix, len(names) % num_adapters))
            adapter = k
        out.append(Request(r.index, r.arrival_s, adapter, r.prompt_ids, r.prompt_text, r.max_tokens))
    return out


def slo(args: argparse.Namespace) -> Any:
    from bench.runner import SLO

    return SLO(args.slo_ttft, args.slo_tpot)


def server_config(args: argparse.Namespace, **engine: Any) -> ServerConfig:
    """The comparison's server: its model and TP degree, max_model_len 256, and `engine` settings."""
    return ServerConfig(model=args.model, tp=args.tp,
                        engine=tuple(sorted({"max_model_len": 256, **engine}.items())))


def model_info(args: argparse.Namespace) -> str:
    c = MODELS[args.model]
    return (f"{args.model} (random Llama: hidden {c.hidden_size}, {c.num_layers} layers, {c.num_heads} heads, "
            f"intermediate {c.intermediate_size}, vocab {c.vocab_size})")


def runner_config(args: argparse.Namespace, served: Served, label: str) -> Any:
    from bench.runner import RunnerConfig

    return RunnerConfig(base_url=served.url, base_model=served.base_model, time_limit_s=args.time_limit,
                        slo=slo(args), progress=args.progress, label=label)


def warm_up(served: Served, names: Sequence[str], progress: bool = True) -> None:
    """Adapters into host memory (POST /v1/adapters), then one short request each (into the pool; also
    warms the model's code paths), so a timed run measures serving, not first loads."""
    from bench.runner import RunnerConfig, run
    from bench.workload import Request

    load_adapters(served.url, names, progress=progress)
    reqs = [Request(i, 0.02 * i, n, (5, 6, 7, 8), None, 2) for i, n in enumerate([*names, None])]
    res = run(reqs, RunnerConfig(served.url, served.base_model, time_limit_s=300, progress=progress,
                                 label="warm-up"))
    if res.summary["errors"]:
        raise RuntimeError(f"warm-up failed: {res.summary['error_kinds']}")


# ---- reports ---------------------------------------------------------------------

def fmt(v: Any, digits: int = 2) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2) -> list[str]:
    right = ["---:" if rows and isinstance(rows[0][i], (int, float)) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(right) + " |"]
    lines += ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in rows]
    return lines


def run_table(runs: Sequence[dict], first: str = "variant") -> list[str]:
    """The standard serving table of a list of {name, summary} runs."""
    headers = [first, "ok/req", "req/s", "tok/s", "TTFT p50", "TTFT p90", "TTFT p99", "TPOT p50", "TPOT p90",
               "TPOT p99", "SLO"]
    rows = []
    for r in runs:
        s = r["summary"]
        rows.append([r["name"], f"{s['ok']}/{s['requests']}", s["req_per_s"], s["tokens_per_s"],
                     s["ttft_s"]["p50"], s["ttft_s"]["p90"], s["ttft_s"]["p99"],
                     1e3 * s["tpot_s"]["p50"], 1e3 * s["tpot_s"]["p90"], 1e3 * s["tpot_s"]["p99"],
                     f"{100 * s['slo']['attainment']:.0f}%"])
    lines = markdown_table(headers, rows)
    slo = runs[0]["summary"]["slo"] if runs else None
    if slo:
        lines.append(f"(TTFT in s, TPOT = per-token latency in ms; SLO: TTFT <= {slo['ttft_s']} s and "
                     f"TPOT <= {1e3 * slo['tpot_s']:.0f} ms)")
    return lines


def write_json(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


# ---- CLI --------------------------------------------------------------------------

def comparisons() -> dict[str, Any]:
    from bench import baseline_peft, cold, modes, scaling, tax

    return {m.NAME: m for m in (modes, scaling, baseline_peft, cold, tax)}


def build_parser(prog: str = "python -m bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="comparison", required=True)
    for name, mod in comparisons().items():
        sp = sub.add_parser(name, help=mod.HELP, description=mod.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.add_argument("--json", type=Path, default=OUT_DIR / f"{name}.json", help="where to write the result")
        sp.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
        sp.add_argument("--model", choices=sorted(MODELS), default="tiny",
                        help="base model: tiny (hidden 256, 2 layers) or small (hidden 1024, 4 layers)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
        sp.add_argument("-v", "--verbose", action="store_true", help="INFO logging")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mod = comparisons()[args.comparison]
    t = time.monotonic()
    result = mod.run(args)
    result["command"] = " ".join([prog, *(sys.argv[1:] if argv is None else argv)])
    result["runtime_s"] = time.monotonic() - t
    write_json(result, args.json)
    if args.plot is not None:
        from bench import plots

        plots.plot(args.comparison, result, args.plot)
    lines = mod.report(result)
    print(f"\n{args.comparison}: finished in {result['runtime_s']:.0f} s; wrote {args.json}"
          + (f" and {args.plot}" if args.plot else ""))
    print("\n".join(lines))  # the ratio is the last line
    return 0
