"""The model architectures kvslim runs, said once: the GGUF's ``general.architecture``
name, the class that runs it, and how its q/k rows are laid out for RoPE.

Imports nothing, so ``gguf_loader`` (which reads the rope style) and ``kvslim plan``
read it without importing torch or the model files; ``kvslim.models.model_class``
imports the class named here on first use. Adding an architecture is one file in
``kvslim/models/`` and one line here.

Rope styles (llama.cpp's ``llama_model_rope_type``):

- "normal": rotate interleaved pairs (2i, 2i+1) of each head. llama.cpp's converter
  (convert_hf_to_gguf.py, LlamaModel.permute) reorders the rows of attn_q / attn_k of
  llama-arch models so that this layout gives the same attention as Hugging Face's
  rotate_half on the original weights.
- "neox": rotate pairs (i, i + rope_dim/2), Hugging Face's rotate_half; qwen2 weights
  are stored unpermuted.

``gguf_loader.load_weights(..., neox_qk=True)`` undoes the permutation so every
architecture can use the "neox" rotation.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["Architecture", "ARCHITECTURES"]


class Architecture(NamedTuple):
    module: str  # the module that implements it
    cls: str  # the class in that module
    rope_style: str  # "normal" or "neox"


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("kvslim.models.llama", "Llama", "normal"),
    "mistral": Architecture("kvslim.models.llama", "Llama", "normal"),
    "qwen2": Architecture("kvslim.models.llama", "Llama", "neox"),
    "qwen3": Architecture("kvslim.models.qwen3", "Qwen3", "neox"),
    "phi3": Architecture("kvslim.models.phi3", "Phi3", "neox"),
    "gemma2": Architecture("kvslim.models.gemma3", "Gemma3", "neox"),
    "gemma3": Architecture("kvslim.models.gemma3", "Gemma3", "neox"),
}
