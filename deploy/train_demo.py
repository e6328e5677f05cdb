"""Train the demo adapters with PEFT on SmolLM2-135M-Instruct, on the CPU.

    python -m deploy.train_demo            # all of them, into deploy/demo_adapters/
    python -m deploy.train_demo --only json --steps 30

Reproduces the committed adapters. Each teaches one answer style of
`deploy.demo_data` on short chat-formatted examples (the prompt rendered with
the checkpoint's chat template, the loss on the answer and its `<|im_end|>`
only). A framing style (JSON, emoji) is a small change: ten steps of two
examples at a high learning rate teach it; upper case changes every token and
takes twenty at a gentler rate. A step takes well under a second on an idle
core (seconds on a crowded one). Saved in bf16, as PEFT writes them
otherwise, so the repository carries a few MB.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deploy.demo_data import STYLES, training_pairs

log = logging.getLogger("deploy.train_demo")

ADAPTERS_DIR = Path(__file__).resolve().parent / "demo_adapters"


@dataclass(frozen=True)
class DemoAdapterSpec:
    name: str
    style: str                          # a key of deploy.demo_data.STYLES
    rank: int
    targets: tuple[str, ...]
    nblocks: int | None                 # BD-LoRA with this many blocks (the TP degree), else ordinary LoRA
    mode: str                           # how the embedded set-up pushes it: replicated | slora | bd
    steps: int = 10
    lr: float = 1e-2
    seed: int = 0


# SmolLM2-135M has 9 heads and 3 KV heads: TP=3, so BD-LoRA with nblocks=3 (rank divisible by 3).
DEMO_SPECS = (
    # Rank 8 at TP=3: served replicated (slora needs the rank divisible by the TP degree).
    DemoAdapterSpec("json", "json", rank=8, targets=("q_proj", "v_proj", "o_proj"), nblocks=None,
                    mode="replicated"),
    # Rank 6, divisible by 3: an ordinary LoRA served slora at TP=3 (the tests also serve it replicated).
    # Upper case is a change of tokens, not only a frame: more steps at a gentler rate.
    DemoAdapterSpec("shout", "shout", rank=6, targets=("q_proj", "v_proj", "o_proj"), nblocks=None, mode="slora",
                    steps=20, lr=5e-3),
    DemoAdapterSpec("sparkle", "sparkle", rank=6, targets=("q_proj", "v_proj", "o_proj"), nblocks=3, mode="bd"),
)
BD_A, BD_B = ("o_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def examples(tokenizer, style: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids as the server renders them, answer ids ending with EOS) per training question."""
    render, eos = STYLES[style].render, tokenizer.eos_token_id
    out = []
    for q, a in training_pairs():
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        out.append((list(prompt), tokenizer.encode(render(a), add_special_tokens=False) + [eos]))
    return out


def batch_tensors(batch: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask, and the (row, position) of every answer token's prediction."""
    n = max(len(p) + len(a) for p, a in batch)
    ids = torch.full((len(batch), n), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    rows, cols, labels = [], [], []
    for i, (p, a) in enumerate(batch):
        seq = p + a
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        for j in range(len(p), len(seq)):  # the logits at j - 1 predict token j
            rows.append(i), cols.append(j - 1), labels.append(seq[j])
    return ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(labels)


def train(spec: DemoAdapterSpec, base_dir: Path, out_dir: Path, batch_size: int = 2) -> Path:
    from peft import BdLoraConfig, LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    data = examples(tokenizer, spec.style)
    bd = None
    if spec.nblocks is not None:
        bd = BdLoraConfig(target_modules_bd_a=[t for t in BD_A if t in spec.targets],
                          target_modules_bd_b=[t for t in BD_B if t in spec.targets], nblocks=spec.nblocks)
    config = LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, target_modules=list(spec.targets),
                        lora_dropout=0.0, task_type="CAUSAL_LM", **({"use_bdlora": bd} if bd else {}))
    model = get_peft_model(LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32), config)
    causal_lm = model.base_model.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * (1 - s / spec.steps))
    rng = random.Random(spec.seed)
    order: list[int] = []
    bar = tqdm(range(spec.steps), desc=f"training {spec.name}", unit="step")
    model.train()
    for _ in bar:
        if len(order) < batch_size:
            order += rng.sample(range(len(data)), len(data))
        batch, order = [data[i] for i in order[:batch_size]], order[batch_size:]
        ids, mask, rows, cols, labels = batch_tensors(batch, tokenizer.pad_token_id or 0)
        hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        logits = causal_lm.lm_head(hidden[rows, cols])   # only the answer positions: (N, vocab)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    path = out_dir / spec.name
    model.save_pretrained(str(path), safe_serialization=True)
    _finish(path, base_name=base_dir.name)
    return path


def _finish(path: Path, base_name: str) -> None:
    """bf16 weights (half the bytes; exact in the float32 model) and the base model's served name."""
    weights = path / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(weights)).items()}, str(weights),
              metadata={"format": "pt"})
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = base_name
    if isinstance(cfg.get("target_modules"), list):  # PEFT writes a set's order: sorted, a rerun writes the same bytes
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    readme = path / "README.md"
    readme.unlink(missing_ok=True)  # PEFT's model-card stub


def main(argv: list[str] | None = None) -> int:
    from deploy.seed import smollm2_checkpoint

    p = argparse.ArgumentParser(prog="python -m deploy.train_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=[s.name for s in DEMO_SPECS], help="train only these")
    p.add_argument("--steps", type=int, help="override every adapter's number of steps")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, help="override every adapter's learning rate")
    p.add_argument("--out", type=Path, default=ADAPTERS_DIR)
    p.add_argument("--state-dir", type=Path, default=Path(".bdlora"), help="where the converted base model lives")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = smollm2_checkpoint(args.state_dir)
    for spec in DEMO_SPECS:
        if args.only and spec.name not in args.only:
            continue
        overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v}
        spec = DemoAdapterSpec(**{**spec.__dict__, **overrides})
        log.info("wrote %s", train(spec, base, args.out, args.batch_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
