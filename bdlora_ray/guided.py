"""Structured output: a request's grammar (a JSON schema, any JSON object, a regex) compiled with
xgrammar (the library vLLM and SGLang use) against the model's tokenizer, and a matcher per
request that says, each step, which tokens may come next.

    compiler = GrammarCompiler(tokenizer, vocab_size, stop_ids)   # once per engine, lazily
    grammar = compiler.compile(StructuredOutput("json_schema", schema))   # at submit, off the loop
    matcher = compiler.matcher(grammar)                                   # one per request
    apply_grammars(x, [matcher, ...], rows)    # x[rows[j], t] = -inf where matcher j forbids t

The step fills the bitmask rows of all constrained requests in one call (xgrammar's C++, on its
threads) and masks them in one op; the sampler then accepts the drawn tokens, again in one call. JSON is
generated compactly (", " and ": " separators, no free whitespace) so that a model cannot spend
its tokens on whitespace. Once the grammar is complete only the stop tokens (EOS) are allowed.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from bdlora_ray.errors import InvalidRequest
from bdlora_ray.request import StructuredOutput

KINDS = ("json", "json_schema", "regex")
MAX_SPEC_CHARS = 65536  # a schema or regex; compiling costs grow with size and nesting
MAX_SCHEMA_DEPTH = 32


def _check_schema(schema: Any) -> None:
    """ValueError for a schema nested deeper than MAX_SCHEMA_DEPTH (checked without recursion)."""
    todo = [(schema, 1)]
    while todo:
        v, depth = todo.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(v, dict):
            todo.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            todo.extend((x, depth + 1) for x in v)


class GrammarCompiler:
    """Compiles grammars for one tokenizer and vocabulary (xgrammar caches what it compiled).

    Thread-safe: the engine compiles in `submit`, on the caller's thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr
                # vocab_size: the model's (it may pad past the tokenizer's); ids with no text are never allowed.
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_ids)
                self._compiler = xgr.GrammarCompiler(info)
            return self._compiler

    def compile(self, guide: StructuredOutput) -> Any:
        """The compiled grammar; InvalidRequest (400) for a schema or regex it cannot use."""
        if guide.kind not in KINDS:
            raise InvalidRequest(f"unknown structured output kind {guide.kind!r}")
        if len(guide.spec) > MAX_SPEC_CHARS:
            raise InvalidRequest(f"the {guide.kind} is over {MAX_SPEC_CHARS} characters")
        compiler = self._get()
        try:
            if guide.kind == "regex":
                return compiler.compile_regex(guide.spec)
            schema = guide.spec if guide.kind == "json_schema" else '{"type": "object"}'
            _check_schema(json.loads(schema))  # a clear message for text that is not JSON at all
            return compiler.compile_json_schema(schema, any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as e:
            what = "regex" if guide.kind == "regex" else "JSON schema"
            raise InvalidRequest(f"unusable {what}: {str(e).strip().splitlines()[-1][:300]}") from None

    @staticmethod
    def matcher(grammar: Any) -> Any:
        import xgrammar as xgr
        return xgr.GrammarMatcher(grammar)


_batch: Any = None  # xgrammar's BatchGrammarMatcher (a thread pool for filling bitmasks), made at first use


def _batcher() -> Any:
    global _batch
    if _batch is None:
        import xgrammar as xgr
        _batch = xgr.BatchGrammarMatcher()
    return _batch


def apply_grammars(x: Tensor, matchers: Sequence[Any], rows: Sequence[int]) -> None:
    """x (B, V) in place: -inf at the tokens that matcher j does not allow next in row rows[j]."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(x.shape[0], x.shape[1])   # (B, ceil(V/32)) int32, CPU
    _batcher().batch_fill_next_token_bitmask(list(matchers), bitmask, list(rows))  # one call, C++ threads
    xgr.apply_token_bitmask_inplace(x, bitmask.to(x.device, non_blocking=True), indices=list(rows))


def accept_tokens(matchers: Sequence[Any], tokens: Sequence[int]) -> list[bool]:
    """Advance each matcher by its row's token; False where its grammar refuses the token."""
    import xgrammar as xgr

    return list(xgr.BatchGrammarMatcher.batch_accept_token(list(matchers), list(tokens)))
