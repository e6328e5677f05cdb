"""Build an engine on local files for the tests, and drive it step by step."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bdlora_ray.comm import Comm
from bdlora_ray.config import LlamaConfig
from bdlora_ray.engine import Engine, EngineConfig
from bdlora_ray.memory import PoolConfig
from bdlora_ray.request import GenerationRequest, RequestOutput
from bdlora_ray.tokenizer import load_tokenizer, save_byte_tokenizer
from bdlora_ray.worker import LocalShardSource, StepChannel, TPWorker
from reference import make_adapter, make_checkpoint


def engine_files(d: Path, cfg: LlamaConfig, seeds: tuple[int, int] = (21, 22), bd_blocks: int = 1,
                 bd_mode: str = "bd") -> tuple[Path, dict[str, tuple[str, str]]]:
    """A random checkpoint with a byte tokenizer, and two PEFT adapters: `small` (rank 4 on q/v,
    served replicated) and `bd` (BD-LoRA rank 8 in `bd_blocks` blocks, served `bd_mode`)."""
    ckpt = make_checkpoint(cfg, d / "tiny")
    save_byte_tokenizer(ckpt)
    small = make_adapter(ckpt, d / "small", rank=4, targets=["q_proj", "v_proj"], seed=seeds[0])
    bd = make_adapter(ckpt, d / "bd", rank=8, nblocks=bd_blocks, seed=seeds[1])
    return ckpt, {"small": (str(small), "replicated"), "bd": (str(bd), bd_mode)}


def local_engine(cfg: LlamaConfig, checkpoint: Path, adapters: dict[str, tuple[str, str | None]],
                 config: EngineConfig = EngineConfig(), block_size: int = 4, **engine_kw) -> Engine:
    pool = PoolConfig.for_model(cfg, 1, config.num_pages, block_size=block_size)
    worker = TPWorker(cfg, str(checkpoint), Comm(), pool, LocalShardSource(adapters, cfg, 1), StepChannel(1))
    return Engine(worker, load_tokenizer(checkpoint), config, **engine_kw)


def run_to_completion(engine: Engine, reqs: list[GenerationRequest], timeout_s: float = 300,
                      on_step=None) -> dict[str, list[RequestOutput]]:
    """Submit everything, step the engine (no thread) until every request finished.

    `on_step(i, outs)` runs after the i-th step that did work."""
    outs: dict[str, list[RequestOutput]] = {r.request_id: [] for r in reqs}
    for r in reqs:
        engine.submit(r, outs[r.request_id].append)
    deadline, i = time.monotonic() + timeout_s, 0
    while not all(o and o[-1].finished for o in outs.values()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not finished after {timeout_s} s")
        if not engine.step():
            engine.wait_for_work(0.1)  # e.g. an adapter fetch in the background
            continue
        if on_step is not None:
            on_step(i, outs)
        i += 1
    return outs


def tokens(events: list[RequestOutput]) -> list[int]:
    return [t for e in events for t in e.token_ids]


@torch.no_grad()
def hf_generate(checkpoint: Path, prompt: list[int], max_new_tokens: int, adapter: str | None = None) -> list[int]:
    """Greedy HF (+ PEFT) generation; new tokens up to and including EOS."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    new = out[0, len(prompt):].tolist()
    eos = model.config.eos_token_id
    return new[:new.index(eos) + 1] if eos in new else new
