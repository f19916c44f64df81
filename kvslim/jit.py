"""How numba links kvslim's kernels: each keeps its own copies of what it calls.

numba compiles a kernel's callees into it as copies marked ``linkonce_odr``, which the
object code in the disk cache turns into WEAK symbols. Loading a cached kernel, the
process resolves each weak copy to the first definition of that name it has loaded: the
callee's own compiled code, or the copy inside another kernel loaded earlier. The copies
are not the same machine code: each is optimized inside the module that linked it, and
with fastmath (``reassoc``, ``contract``) a reduction's order and its fused multiply-adds
follow the surroundings. So a cached kernel's float results depended on what the process
had run before (measured: the decode step job of ``kernels.layer`` loaded from the cache
gave another RMSNorm of the same row, by one ulp, after ``rowops._norm_rows`` had been
called on its own, and a saved cache continued with other logits in another process;
benchmarks/README.md, "The fused step's reproducibility").

``install()`` makes every such copy internal to the kernel that linked it (for kernels of
kvslim only: libraries defining a function of this package), so a kernel computes the same
bits compiled in the process or loaded from the cache, whatever else is loaded. The cost
is code size (a callee's code exists once per kernel that calls it, as it does in the
cache files already). Caches written before (weak copies) are not reused: their index
carries another version (``_VERSION``). Every kvslim module that defines a numba kernel
imports this module first.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numba
from llvmlite import binding as ll
from numba.core import caching, codegen

__all__ = ["install", "own_copies", "active"]

_PACKAGE = "_ZN6kvslim"  # numba's mangled names of this package's functions begin so
_VERSION = f"{numba.__version__}+kvslim.own-copies.1"
_installed = False
_active = False  # the patch is in place


def own_copies(module: ll.ModuleRef) -> int:
    """Make the linked-in copies (``linkonce_odr`` definitions) of ``module`` internal when
    it defines a function of this package; returns how many it changed."""
    defined = [fn for fn in module.functions if not fn.is_declaration]
    if not any(fn.name.startswith(_PACKAGE) and fn.linkage == ll.Linkage.external
               for fn in defined):
        return 0
    copies = [fn for fn in defined if fn.linkage == ll.Linkage.linkonce_odr]
    for fn in copies:
        fn.linkage = "internal"
    return len(copies)


def install() -> None:
    """Patch numba once per process (idempotent): internal copies in kvslim's kernels,
    and kvslim's cache indexes versioned apart from those written without it. A numba
    whose internals moved keeps its own linking, with one warning."""
    global _installed, _active
    if _installed:
        return
    _installed = True
    optimize = getattr(codegen.CPUCodeLibrary, "_optimize_final_module", None)
    init = getattr(caching, "IndexDataCacheFile", None)
    if optimize is None or init is None:
        warnings.warn(f"numba {numba.__version__}: kvslim cannot keep its kernels' own copies "
                      "of their callees; a kernel loaded from numba's cache may compute the "
                      "last bits differently from one compiled in the process", stacklevel=2)
        return
    init = init.__init__

    def _optimize_final_module(self):
        own_copies(self._final_module)  # after the callees are linked in, before -O3
        optimize(self)

    def __init__(self, cache_path, *args, **kwargs):
        init(self, cache_path, *args, **kwargs)
        if "kvslim" in Path(cache_path).parts:  # a cache of this package's sources
            self._version = _VERSION

    codegen.CPUCodeLibrary._optimize_final_module = _optimize_final_module
    caching.IndexDataCacheFile.__init__ = __init__
    _active = True


def active() -> bool:
    """Whether kvslim's kernels keep their own copies (``install`` could patch numba)."""
    return _active


install()
