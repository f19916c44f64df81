"""Model architectures, picked by the GGUF's ``general.architecture``.

Each module implements one family; ``ARCHITECTURES`` maps an architecture name to
``(module, class)`` so adding one is one file and one line here.
"""
from __future__ import annotations

import importlib

import gguf
import torch

from kvslim.gguf_loader import GGUFError, ModelConfig

ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("kvslim.models.llama", "Llama"),
    "mistral": ("kvslim.models.llama", "Llama"),
    "qwen2": ("kvslim.models.llama", "Llama"),
    "qwen3": ("kvslim.models.qwen3", "Qwen3"),
    "phi3": ("kvslim.models.phi3", "Phi3"),
    "gemma2": ("kvslim.models.gemma3", "Gemma3"),
    "gemma3": ("kvslim.models.gemma3", "Gemma3"),
}

__all__ = ["ARCHITECTURES", "model_class", "load_model"]


def model_class(arch: str) -> type:
    """The class that runs ``arch``; GGUFError listing the supported ones otherwise."""
    if arch not in ARCHITECTURES:
        raise GGUFError(f"unsupported architecture '{arch}'; supported: {', '.join(ARCHITECTURES)}")
    module, name = ARCHITECTURES[arch]
    return getattr(importlib.import_module(module), name)


def load_model(reader: gguf.GGUFReader, config: ModelConfig, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, progress: bool = True):
    """Weights of ``reader`` loaded into the model class for ``config.arch``."""
    return model_class(config.arch).from_gguf(reader, config, device=device, dtype=dtype,
                                              progress=progress)
