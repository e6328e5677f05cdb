"""Convert a GGUF Llama checkpoint into an HF one (safetensors, config.json,
tokenizer with its chat template) that HF transformers and `bdlora_ray.tp` read.

HF transformers does the reading: it dequantizes the GGUF tensors to float32
and undoes llama.cpp's Q/K row permutation, so the converted checkpoint is
exactly the model transformers runs from the GGUF file. A GGUF-loaded model
refuses `save_pretrained` (it carries a quantization config), so the state
dict and a clean config are written here.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

log = logging.getLogger(__name__)

# Keys of a GGUF-loaded config that describe where it came from, not the model.
_SOURCE_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version")


def clean_config(hf: dict) -> dict:
    """The HF config dict of a GGUF-loaded Llama, as a plain float32 checkpoint's config.json."""
    hf = {k: v for k, v in hf.items() if k not in _SOURCE_KEYS}
    hf["architectures"] = ["LlamaForCausalLM"]
    hf["torch_dtype"] = hf["dtype"] = "float32"
    return hf


def convert_gguf(gguf_file: str | Path, out: str | Path) -> Path:
    """Write the HF checkpoint of `gguf_file` to `out` (kept if `out` already has one).

    Written beside `out` and renamed, so an interrupted run never leaves half a checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out = Path(gguf_file), Path(out)
    if (out / "config.json").is_file():
        return out
    log.info("converting %s to an HF checkpoint in %s (once)", gguf_file.name, out)
    src, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)  # dequantized to float32
    if model.config.model_type != "llama":
        raise ValueError(f"{gguf_file}: a {model.config.model_type!r} model, not a Llama")
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding: stored once, as HF does
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(clean_config(model.config.to_dict()), indent=2))
        model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
