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

A kernel loaded from the cache also keeps, beside its machine code, its LLVM module "for
linking" (parsed from the cache's bitcode), which numba needs only if another function
compiled later calls the kernel. For kvslim's kernels the module is parsed again from the
bitcode when that happens, and dropped at load (``release_linking_module``): the parsed
modules held 24 MiB of the process's heap for the kernels a model runs (the decode step
job alone 4.6 MB of IR as text), against 1.7 MB of bitcode. The parse's freed pages go back
to the system (``heap.trim``) after a large one (the decode step job's: 18 MiB).

numba also asks, when it first compiles or loads anything, whether BLAS is there for
``np.dot`` by importing ``scipy.linalg`` (with ``numpy.f2py`` and charset_normalizer's
tables behind it: 16 MiB resident), which kvslim's kernels never call. ``defer_scipy``
answers that question by finding scipy's ``cython_blas`` module on disk instead; numba
still imports scipy (and checks its integer width) when a function using BLAS compiles.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import warnings
from pathlib import Path

import numba
from llvmlite import binding as ll
from numba.core import caching, codegen

from kvslim import heap

__all__ = ["install", "own_copies", "active", "release_linking_module", "defer_scipy",
           "scipy_blas_present"]

_PACKAGE = "_ZN6kvslim"  # numba's mangled names of this package's functions begin so
_VERSION = f"{numba.__version__}+kvslim.own-copies.1"
TRIM_BITCODE_BYTES = 256 << 10  # a released module parsed from this much bitcode: trim
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


def _defines_ours(module: ll.ModuleRef) -> bool:
    return any(not fn.is_declaration and fn.name.startswith(_PACKAGE) for fn in module.functions)


def release_linking_module(library, state) -> bool:
    """Drop the LLVM module for linking of a kvslim ``library`` just loaded from the cache
    (``state``: numba's serialized form, kind "object"), keeping its bitcode to parse again
    if a function compiled later links it in; whether it dropped one."""
    try:
        _, kind, (_, bitcode) = state  # (name, "object", (object code, bitcode))
    except (TypeError, ValueError):  # another kind, or another numba's form: left alone
        return False
    module = getattr(library, "_shared_module", None)
    if kind != "object" or not isinstance(bitcode, bytes) or module is None or not _defines_ours(module):
        return False
    library._linking_bitcode = bitcode
    library._shared_module = None
    return True


def scipy_blas_present() -> None:
    """numba's ``ensure_blas`` without the import: returns when an installed scipy has its
    ``linalg.cython_blas`` extension module, else ImportError (numba's own message)."""
    spec = importlib.util.find_spec("scipy")
    dirs = (spec.submodule_search_locations or []) if spec is not None else []
    names = [f"cython_blas{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    if not any((Path(d) / "linalg" / n).is_file() for d in dirs for n in names):
        raise ImportError("scipy 0.16+ is required for linear algebra")


def defer_scipy() -> bool:
    """Patch numba's CPU target so that loading its registries (the first compile or
    cache load) asks ``scipy_blas_present`` where ``numba.np.arraymath`` checks for BLAS at
    import, instead of importing scipy; whether it patched (not when arraymath is already
    imported or numba's internals moved)."""
    from numba.core import cpu

    load = cpu.CPUContext.__dict__.get("load_additional_registries")
    if load is None or "numba.np.arraymath" in sys.modules:
        return False

    def load_additional_registries(self):  # on every refresh: arraymath's check once
        if "numba.np.arraymath" in sys.modules:
            return load(self)
        from numba.np import linalg

        real = getattr(linalg, "ensure_blas", None)
        if real is None:
            return load(self)
        linalg.ensure_blas = scipy_blas_present  # what arraymath imports and calls at import
        try:
            return load(self)
        finally:
            linalg.ensure_blas = real  # linalg's own overloads call the real one when typed
            arraymath = sys.modules.get("numba.np.arraymath")
            if getattr(arraymath, "ensure_blas", None) is scipy_blas_present:
                arraymath.ensure_blas = real

    cpu.CPUContext.load_additional_registries = load_additional_registries
    return True


def install() -> None:
    """Patch numba once per process (idempotent): internal copies in kvslim's kernels,
    and kvslim's cache indexes versioned apart from those written without it. A numba
    whose internals moved keeps its own linking, with one warning."""
    global _installed, _active
    if _installed:
        return
    _installed = True
    defer_scipy()
    optimize = getattr(codegen.CPUCodeLibrary, "_optimize_final_module", None)
    init = getattr(caching, "IndexDataCacheFile", None)
    unserialize = codegen.CPUCodeLibrary.__dict__.get("_unserialize")
    link = getattr(codegen.CPUCodeLibrary, "_get_module_for_linking", None)
    if optimize is None or init is None or not isinstance(unserialize, classmethod) or link is None:
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

    def _unserialize(cls, codegen_, state):
        library = unserialize.__func__(cls, codegen_, state)
        if release_linking_module(library, state) and len(library._linking_bitcode) >= TRIM_BITCODE_BYTES:
            heap.trim()
        return library

    def _get_module_for_linking(self):
        bitcode = self.__dict__.pop("_linking_bitcode", None)
        if bitcode is not None and self._shared_module is None:  # released at load
            self._shared_module = ll.parse_bitcode(bitcode)
        return link(self)

    codegen.CPUCodeLibrary._optimize_final_module = _optimize_final_module
    codegen.CPUCodeLibrary._unserialize = classmethod(_unserialize)
    codegen.CPUCodeLibrary._get_module_for_linking = _get_module_for_linking
    caching.IndexDataCacheFile.__init__ = __init__
    _active = True


def active() -> bool:
    """Whether kvslim's kernels keep their own copies (``install`` could patch numba)."""
    return _active


install()
