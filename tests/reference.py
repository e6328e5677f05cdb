"""External references for the tests: a random HF Llama checkpoint, PEFT
adapters (ordinary and BD-LoRA) with random nonzero weights, and the logits
HF transformers + PEFT give for them."""

from __future__ import annotations

from pathlib import Path

import torch

from bdlora_ray.config import LlamaConfig

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BD_A = ["o_proj", "down_proj"]                                # row-parallel: A block-diagonal
BD_B = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]  # column-parallel: B block-diagonal


def make_checkpoint(cfg: LlamaConfig, path: Path, seed: int = 0) -> Path:
    """Save a randomly initialised HF LlamaForCausalLM (float32, safetensors)."""
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(HFConfig(**cfg.to_hf()))
    with torch.no_grad():  # HF's init (std 0.02) makes near-uniform logits; widen it
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_adapter(checkpoint: Path, path: Path, rank: int = 8, targets: list[str] | None = None,
                 nblocks: int | None = None, alpha: float = 16.0, seed: int = 1, rslora: bool = False) -> Path:
    """Save a PEFT LoRA (or BD-LoRA when nblocks is set) with random nonzero A and B."""
    from peft import BdLoraConfig, LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    targets = targets or ALL_TARGETS
    bd = None
    if nblocks is not None:
        bd = BdLoraConfig(target_modules_bd_a=[t for t in BD_A if t in targets],
                          target_modules_bd_b=[t for t in BD_B if t in targets], nblocks=nblocks)
    base = LlamaForCausalLM.from_pretrained(checkpoint)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                        use_rslora=rslora, **({"use_bdlora": bd} if bd else {}))
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


@torch.no_grad()
def hf_logits(checkpoint: Path, input_ids: torch.Tensor, adapter: Path | None = None) -> torch.Tensor:
    """Logits (L, vocab) of HF LlamaForCausalLM, with the PEFT adapter applied when given."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model(input_ids[None]).logits[0].float()
