"""kvslim.heap: glibc maps a prompt's large activations instead of keeping them."""
import os
import subprocess
import sys
import textwrap

import pytest

from kvslim import heap

_CHILD = textwrap.dedent("""
    import re, sys
    import torch
    from kvslim import heap

    def rss():
        return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024

    print(heap.tune("cpu"))
    first = torch.ones(2 << 20)  # 8 MiB: mapped, and freed (glibc's threshold moves up)
    del first
    base = rss()
    blocks = [torch.ones(2 << 20) for _ in range(12)]  # 96 MiB in use
    del blocks[:-1]  # 88 MiB freed, the last block kept
    print(rss() - base)
""")


def _child(env: dict) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout.split()
    return out[0], int(out[1])


_TRIM_CHILD = textwrap.dedent("""
    import re
    import numpy as np
    from kvslim import heap

    def rss():
        return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024

    heap.tune("cpu")  # the mapping threshold 4 MiB: blocks of 1 MiB come from the heap
    blocks = [np.ones(1 << 17) for _ in range(100)]  # 100 MiB
    del blocks[:-1]  # 99 MiB freed below the last block, which keeps the heap's top
    before = rss()
    print(heap.trim("cpu"), before - rss())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._glibc() is None,
                    reason="glibc's malloc_trim")
def test_trim_gives_a_heaps_free_pages_back():
    """Blocks under the mapping threshold stay in glibc's heap when freed (the heap's top
    is held): ``trim`` gives their pages back, unless ``KVSLIM_HEAP=glibc``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVSLIM_HEAP", "MALLOC_"))}
    for extra, ran, low, high in (({}, "True", 80, 200), ({heap.ENV: "glibc"}, "False", -5, 5)):
        out = subprocess.run([sys.executable, "-c", _TRIM_CHILD], capture_output=True, text=True,
                             env=env | extra, timeout=120, check=True).stdout.split()
        assert out[0] == ran and low <= int(out[1]) <= high, out  # MB given back


def test_the_engine_trims_after_a_long_prompt_step_only(tiny_parts, monkeypatch):
    """``Engine`` calls ``heap.trim`` after a step with ``TRIM_MIN_ROWS`` prompt rows or
    more: not after decode steps or a short prompt's."""
    from kvslim.engine import Engine
    from kvslim.sampling import SamplingParams

    model, tok = tiny_parts
    e = Engine(model, tok, num_ctx=128, page_size=16)
    e.add_request([1, 5], SamplingParams(max_tokens=2, temperature=0))
    while e.has_work():  # the kernels loaded first (kvslim.jit trims after a large one)
        e.step()
    calls = []
    monkeypatch.setattr(heap, "trim", lambda device="cpu": calls.append(str(device)) or True)
    for prompt, want in (([1, 5, 7], 0), ([1] + [9] * (heap.TRIM_MIN_ROWS - 1), 1)):
        calls.clear()
        e.add_request(prompt, SamplingParams(max_tokens=4, temperature=0))
        while e.has_work():
            e.step()
        assert calls == ["cpu"] * want


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._glibc() is None,
                    reason="glibc's mallopt")
def test_freed_large_blocks_go_back_to_the_system_unless_told_to_keep_glibcs_way():
    # the child imports torch first: glibc's setting alone, without torch's huge pages
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KVSLIM_HEAP", "MALLOC_", "THP_MEM_ALLOC"))}
    set_to, kept = _child(env)
    assert set_to == str(heap.MMAP_THRESHOLD) and kept < 30  # MB still resident of the 88 freed
    set_to, kept = _child(env | {heap.ENV: "glibc"})
    assert set_to == "None" and kept > 60  # glibc kept the freed blocks in its heap


def test_heap_setting(monkeypatch):
    monkeypatch.setenv(heap.ENV, "GLIBC")
    assert heap.mode() == "glibc" and heap.tune("cpu") is None
    monkeypatch.setenv(heap.ENV, "")
    assert heap.mode() == "mapped"
    assert heap.tune("cuda:0") is None and heap.tune("mps") is None
    monkeypatch.setenv(heap.ENV, "small")
    with pytest.raises(ValueError, match=heap.ENV):
        heap.mode()


def test_torch_huge_pages_default_follows_the_setting_and_the_user(monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    monkeypatch.setenv(heap.ENV, "glibc")
    heap.huge_pages_default()
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # the user's choice stays
    monkeypatch.delenv(heap.ENV)
    heap.huge_pages_default()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    heap.huge_pages_default()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
