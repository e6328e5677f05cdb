"""The engine loop of a replica group, on TP rank 0: continuous batching of
requests for many adapters over one unified page pool.

Thread model: `submit`, `abort`, `prefetch`, `unload` may be called from any
thread; they queue work for the loop thread, which alone touches the scheduler,
the pool and the step channel. Other threads read only `snapshot()`, which the
loop publishes (a plain dict, replaced whole, never mutated after). A step's
outputs go out together, once per step, through `deliver` (default: each
request's `sink` callback, called on the loop thread); a serving layer on
another thread hands the whole batch over in one wake-up.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from bdlora_ray.detokenizer import IncrementalDetokenizer
from bdlora_ray.errors import AdapterInUse, BdloraError, InvalidRequest, Overloaded, PoolExhausted, ReplicaGroupFailed
from bdlora_ray.guided import GrammarCompiler
from bdlora_ray.request import GenerationRequest, RequestOutput, TokenLogprob
from bdlora_ray.sampling import SamplingError, make_generator, sample
from bdlora_ray.scheduler import PoolLog, Scheduler, Sequence
from bdlora_ray.spec import EngineConfig
from bdlora_ray.worker import TPWorker

log = logging.getLogger(__name__)

SNAPSHOT_EVERY_S = 0.05  # while busy; every turn that finishes a request or goes idle publishes too
TIMELINE_STEPS = 4096    # forward steps the timeline keeps (a ring: the newest)

Sink = Callable[[RequestOutput], None]
Deliver = Callable[[list[tuple[Sink, RequestOutput]]], None]


def deliver_inline(batch: list[tuple[Sink, RequestOutput]]) -> None:
    for sink, out in batch:
        sink(out)


class Engine:
    def __init__(self, worker: TPWorker, tokenizer: Any, config: EngineConfig,
                 fetch: Callable[[str], Future] | None = None, deliver: Deliver = deliver_inline) -> None:
        self.worker, self.tokenizer, self.config = worker, tokenizer, config
        self._deliver = deliver
        self._outbox: list[tuple[Sink, RequestOutput]] = []   # this step's outputs, sent at its end
        self.pool = worker.pool
        self.log = PoolLog(self.pool, worker.apply)
        self.counters: Counter[str] = Counter()
        self.scheduler = Scheduler(self.log, config.max_num_seqs, config.max_num_batched_tokens, self._ready,
                                   worker.adapter_needs, config.enable_chunked_prefill,
                                   config.enable_prefix_caching, self.counters)
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fetch")
        # How a cold adapter reaches every rank's host memory; by default only this rank
        # fetches ahead, and the others fetch when the load op reaches them.
        self._fetch = fetch or (lambda name: self._executor.submit(worker.fetch_adapter, name))
        self._fetching: dict[str, Future] = {}
        self._prefetched: set[str] = set()      # shards on every rank's host, not yet in the pool
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._seqs: dict[str, Sequence] = {}    # request id -> live sequence
        self._sinks: dict[str, Sink] = {}
        self._ids = itertools.count()
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = set(worker.cfg.eos_token_id) | ({eos} if eos is not None else set())
        self._grammars = GrammarCompiler(tokenizer, worker.cfg.vocab_size, self.eos_ids)  # xgrammar at first use
        self._guides: dict[str, Any] = {}      # request id -> its grammar matcher (structured output)
        # Grammars compile on a thread of their own (xgrammar releases the GIL): a heavy schema never
        # stalls the caller's event loop or this loop; its request waits in _compiling meanwhile.
        self._compile_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._compiling: list[tuple[GenerationRequest, Sink, Future]] = []
        self.steps = 0
        # One record per forward step, for profiling the serving path (`timeline()`): (start of the loop
        # turn, start of the forward pass, end of the turn (outputs handed over), rows, tokens fed in,
        # prefill rows), monotonic seconds. Appended by the loop thread only.
        self._timeline: deque[tuple[float, float, float, int, int, int]] = deque(maxlen=TIMELINE_STEPS)
        self._turn: tuple = ()
        self._submitted: deque[float] = deque(maxlen=TIMELINE_STEPS)  # when each request was submitted
        self.per_adapter: Counter[str] = Counter()
        self.dead: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self._last_send = time.monotonic()
        self._snapshot: dict = {}
        self._published = 0.0
        self.publish()

    # ---- API (any thread) -------------------------------------------------------

    def submit(self, req: GenerationRequest, sink: Sink) -> None:
        """Queue a request; raises typed errors for what can be refused at once."""
        if self.dead is not None:
            raise ReplicaGroupFailed(f"replica group failed: {self.dead!r}")
        req.params.validate()
        n = len(req.prompt_ids)
        limit = self.config.max_model_len
        if n == 0:
            raise InvalidRequest("the prompt is empty")
        if n + req.params.max_tokens > limit:
            raise InvalidRequest(f"prompt ({n} tokens) + max_tokens ({req.params.max_tokens}) exceeds the "
                                 f"context length {limit}")
        vocab = self.worker.cfg.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})")
        if any(t >= vocab for t, _ in req.params.logit_bias):
            raise InvalidRequest(f"logit_bias: token ids must be in [0, {vocab})")
        grammar = None
        if req.params.guide is not None:
            grammar = self._compile_pool.submit(self._grammars.compile, req.params.guide)
            grammar.add_done_callback(lambda _: self._wake.set())
        if len(self.scheduler.waiting) + self._inbox.qsize() >= self.config.max_queue_len:
            self.counters["rejected_overload"] += 1
            raise Overloaded(f"queue full ({self.config.max_queue_len} waiting)")
        self._submitted.append(time.monotonic())
        self._inbox.put(("submit", req, sink, grammar))
        self._wake.set()
        if self.dead is not None:  # died meanwhile: the loop will not drain the inbox again
            self._drain_refused(ReplicaGroupFailed(f"replica group failed: {self.dead!r}"))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def prefetch(self, name: str) -> Future:
        """Fetch an adapter's shards to every rank's host memory (no pool pages yet)."""
        fut: Future = Future()
        self._inbox.put(("prefetch", name, fut))
        self._wake.set()
        return fut

    def unload(self, name: str) -> Future:
        """Evict an idle adapter from the pool; resolves to whether it was resident."""
        fut: Future = Future()
        self._inbox.put(("unload", name, fut))
        self._wake.set()
        return fut

    def stats(self) -> dict:
        """The loop's latest published snapshot (safe from any thread)."""
        return self._snapshot

    def timeline(self, since: float = 0.0) -> dict[str, list]:
        """What happened after `since` (monotonic s, comparable across processes of one machine):
        "steps", the forward steps, oldest first, each (turn start, forward start, turn end, rows,
        tokens fed in, prefill rows); "submitted", when each request was submitted. Copies: the
        deques are appended to by other threads, and copying one is atomic under the GIL."""
        return {"steps": [r for r in tuple(self._timeline) if r[0] > since],
                "submitted": [t for t in tuple(self._submitted) if t > since]}

    # ---- snapshot (loop thread) -----------------------------------------------------

    def publish(self) -> None:
        """Replace the snapshot other threads read (they never see the live dicts)."""
        self._snapshot = {
            "pool": self.pool.usage().to_dict(), "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running), "steps": self.steps,
            "resident_adapters": self.pool.adapters_lru(), "counters": dict(self.counters),
            "requests_per_adapter": dict(self.per_adapter), "channel_messages": self.worker.channel.sent,
            "worker_steps": self.worker.steps, "dead": repr(self.dead) if self.dead is not None else None}
        self._published = time.monotonic()

    def _flush(self, force_publish: bool = False) -> None:
        """End of a loop turn: publish the snapshot if due, then send the turn's outputs as one batch.
        Publishing first means a caller that got its last output sees a snapshot that counts it."""
        batch, self._outbox = self._outbox, []
        if force_publish or any(out.finished for _, out in batch) or \
                time.monotonic() - self._published > SNAPSHOT_EVERY_S:
            self.publish()
        if batch:
            self._deliver(batch)

    # ---- loop ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)  # the loop tells the other ranks to stop as it exits
        else:
            self.worker.channel.send({"stop": True})  # stepped by hand: tell them here
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._compile_pool.shutdown(wait=False, cancel_futures=True)

    def run_forever(self) -> None:
        try:
            while not self._stop:
                if not self.step():
                    if time.monotonic() - self._last_send > self.config.heartbeat_s:
                        self._send([])
                    self.wait_for_work(min(0.05 if self._fetching else 1.0, self.config.heartbeat_s))
        except BaseException as e:  # the ranks may now disagree: fail everything, refuse new work
            log.exception("engine loop died")
            self.dead = e
            failed = ReplicaGroupFailed(f"replica group failed: {e!r}")
            for rid in list(self._seqs):
                self._fail(self._seqs[rid], failed)
            self._drain_refused(failed)
            self._flush(force_publish=True)
        finally:
            try:
                self.worker.channel.send({"stop": True})
            except Exception:  # other ranks may be gone already
                log.debug("could not tell the other ranks to stop", exc_info=True)

    def wait_for_work(self, timeout: float) -> None:
        """Block until something arrives (a request, an abort, a finished fetch) or timeout."""
        self._wake.wait(timeout=timeout)
        self._wake.clear()

    def step(self) -> bool:
        """Drain the inbox, run at most one forward pass, send the outputs; True if anything happened."""
        begin = time.monotonic()
        self._turn = ()
        try:
            busy = self._step()
        finally:
            self._flush(force_publish=False)
        if self._turn:
            self._timeline.append((begin, *self._turn[:1], time.monotonic(), *self._turn[1:]))
        if not busy:
            self.publish()  # idle: what other threads read is exact
        return busy

    def _step(self) -> bool:
        busy = self._drain()
        busy |= self._poll_fetches()
        busy |= self._poll_compiles()
        self._expire_waiting()
        sched = self.scheduler.schedule()
        self._prefetched -= {n for n in self._prefetched if n in self.pool}
        for seq in sched.refused:
            self._fail(seq, PoolExhausted(f"sequence of {len(seq.tokens)} tokens needs more pages than the pool "
                                          f"has ({self.pool.config.num_pages} per layer)"))
        if not sched.seqs:
            self._fail_unschedulable()
            if self.log.ops:
                self._send([])
                return True
            return busy
        msg = [[s.seq_id, s.adapter, start, s.tokens[start:start + n]]
               for s, start, n in zip(sched.seqs, sched.starts, sched.counts)]
        self._turn = (time.monotonic(), len(msg), sum(sched.counts),
                      sum(1 for s, start in zip(sched.seqs, sched.starts) if start < s.num_prompt))
        self._send(msg)
        logits = self.worker.execute(msg)
        self.steps += 1
        # A prefill piece that does not reach the end of the prompt samples nothing.
        rows = [i for i, (s, start, n) in enumerate(zip(sched.seqs, sched.starts, sched.counts))
                if start + n == len(s.tokens)]
        for s, start, n in zip(sched.seqs, sched.starts, sched.counts):
            s.num_computed = start + n
        self.scheduler.cache_computed(sched.seqs)
        self.counters["preemptions"] += len(sched.preempted)
        seqs = [sched.seqs[i] for i in rows]
        if not seqs:
            return True
        drawn = sample(logits[rows], [s.req.params for s in seqs], [s.generator for s in seqs],
                       [(s.tokens, s.num_prompt) for s in seqs],
                       [self._guides.get(s.req.request_id) for s in seqs] if self._guides else None, self.eos_ids)
        for seq, tok, logprob in zip(seqs, drawn.tokens, drawn.logprobs):
            if isinstance(tok, SamplingError):  # that request fails; the batch and the loop go on
                self.counters["sampling_errors"] += 1
                self._fail(seq, tok)
                continue
            seq.tokens.append(tok)
            self._emit(seq, tok, logprob)
        return True

    def _send(self, seqs: list) -> None:
        self.worker.channel.send({"ops": self.log.take(), "seqs": seqs})
        self._last_send = time.monotonic()

    def _drain_refused(self, err: BaseException) -> None:
        """After the loop died: answer what is still queued (any thread), so that nothing waits forever."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "submit":
                self._deliver([(item[2], self._error_output(item[1], err))])
            elif item[0] in ("prefetch", "unload") and not item[2].done():
                item[2].set_exception(err)

    def _drain(self) -> bool:
        busy = False
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return busy
            busy = True
            kind = item[0]
            if kind == "submit":
                self._admit(item[1], item[2], item[3])
            elif kind == "abort":
                seq = self._seqs.get(item[1])
                if seq is not None:
                    self._finish(seq, "abort")
                aborted = [c for c in self._compiling if c[0].request_id == item[1]]
                if aborted:
                    self._compiling = [c for c in self._compiling if c[0].request_id != item[1]]
                for req, sink, _ in aborted:
                    self._outbox.append((sink, RequestOutput(req.request_id, (), "", True, "abort",
                                                             len(req.prompt_ids))))
            elif kind == "prefetch":
                self._want(item[1], item[2])
            elif kind == "unload":
                self._unload(item[1], item[2])

    def _admit(self, req: GenerationRequest, sink: Sink, grammar: Future | None) -> None:
        """A submitted request joins the queue once its grammar (if any) has compiled; refused if it did not."""
        if grammar is None:
            self._add(req, sink)
        elif not grammar.done():
            self._compiling.append((req, sink, grammar))
        elif grammar.exception() is not None:
            self._outbox.append((sink, self._error_output(req, grammar.exception())))
        else:
            self._add(req, sink, grammar.result())

    def _poll_compiles(self) -> bool:
        if not any(fut.done() for _, _, fut in self._compiling):
            return False
        waiting, self._compiling = self._compiling, []
        for req, sink, fut in waiting:
            self._admit(req, sink, fut)
        return True

    def _add(self, req: GenerationRequest, sink: Sink, grammar: Any = None) -> None:
        if req.request_id in self._seqs:
            self._outbox.append((sink, self._error_output(req, InvalidRequest(
                f"duplicate request id {req.request_id!r}"))))
            return
        seq = Sequence(req=req, seq_id=next(self._ids), arrival=time.monotonic(), tokens=list(req.prompt_ids),
                       num_prompt=len(req.prompt_ids), generator=make_generator(req.params),
                       detok=IncrementalDetokenizer(self.tokenizer))
        self._seqs[req.request_id] = seq
        self._sinks[req.request_id] = sink
        if grammar is not None:
            self._guides[req.request_id] = GrammarCompiler.matcher(grammar)
        self.per_adapter[req.adapter or ""] += 1
        self.scheduler.add(seq)
        if req.adapter is not None:
            self._want(req.adapter)

    # ---- adapters -----------------------------------------------------------------

    def _ready(self, name: str) -> bool:
        return name in self.pool or name in self._prefetched

    def _want(self, name: str, done: Future | None = None) -> None:
        if self._ready(name):
            if done is not None:
                done.set_result(name)
            return
        fut = self._fetching.get(name)
        if fut is None:
            fut = self._fetching[name] = self._fetch(name)
            self.counters["adapter_fetches"] += 1
        if done is not None:
            fut.add_done_callback(lambda f: done.set_exception(f.exception()) if f.exception()
                                  else done.set_result(name))
        fut.add_done_callback(lambda _: self._wake.set())

    def _unload(self, name: str, done: Future) -> None:
        self._prefetched.discard(name)
        if name not in self.pool:
            done.set_result(False)
        elif self.pool.adapter(name).refcount:
            done.set_exception(AdapterInUse(f"adapter {name!r} is in use by running requests"))
        else:
            self.log("evict_adapter", name)
            done.set_result(True)

    def _poll_fetches(self) -> bool:
        busy = False
        for name, fut in list(self._fetching.items()):
            if not fut.done():
                continue
            busy = True
            del self._fetching[name]
            err = fut.exception()
            if err is None:
                self._prefetched.add(name)
                continue
            self.counters["adapter_fetch_errors"] += 1
            for seq in [s for s in self.scheduler.waiting if s.adapter == name]:
                self._fail(seq, err)
        for seq in self.scheduler.waiting:  # evicted while its request waited: fetch again
            if seq.adapter is not None and not self._ready(seq.adapter) and seq.adapter not in self._fetching:
                self._want(seq.adapter)
        return busy

    # ---- outputs ------------------------------------------------------------------

    def _emit(self, seq: Sequence, tok: int, logprob: TokenLogprob | None = None) -> None:
        p = seq.req.params
        reason = None
        if tok in self.eos_ids and not p.ignore_eos:
            reason = "stop"  # EOS ends the text and is not part of it
        else:
            seq.detok.add(tok)
        text = seq.detok.text
        if reason is None and (len(seq.output_ids) >= p.max_tokens or len(seq.tokens) >= self.config.max_model_len):
            reason = "length"
        if reason is not None:
            text += seq.detok.pending()  # the request ends: an incomplete character is shown as it is
        for s in p.stop if len(seq.output_ids) >= p.min_tokens else ():
            i = text.find(s, max(0, len(seq.text) - len(s)))
            if i >= 0:
                text, reason = text[:i], "stop"
        if reason is None and p.stop:
            # Hold back any tail that could be the start of a stop string (the next token decides).
            hold = max(len(s) for s in p.stop) - 1
            text = text[:len(text) - hold] if hold else text
            text = text if len(text) >= len(seq.text) else seq.text
        delta, seq.text = text[len(seq.text):], text
        self.counters["generated_tokens"] += 1
        self._outbox.append((self._sinks[seq.req.request_id], RequestOutput(
            request_id=seq.req.request_id, token_ids=(tok,), text=delta, finished=reason is not None,
            finish_reason=reason, prompt_tokens=seq.num_prompt, completion_tokens=len(seq.output_ids),
            logprobs=None if logprob is None else (logprob,))))
        if reason is not None:
            self._finish(seq, reason, emit=False)

    def _finish(self, seq: Sequence, reason: str, emit: bool = True, err: BaseException | None = None) -> None:
        self.scheduler.release(seq)
        rid = seq.req.request_id
        self._seqs.pop(rid, None)
        sink = self._sinks.pop(rid, None)
        self._guides.pop(rid, None)
        self.counters[f"finished_{reason}"] += 1
        if emit and sink is not None:
            self._outbox.append((sink, self._error_output(seq.req, err, len(seq.output_ids)) if err is not None
                                 else RequestOutput(request_id=rid, token_ids=(), text="", finished=True,
                                                    finish_reason=reason, prompt_tokens=seq.num_prompt,
                                                    completion_tokens=len(seq.output_ids))))

    def _fail(self, seq: Sequence, err: BaseException) -> None:
        self._finish(seq, "error", err=err)

    @staticmethod
    def _error_output(req: GenerationRequest, err: BaseException, completion_tokens: int = 0) -> RequestOutput:
        status = err.http_status if isinstance(err, BdloraError) else 500
        return RequestOutput(request_id=req.request_id, token_ids=(), text="", finished=True,
                             finish_reason="error", prompt_tokens=len(req.prompt_ids),
                             completion_tokens=completion_tokens, error=str(err) or type(err).__name__,
                             error_status=status, error_type=type(err).__name__)

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        for seq in [s for s in self.scheduler.waiting if now - s.arrival > self.config.max_queue_wait_s]:
            self.counters["expired_in_queue"] += 1
            self._fail(seq, Overloaded(f"waited over {self.config.max_queue_wait_s:.0f} s in the queue"))

    def _fail_unschedulable(self) -> None:
        """Nothing runs, yet the head of the queue cannot be admitted: it never will be."""
        if self.scheduler.running:
            return
        for seq in self.scheduler.waiting:
            if seq.adapter is None or self._ready(seq.adapter):
                self._fail(seq, PoolExhausted(
                    f"request needs more pages than the pool has ({self.pool.config.num_pages} per layer)"))
                return
