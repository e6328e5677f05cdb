"""What bdlora_ray.synthetic writes loads in HF transformers and PEFT, and our
model agrees with them on it."""

from __future__ import annotations

import torch

from bdlora_ray.comm import Comm
from bdlora_ray.config import LlamaConfig
from bdlora_ray.synthetic import random_adapter, write_peft_adapter, write_random_checkpoint
from bdlora_ray.tokenizer import load_tokenizer
from reference import hf_logits
from tp_harness import Job, run

CFG = LlamaConfig.from_name("tiny")


def test_random_checkpoint_and_adapters_load_in_hf_and_peft(tmp_path):
    ckpt = write_random_checkpoint(CFG, tmp_path / "tiny", seed=4)
    assert LlamaConfig.from_json(ckpt, name="tiny") == CFG
    assert load_tokenizer(ckpt).decode(load_tokenizer(ckpt).encode("héllo", add_special_tokens=False)) == "héllo"
    lora = write_peft_adapter(random_adapter(CFG, 8, ("q_proj", "v_proj", "down_proj"), seed=1), tmp_path / "lora")
    bd = write_peft_adapter(random_adapter(CFG, 8, nblocks=2, seed=2), tmp_path / "bd")
    prompt = [5, 17, 300, 2, 999, 41]
    out, _ = run(Job(CFG, str(ckpt), {"lora": (str(lora), "replicated"), "bd": (str(bd), "replicated")},
                     [(None, prompt), ("lora", prompt), ("bd", prompt)]), Comm())
    for i, adapter in enumerate([None, lora, bd]):
        ref = hf_logits(ckpt, torch.tensor(prompt), adapter)
        assert (out[f"single.{i}"] - ref).abs().max() <= 1e-4
        if adapter is not None:  # the adapter really changes the output
            assert (ref - hf_logits(ckpt, torch.tensor(prompt))).abs().max() > 1e-2
