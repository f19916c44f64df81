"""kvslim.jit: each of kvslim's numba kernels keeps its own (internal) copies of the
functions it calls, so what it computes cannot depend on which other kernels the process
loaded first (the weak copies numba writes into its cache did)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from llvmlite import binding as ll
from numba.core import caching

from kvslim import jit
from kvslim.kernels import rowops

_IR = """
define void @{own}() {{
  call void @{callee}()
  ret void
}}
define linkonce_odr void @{callee}() {{
  ret void
}}
"""


def _module(own: str, callee: str) -> ll.ModuleRef:
    return ll.parse_assembly(_IR.format(own=own, callee=callee))


def _linkage(module: ll.ModuleRef, name: str):
    return module.get_function(name).linkage


def test_linked_copies_become_internal_in_kvslim_kernels_only():
    own, callee = "_ZN6kvslim7kernels1a4mainE", "_ZN6kvslim7kernels1b6calleeE"
    m = _module(own, callee)
    assert jit.own_copies(m) == 1
    assert _linkage(m, callee) == ll.Linkage.internal
    assert _linkage(m, own) == ll.Linkage.external  # the kernel itself stays callable
    m.verify()
    other = _module("_ZN5other4mainE", callee)  # someone else's numba code: left alone
    assert jit.own_copies(other) == 0
    assert _linkage(other, callee) == ll.Linkage.linkonce_odr


def test_a_compiled_kernel_holds_no_weak_copy_of_its_callee():
    """``_add_norm_rows`` calls ``_norm_rows``: compiled afresh (no disk cache), its module
    defines the callee internal or inlines it, never as a linkonce_odr (weak) copy."""
    kernel = numba.njit(rowops._add_norm_rows.py_func)  # a new dispatcher: compiled here
    x, y = np.ones((2, 8), np.float32), np.full((2, 8), 3.0, np.float32)
    out = np.empty_like(x)
    kernel(x, y, np.ones(8, np.float32), 1e-6, out)
    np.testing.assert_allclose(out, np.ones_like(out), rtol=1e-6)  # x = 4: normed to 1
    ir = next(iter(kernel.inspect_llvm().values()))
    defines = [line for line in ir.splitlines() if line.startswith("define")]
    assert any("_add_norm_rows" in line for line in defines)
    assert not [line for line in defines if "linkonce_odr" in line and "kvslim" in line]


def test_kvslim_cache_indexes_carry_their_own_version(tmp_path):
    ours = caching.IndexDataCacheFile(str(tmp_path / "kvslim" / "__pycache__"), "a-1", (0, 0))
    theirs = caching.IndexDataCacheFile(str(tmp_path / "other"), "a-1", (0, 0))
    assert ours._version == jit._VERSION != numba.__version__
    assert theirs._version == numba.__version__


_LOADED_CHILD = textwrap.dedent("""
    import numba
    import numpy as np
    from kvslim import heap
    from kvslim.kernels import rowops

    trims = []
    trim = heap.trim
    heap.trim = lambda device="cpu": trims.append(device) or trim(device)

    def rows():
        return (np.ones((2, 8), np.float32), np.full((2, 8), 3.0, np.float32),
                np.ones(8, np.float32), np.empty((2, 8), np.float32))

    x, y, w, out = rows()
    rowops._add_norm_rows(x, y, w, 1e-6, out)
    library = next(iter(rowops._add_norm_rows.overloads.values())).library
    released = library._shared_module is None and hasattr(library, "_linking_bitcode")

    @numba.njit
    def caller(x, y, w, out):  # compiled here: links the kernel's library in
        rowops._add_norm_rows(x, y, w, 1e-6, out)
        return out.sum()

    x, y, w, out = rows()
    total, parsed = caller(x, y, w, out), library._shared_module is not None
    small = len(trims)  # none: the kernel's bitcode is under jit.TRIM_BITCODE_BYTES
    from kvslim import warmup
    warmup._layer_job("q8_0")  # the decode step job: over 1 MB of bitcode
    print(released, total, parsed, small, len(trims))
""")


@pytest.mark.skipif(not jit.active(), reason="kvslim.jit's patch is not in place")
def test_a_cached_kernel_drops_its_module_for_linking_and_parses_it_again_when_linked():
    """Loaded from the disk cache, a kvslim kernel holds no parsed LLVM module for
    linking; a function compiled later that calls it parses the module from the kept
    bitcode and computes the same. The heap is trimmed after a large module's release.
    The first child may compile (and save the cache); the second loads it."""
    runs = [subprocess.run([sys.executable, "-c", _LOADED_CHILD], capture_output=True, text=True,
                           timeout=300, check=True).stdout.split() for _ in range(2)]
    released, total, parsed, small, big = runs[1]
    assert released == "True" and parsed == "True", runs
    assert small == "0" and int(big) >= 1, runs  # the heap trimmed after the large module only
    assert float(total) == pytest.approx(16.0, rel=1e-6)  # (1 + 3) normed to 1, 16 values


def test_only_a_kvslim_module_loaded_as_object_code_is_released():
    """``release_linking_module`` drops the module (keeping the bitcode) for kvslim's
    libraries in numba's "object" form only: someone else's numba code, the "bitcode"
    form and a form it does not know keep what numba keeps."""
    class Library:
        def __init__(self, module):
            self._shared_module = module

    ours, theirs = _module("_ZN6kvslim7kernels1a4mainE", "c"), _module("_ZN5other4mainE", "c")
    bitcode = ours.as_bitcode()
    lib = Library(ours)
    assert jit.release_linking_module(lib, ("k", "object", (b"obj", bitcode)))
    assert lib._shared_module is None and lib._linking_bitcode == bitcode
    for module, state in ((theirs, ("k", "object", (b"obj", bitcode))), (ours, ("k", "bitcode", bitcode)),
                          (ours, ("k", "object", b"no")), (ours, ("k", "object"))):
        lib = Library(module)
        assert not jit.release_linking_module(lib, state), state
        assert lib._shared_module is module and not hasattr(lib, "_linking_bitcode")


_BLAS_CHILD = textwrap.dedent("""
    import sys
    import numba
    import numpy as np
    from kvslim.kernels import rowops

    x = np.ones((2, 8), np.float32)
    out = np.empty_like(x)
    rowops._add_norm_rows(x, x, np.ones(8, np.float32), 1e-6, out)  # numba's registries load
    before = "scipy.linalg" in sys.modules
    import numba.np.arraymath as arraymath

    @numba.njit
    def products(a, b, u, v):  # BLAS through scipy: numba imports it to compile this
        return np.dot(a, b), np.vdot(u, v)

    rng = np.random.default_rng(0)
    a, b, u, v = rng.random((3, 4)), rng.random((4, 2)), rng.random(5), rng.random(5)
    ab, uv = products(a, b, u, v)
    print(before, arraymath._HAVE_BLAS, "scipy.linalg" in sys.modules,
          np.allclose(ab, a @ b, rtol=1e-12), np.isclose(uv, u @ v, rtol=1e-12))
""")


def test_scipy_is_imported_only_when_a_function_needs_blas():
    """Running a kvslim kernel does not import scipy.linalg (numba's BLAS check is
    answered from disk); a user's function calling np.dot / np.vdot still compiles with
    BLAS (arraymath's check says it is there), imports scipy and computes right."""
    pytest.importorskip("scipy.linalg")
    out = subprocess.run([sys.executable, "-c", _BLAS_CHILD], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    assert out == ["False", "True", "True", "True", "True"], out


def test_blas_check_finds_scipys_blas_module_on_disk(tmp_path, monkeypatch):
    """``scipy_blas_present`` returns when scipy's linalg has a cython_blas extension
    module, and raises numba's ImportError when it has not or scipy is not installed."""
    import importlib.machinery
    import importlib.util
    from types import SimpleNamespace

    package = tmp_path / "scipy"
    (package / "linalg").mkdir(parents=True)
    (package / "linalg" / "cython_blas.pxd").write_text("")  # a header is no module
    spec = SimpleNamespace(submodule_search_locations=[str(package)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == "scipy" else None)
    with pytest.raises(ImportError, match="scipy 0.16"):
        jit.scipy_blas_present()
    (package / "linalg" / f"cython_blas{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    jit.scipy_blas_present()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="scipy 0.16"):
        jit.scipy_blas_present()
