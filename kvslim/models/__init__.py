"""Model architectures, picked by the GGUF's ``general.architecture``.

Each module implements one family; ``ARCHITECTURES`` (``kvslim.architectures``, the one
table) maps an architecture name to its module, class and rope style, so adding one is
one file here and one line there.
"""
from __future__ import annotations

import importlib

import gguf
import torch

from kvslim.architectures import ARCHITECTURES
from kvslim.gguf_loader import GGUFError, ModelConfig

__all__ = ["ARCHITECTURES", "model_class", "load_model"]


def model_class(arch: str) -> type:
    """The class that runs ``arch``; GGUFError listing the supported ones otherwise."""
    if arch not in ARCHITECTURES:
        raise GGUFError(f"unsupported architecture '{arch}'; supported: {', '.join(ARCHITECTURES)}")
    entry = ARCHITECTURES[arch]
    return getattr(importlib.import_module(entry.module), entry.cls)


def load_model(reader: gguf.GGUFReader, config: ModelConfig, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, progress: bool = True):
    """Weights of ``reader`` loaded into the model class for ``config.arch``."""
    return model_class(config.arch).from_gguf(reader, config, device=device, dtype=dtype,
                                              progress=progress)
