"""bdlora-ray: a tensor-parallel Llama serving thousands of BD-LoRA adapters."""

from bdlora_ray.config import LlamaConfig

__all__ = ["LlamaConfig"]
__version__ = "0.1.0"
