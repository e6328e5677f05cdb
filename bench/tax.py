"""The serving tax: how much of the engine's decode speed reaches an HTTP client, in one run.

1. Engine alone (as bench/decode.py: two plain processes over gloo, rank 0 steps the engine by hand):
   decode tokens/s at batch 1, 8 and 32, base model and mixed adapters, each the median of `--waves`
   windows of `--steps` decode steps (by default `--tokens`: as many steps as a wave below takes),
   measured before the servers start and again after they stop, the faster of the two kept (a stretch
   another process slowed would flatter the ratio). With `--rounds R`, steps 2 and 3 run R times, the
   engine alone measured between rounds; each ratio is then the median over rounds of the ratio within a
   round (against the engine measured just before and after it).
   The two sides of a ratio take the same estimator over as many intervals of the same length: the
   median of `--waves` windows of `--tokens` steps against the median of `--waves` waves of `--tokens`
   tokens per request. (On this 2-core machine the rate of a 24-step window of the engine alone spans
   ~2500-3800 tok/s at batch 32 within a minute; the fastest of such windows, the reference before,
   sat ~20% above the engine's typical rate, where each HTTP figure was its waves' mean.)
2. The whole system over HTTP on the same model, TP degree and adapters (`compare.local_server`: a
   Serve app exactly as `serve run deploy:app`): closed waves of B concurrent `/v1/completions` of
   `--tokens` tokens each (greedy, EOS ignored), base and mixed adapters, streamed and not. Each case
   runs one untimed wave, then `--waves` timed ones, through one client whose connections stay open
   between waves (as an OpenAI client's pool does). Tokens/s of a wave = its tokens / its wall time,
   a case's the median of its waves'; streamed waves also give TTFT and TPOT.
   Step 2 runs once per HTTP front (`--fronts`, deploy/cluster_env.py): Serve's Python proxy (the
   default) and HAProxy (Serve's HAProxy mode: HAProxy in front of the ingress replicas' own HTTP
   servers), each on a server of its own, against the same engine-alone figures. With
   `--stream-intervals`, one more server per interval on the first front (EngineConfig.stream_interval:
   tokens per streamed event), and with `--stream-budgets` one per budget
   (EngineConfig.stream_events_per_step: streamed events per step under load), streamed waves only.
   With `--separate-ingress`, one more server on the first front with the API in an Ingress deployment
   of its own (BDLORA_INGRESS=separate: a request crosses one more process) where the default one-group
   app serves it from the group's replica (deploy/app.py), streamed and not.
3. During the batch-32 waves (streamed and not), the CPU time of each serving process (psutil: the HTTP
   front (the Serve proxy; or HAProxy and its manager actor), the ingress replica if the API has one
   ("-" where the group's replica serves the API), the group replica that runs rank 0, the rank > 0
   worker actors, this client) per generated token, and the group replica's split into its engine
   thread and the rest.

The last line is `HTTP / engine at batch 32: N.NNx` (non-streamed, base model, the default front);
the lines above it give mixed adapters and the other front; the table has every front, batch size
and variant. Run on a quiet machine: every process here shares its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import aiohttp

from bench import compare
from bench.engine_alone import measure_windows as engine_alone_windows
from bench.runner import percentile
from bdlora_ray.spec import EngineConfig
from deploy.cluster_env import FRONTS
from deploy.seed import DemoAdapter

BUDGET = EngineConfig().stream_events_per_step  # the servers' default streamed events per step

NAME = "tax"
HELP = "engine-alone vs HTTP decode tokens/s at batch 1/8/32, and serving CPU per token by process"
ANCHOR = "vLLM V1 / Ray Serve LLM: the engine owns the replica; serving overhead a small share of a step"
BATCHES = (1, 8, 32)
ROLES = ("proxy", "ingress", "group replica (rank 0)", "rank > 0 workers", "client")
# The group replica's CPU split by thread: the engine loop's thread (rank 0's steps; the busiest by far),
# torch.distributed's gloo threads (its transport and work loops: rank 0's share of each step's collectives),
# and the rest (Serve's request handling, Ray's core worker): the replica's per-request serving cost.
SPLIT = ("group replica: engine thread", "group replica: gloo threads", "group replica: other threads")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--adapters", type=int, default=3, help="distinct adapters of the mixed variant (bd mode)")
    p.add_argument("--rank", type=int, default=8, help="adapter rank")
    p.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    p.add_argument("--waves", type=int, default=3, help="timed waves per batch size and variant")
    p.add_argument("--steps", type=int, default=None,
                   help="decode steps of each timed engine-alone window (default: --tokens, a wave's length)")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--fronts", nargs="+", choices=FRONTS, default=list(FRONTS),
                   help="Serve's HTTP fronts to measure, each on a server of its own (deploy/cluster_env.py)")
    p.add_argument("--stream-intervals", type=int, nargs="*", default=[],
                   help="also serve at these stream intervals (tokens per streamed event; the fronts' servers "
                        "use 1), on the first front, streamed waves only")
    p.add_argument("--stream-budgets", type=int, nargs="*", default=[],
                   help="also serve at these streamed-event budgets per step (0: none; the other servers use "
                        "the default), on the first front, streamed waves only")
    p.add_argument("--separate-ingress", action="store_true",
                   help="also serve with the API in an Ingress deployment of its own (BDLORA_INGRESS=separate), "
                        "on the first front, streamed and not")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds of every server's waves, the engine alone measured between them; each ratio "
                        "the median over rounds of its ratio within a round")


# ---- 1. engine alone ------------------------------------------------------------------------------

def engine_alone(args: argparse.Namespace, model_dir: Path, peft_dirs: dict[str, Path]) -> list[dict]:
    names = sorted(peft_dirs)
    cases = {f"{b} {v}": [None] * b if v == "base" else [names[i % len(names)] for i in range(b)]
             for b in args.batches for v in ("base", "mixed")}
    windows = engine_alone_windows(model_dir, {n: (str(p), "bd") for n, p in peft_dirs.items()}, cases, args.tp,
                                   args.steps or args.tokens, dict(compare.server_config(args, num_pages=2048).engine),
                                   windows=args.waves)
    return [{"batch": int(k.split()[0]), "variant": k.split()[1], "tokens_per_s": percentile(v, 50), "windows": v}
            for k, v in windows.items()]


# ---- 2. over HTTP ---------------------------------------------------------------------------------

async def one_request(session: aiohttp.ClientSession, body: dict, stream: bool, t0: float) -> dict:
    if not stream:
        async with session.post("/v1/completions", json=body) as r:
            r.raise_for_status()
            usage = (await r.json())["usage"]
        return {"tokens": usage["completion_tokens"], "done_s": time.perf_counter() - t0}
    first = last = None
    tokens = 0
    async with session.post("/v1/completions",
                            json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for raw in r.content:  # one line at a time
            line = raw.decode().rstrip("\r\n")
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            now = time.perf_counter() - t0
            if ev["choices"] and first is None:
                first = now
            if ev["choices"]:
                last = now
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    return {"tokens": tokens, "first_s": first, "done_s": last}


async def _waves(url: str, bodies: list[dict], stream: bool, waves: int,
                 on_start: Callable[[], None] = lambda: None) -> list[tuple[float, float, list[dict]]]:
    """A warm-up wave, `on_start()`, then `waves` timed waves, all through one client whose connections
    stay open between waves (as a real client's pool does); [(wave start (monotonic s), wall s, per-request
    results)].
    aiohttp (as vLLM's serving benchmark): the client shares this machine's cores with the server, and
    it spends less CPU per request than httpx."""
    async with aiohttp.ClientSession(base_url=url, timeout=aiohttp.ClientTimeout(total=300),
                                     connector=aiohttp.TCPConnector(limit=len(bodies) + 4)) as session:
        timed = []
        for i in range(waves + 1):
            if i == 1:
                on_start()
            start, t0 = time.monotonic(), time.perf_counter()
            res = await asyncio.gather(*(one_request(session, b, stream, t0) for b in bodies))
            timed.append((start, time.perf_counter() - t0, res))
        return timed[1:]


def serving_processes() -> dict[str, list]:
    """The served group's processes by role, found by the titles Ray gives its workers."""
    import psutil

    roles: dict[str, list] = {r: [] for r in ROLES}
    for p in psutil.process_iter(["cmdline"]):
        title = " ".join(p.info["cmdline"] or ())
        if "ProxyActor" in title or "HAProxyManager" in title or title.split(" ", 1)[0].endswith("/haproxy"):
            roles["proxy"].append(p)
        elif "ServeReplica" in title and "Ingress" in title:
            roles["ingress"].append(p)
        elif "ServeReplica" in title and "EngineGroup" in title:
            roles["group replica (rank 0)"].append(p)
        elif "TPWorkerActor" in title:
            roles["rank > 0 workers"].append(p)
    roles["client"].append(psutil.Process())
    return roles


def listeners(port: int) -> list[str]:
    """The names of the processes listening on TCP `port` here (which front holds the HTTP port)."""
    import psutil

    names = set()
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            names.add(psutil.Process(c.pid).name())
    return sorted(names)


def _cpu_s(procs: list) -> float:
    """CPU seconds of `procs` so far; NaN if one has gone (Serve replaced it: no figure for that role)."""
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            return float("nan")
    return total


def _thread_cpu_s(procs: list) -> dict[tuple[int, int, str], float]:
    """CPU seconds so far of every thread of `procs` by (pid, thread id, name); empty if one has gone."""
    import psutil

    try:
        return {(p.pid, t.id, _thread_name(p.pid, t.id)): t.user_time + t.system_time
                for p in procs for t in p.threads()}
    except psutil.Error:
        return {}


def _thread_name(pid: int, tid: int) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()  # Linux; elsewhere every thread is "other"
    except OSError:
        return ""


def _split(before: dict, after: dict, tokens: int) -> dict[str, float]:
    """The group replica's CPU per token (us) by thread: the busiest (the engine loop), gloo's, the others."""
    used = sorted(((after[k] - before.get(k, 0.0), k[2]) for k in after), reverse=True)
    if not before or not used:
        return dict.fromkeys(SPLIT, float("nan"))
    gloo = sum(t for t, name in used[1:] if "gloo" in name)
    return dict(zip(SPLIT, (1e6 * used[0][0] / tokens, 1e6 * gloo / tokens,
                            1e6 * (sum(t for t, _ in used[1:]) - gloo) / tokens)))


def _ramp(waves: list[tuple[float, float, list[dict]]]) -> dict:
    """From the engine's step timeline (same machine: one monotonic clock), per wave: when its first and
    last requests reached the engine, and how many forward steps it took (the tokens need `--tokens`);
    medians over the waves."""
    from ray import serve

    timeline = serve.get_deployment_handle("EngineGroup", app_name=compare.APP_NAME).timeline.remote(
        waves[0][0]).result()
    first, last, steps = [], [], []
    for start, wall, _ in waves:
        sub = [t - start for t in timeline["submitted"] if start <= t <= start + wall]
        first.append(1e3 * min(sub, default=float("nan")))
        last.append(1e3 * max(sub, default=float("nan")))
        steps.append(sum(1 for s in timeline["steps"] if start <= s[0] <= start + wall))
    return {"first_submit_ms": percentile(first, 50), "last_submit_ms": percentile(last, 50),
            "steps": percentile(steps, 50)}


def over_http(args: argparse.Namespace, served: compare.Served, names: list[str],
              streams: tuple[bool, ...] = (False, True)) -> tuple[list[dict], dict, dict, dict]:
    rows, cpu, ramps, sample = [], {}, {}, {}
    procs: dict[str, list] = {}
    for b in args.batches:
        for variant in ("base", "mixed"):
            for stream in streams:
                bodies = [{"model": served.base_model if variant == "base" else names[i % len(names)],
                           "prompt": [5, 6, 7, 8, 9, 10, 11, 12], "max_tokens": args.tokens, "temperature": 0,
                           "ignore_eos": True} for i in range(b)]
                measure = b == max(args.batches)
                key = f"{variant}, streamed" if stream else variant
                before: dict[str, float] = {}
                threads: dict[tuple[int, int, str], float] = {}

                def on_start() -> None:  # the processes as they are now (Serve may have replaced one)
                    if measure:
                        procs.clear()
                        procs.update(serving_processes())
                        before.update({r: _cpu_s(ps) for r, ps in procs.items()})
                        threads.update(_thread_cpu_s(procs["group replica (rank 0)"]))

                waves = asyncio.run(_waves(served.url, bodies, stream, args.waves, on_start))
                per_wave = [sum(x["tokens"] for x in res) for _, _, res in waves]
                tokens, ttft, tpot = sum(per_wave), [], []
                for _, _, res in waves:
                    for x in res:
                        if stream and x["first_s"] is not None:
                            ttft.append(x["first_s"])
                            if x["tokens"] > 1:
                                tpot.append((x["done_s"] - x["first_s"]) / (x["tokens"] - 1))
                if measure:  # None: no such process (the group's replica serves the API: no ingress replica)
                    cpu[key] = {r: 1e6 * (_cpu_s(ps) - before[r]) / tokens if ps else None
                                for r, ps in procs.items()}
                    threads_now = _thread_cpu_s(procs["group replica (rank 0)"])
                    cpu[key].update(_split(threads, threads_now, tokens))
                    # What the figures rest on: the kernel counts CPU time in ticks, each thread's apart, so
                    # the split may round past the whole by up to a tick for each thread that ran.
                    sample[key] = {"tokens": tokens, "group_threads_ran": sum(
                        1 for k, t in threads_now.items() if t != threads.get(k, 0.0))}
                    if not stream:
                        ramps[variant] = _ramp(waves)
                rates = [n / wall for n, (_, wall, _) in zip(per_wave, waves)]
                rows.append({"batch": b, "variant": variant, "stream": stream, "tokens_per_s": percentile(rates, 50),
                             "waves_tokens_per_s": rates,
                             "ttft_ms_p50": 1e3 * percentile(ttft, 50) if ttft else None,
                             "tpot_ms_p50": 1e3 * percentile(tpot, 50) if tpot else None,
                             "tpot_ms_p90": 1e3 * percentile(tpot, 90) if tpot else None})
    return rows, cpu, ramps, sample


# ---- the comparison -------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    specs = [DemoAdapter(f"tax-{k}", args.rank, True, "bd", seed=3000 + k) for k in range(args.adapters)]
    names = [a.name for a in specs]
    # The servers of a round: one per front, then one per extra stream interval or event budget on the
    # first front, and one with a separate ingress there.
    first = args.fronts[0]
    servers = ([(front, 1, BUDGET, "auto") for front in args.fronts]
               + [(first, k, BUDGET, "auto") for k in args.stream_intervals]
               + [(first, 1, n, "auto") for n in args.stream_budgets]
               + ([(first, 1, BUDGET, "separate")] if args.separate_ingress else []))
    http_rows, cpu, ramps, sample, listening = [], {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-tax-") as d:
        model_dir, peft_dirs = compare.write_files(Path(d), specs, args.tp, args.model)
        engines = [engine_alone(args, model_dir, peft_dirs)]  # no server running
        for rnd in range(args.rounds):
            # One server after the other (in reverse order every other round), against the engine
            # figures measured just before and just after them; the CPU figures are the last round's.
            for front, interval, budget, ingress in servers if rnd % 2 == 0 else servers[::-1]:
                server = replace(compare.server_config(args, num_pages=2048, stream_interval=interval,
                                                       stream_events_per_step=budget), front=front, ingress=ingress)
                with compare.local_server(Path(d), specs, server, args.progress) as served:
                    compare.warm_up(served, names, args.progress)
                    key = f"{front}{_streaming(interval, budget)}{_layout(ingress)}"  # the front alone: defaults
                    if interval == 1 and budget == BUDGET:
                        rows, cpu[key], ramps[key], sample[key] = over_http(args, served, names)
                        listening[key] = listeners(int(served.url.rsplit(":", 1)[1]))
                    else:  # streamed events of several tokens: what they save
                        rows, cpu[key], _, _ = over_http(args, served, names, streams=(True,))
                http_rows += [{"front": front, "stream_interval": interval, "stream_budget": budget,
                               "ingress": ingress, "round": rnd, **r} for r in rows]
            engines.append(engine_alone(args, model_dir, peft_dirs))  # the servers gone again
    engine_rows, http_rows = aggregate(engines, http_rows)
    engine = {(r["batch"], r["variant"]): r["tokens_per_s"] for r in engine_rows}
    b = max(args.batches)
    step_ms = 1e3 / engine[(1, "base")] if (1, "base") in engine else None
    ratios = {}
    for front, ingress in [(f, "auto") for f in args.fronts] + ([(first, "separate")] if args.separate_ingress else []):
        mine = [r for r in http_rows if r["front"] == front and r["ingress"] == ingress]
        for v in ("base", "mixed"):
            ratios[f"HTTP / engine at batch {b} ({v}{_behind(front)}{_layout(ingress)})"] = next(
                r["http_over_engine"] for r in mine if r["batch"] == b and r["variant"] == v and not r["stream"])
        for r in mine:
            if r["batch"] == b and r["stream"]:
                ratios[f"streamed HTTP / engine at batch {b} ({r['variant']}{_behind(front)}"
                       f"{_streaming(r['stream_interval'], r['stream_budget'])}{_layout(ingress)})"] = (
                    r["http_over_engine"])
        if ingress != "auto":  # the API in the group's replica / in an Ingress of its own, HTTP tok/s per round
            for r in mine:
                if r["batch"] == b:
                    auto = next(a for a in http_rows if a["front"] == front and a["ingress"] == "auto"
                                and (a["stream_interval"], a["stream_budget"]) == (1, BUDGET)
                                and (a["batch"], a["variant"], a["stream"]) == (b, r["variant"], r["stream"]))
                    ratios[f"HTTP tok/s, API in the group / separate ingress at batch {b} ({r['variant']}"
                           f"{', streamed' if r['stream'] else ''})"] = percentile(
                        [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(auto["rounds"], r["rounds"])], 50)
            continue
        single = next((r for r in mine if r["batch"] == 1 and r["variant"] == "base" and r["stream"]
                       and (r["stream_interval"], r["stream_budget"]) == (1, BUDGET)), None)
        if single and single["tpot_ms_p50"] and step_ms:
            ratios[f"single-request TPOT / engine batch-1 step{_behind(front)}"] = single["tpot_ms_p50"] / step_ms
    return {
        "comparison": NAME, "anchor": ANCHOR,
        "config": {"tp": args.tp, "adapters": args.adapters, "rank": args.rank, "tokens": args.tokens,
                   "waves": args.waves, "steps": args.steps or args.tokens, "batches": args.batches,
                   "fronts": args.fronts,
                   "stream_intervals": [1, *args.stream_intervals], "stream_budgets": [BUDGET, *args.stream_budgets],
                   "separate_ingress": args.separate_ingress, "rounds": args.rounds,
                   "model": compare.model_info(args), "device": "cpu"},
        "engine": engine_rows, "http": http_rows, "cpu_us_per_token": cpu, "cpu_sample": sample,
        "wave_ramp": ramps, "ratios": ratios,
        "front_processes": listening,
    }


def aggregate(engines: list[list[dict]], rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Engine-alone measurements (one before the first round, one after each) and the HTTP rows of every
    round, as one row per case. A round's engine rate is the faster of the two measurements around it
    (a stretch that other work slowed cannot flatter its ratios); each HTTP case's ratio is the median
    over rounds of its ratio within a round, so that a slow spell hits both sides of each quotient; its
    rates and latencies are the medians over rounds, each round's kept in `rounds`."""
    keys = [(e["batch"], e["variant"]) for e in engines[0]]
    measured = {k: [next(e["tokens_per_s"] for e in m if (e["batch"], e["variant"]) == k) for m in engines]
                for k in keys}
    per_round = {k: [max(v[i], v[i + 1]) for i in range(len(v) - 1)] for k, v in measured.items()}
    engine_rows = [{"batch": k[0], "variant": k[1], "tokens_per_s": percentile(per_round[k], 50),
                    "rounds": per_round[k], "measurements": measured[k],
                    "windows": [next(e.get("windows") for e in m if (e["batch"], e["variant"]) == k) for m in engines]}
                   for k in keys]
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        cases.setdefault((r["front"], r["stream_interval"], r["stream_budget"], r["ingress"], r["batch"], r["variant"],
                          r["stream"]), []).append(r)
    out = []
    for group in cases.values():
        for r in group:
            r["engine_tokens_per_s"] = per_round[(r["batch"], r["variant"])][r["round"]]
            r["http_over_engine"] = r["tokens_per_s"] / r["engine_tokens_per_s"]

        def median(field: str) -> float | None:
            vals = [r[field] for r in group if r[field] is not None]
            return percentile(vals, 50) if vals else None

        figures = ("tokens_per_s", "engine_tokens_per_s", "http_over_engine", "ttft_ms_p50", "tpot_ms_p50",
                   "tpot_ms_p90")
        out.append({**{k: group[0][k] for k in ("front", "stream_interval", "stream_budget", "ingress", "batch",
                                                "variant", "stream")},
                    **{f: median(f) for f in figures},
                    "rounds": [{k: r[k] for k in ("round", *figures, "waves_tokens_per_s")} for r in group]})
    return engine_rows, out


def _behind(front: str) -> str:
    """How a ratio's name tells the front: nothing for the default (Python proxy), ", behind HAProxy" else."""
    return "" if front == FRONTS[0] else f", behind {front}"


def _streaming(k: int, budget: int = BUDGET) -> str:
    """How a ratio's name tells a server's streaming settings: nothing for the defaults."""
    return ("" if k == 1 else f", stream interval {k}") + (
        "" if budget == BUDGET else f", {budget} events per step" if budget else ", no event budget")


def _layout(ingress: str) -> str:
    """How a ratio's name tells where the API ran: nothing for the default (ApiConfig.ingress)."""
    return "" if ingress == "auto" else ", separate ingress"


def report(result: dict) -> list[str]:
    c = result["config"]
    rounds = c.get("rounds", 1)
    lines = [f"TP={c['tp']}, {c['model']}; {c['tokens']} tokens per request, the median of {c['waves']} waves "
             f"(the engine: of as many "
             f"windows of {c.get('steps') or c['tokens']} steps) each; mixed = "
             f"{c['adapters']} BD-LoRA adapters of rank {c['rank']}"
             + (f"; medians over {rounds} rounds" if rounds > 1 else ""), ""]
    lines += compare.markdown_table(
        ["front", "batch", "variant", "streamed", "stream interval", "event budget", "ingress", "engine tok/s",
         "HTTP tok/s", "HTTP / engine", "TTFT p50 ms", "TPOT p50 ms", "TPOT p90 ms"],
        [[r["front"], r["batch"], r["variant"], "yes" if r["stream"] else "no", r["stream_interval"],
          r["stream_budget"], "in the group" if r["ingress"] == "auto" else r["ingress"], r["engine_tokens_per_s"],
          r["tokens_per_s"], r["http_over_engine"],
          _f(r["ttft_ms_p50"]), _f(r["tpot_ms_p50"]), _f(r["tpot_ms_p90"])]
         for r in result["http"]])
    b = max(c["batches"])
    cpu = result["cpu_us_per_token"]
    if cpu:
        cols = [(front, v) for front in cpu for v in cpu[front]]
        lines += ["", f"CPU time per generated token (us), batch {b}:", ""]
        lines += compare.markdown_table(["process", *(f"{front}: {v}" for front, v in cols)],
                                        [[role, *(_f(cpu[front][v][role]) for front, v in cols)]
                                         for role in (*ROLES, *SPLIT)])
    for front, by_variant in result.get("wave_ramp", {}).items():
        for variant, r in by_variant.items():
            lines += ["", f"{front} front, batch {b}, {variant}, not streamed (median wave): first request at the "
                          f"engine +{r['first_submit_ms']:.0f} ms, last +{r['last_submit_ms']:.0f} ms; "
                          f"{r['steps']:.0f} forward steps for {c['tokens']} tokens per request"]
    ratios = result["ratios"]
    last = {f"HTTP / engine at batch {b} ({v}{_behind(front)})" for front in c["fronts"]
            for v in ("base", "mixed")}
    lines += [""] + [f"{k}: {v:.2f}x" for k, v in ratios.items() if k not in last]
    # Each front's batch-b figures last: the default front's, the base model's very last.
    for front in sorted(c["fronts"], key=lambda f: f == FRONTS[0]):
        lines.append(f"HTTP / engine at batch {b} (mixed{_behind(front)}): "
                     f"{ratios[f'HTTP / engine at batch {b} (mixed{_behind(front)})']:.2f}x")
        name = f"HTTP / engine at batch {b}" + (f" (base{_behind(front)})" if _behind(front) else "")
        lines.append(f"{name}: {ratios[f'HTTP / engine at batch {b} (base{_behind(front)})']:.2f}x")
    return lines


def _f(v: float | None) -> float:
    return float("nan") if v is None else v
