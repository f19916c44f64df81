"""Weights kept as GGUF blocks: matmul kernels per type, and whole models, vs the floor.

    python benchmarks/weights.py                         # kernels, then SmolLM2 + synthetic 1B
    python benchmarks/weights.py --only kernels          # per-type GEMV GB/s, prefill ratio
    python benchmarks/weights.py --only core             # the dots' compute ceiling, one thread
    python benchmarks/weights.py --only models --models smollm2 --lengths 512 --decode 8
    python benchmarks/weights.py --big                   # adds the synthetic 8B Q4_K_M

Kernels: for each weight type, y = x @ W.T on a 2048 x 8192 and an 8192 x 2048 matrix,
one input row (decode): GB/s of weight bytes read by the float fused dot and by the
integer dot (x quantized to 15-bit integers per 32 values), timed in turn, beside the streaming-read
bandwidth measured in the same run (the floor: a GEMV cannot beat it); float32 ``F.linear`` and
torch's own int4 weight-only kernel (``_weight_int4pack_mm_for_cpu``, which can hold
Q4_0/Q4_1/Q4_K groups exactly after a repacking copy) as candidates; and 512 input rows
(prefill) as time relative to float32 ``F.linear`` on the same shape.

Models: each (model, weights mode) loads in a fresh process, so resident memory (RSS)
after load is its own: load time, RSS after load, RSS at the end (the steady state: every
weight page touched, the last length's K/V pools held), peak RSS over the whole run (the
prefill's activations too), then prefill and
decode tok/s per prompt length and cache type (``generate.interleaved``: the types'
engines share the weights and step in turn). llama.cpp on the same file, in the same
way, when ``import llama_cpp`` works. Synthetic models (``synth_model.py``) are written
on first use under /work/models/synth. Numbers drift with machine load: compare rows of
one run; the load average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[0]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate import _timed, interleaved, prompt_ids, read_bandwidth  # noqa: E402

T = gguf.GGMLQuantizationType
SYNTH = Path(os.environ.get("KVSLIM_SYNTH_DIR", "/work/models/synth"))
KERNEL_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.F16,
                T.Q5_1, T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS, T.BF16, T.F32)


def best_of(fn, repeat: int) -> float:
    fn()
    return min(_timed(fn) for _ in range(repeat))


def best_of_pair(fa, fb, repeat: int) -> tuple[float, float]:
    """Best times of fa and fb, timed in turn (a load change hits both alike)."""
    return best_of_turns([fa, fb], repeat)


def best_of_turns(fns, repeat: int) -> list[float]:
    """Best time of each of fns, timed in turn."""
    for f in fns:
        f()
    ts = [[_timed(f) for f in fns] for _ in range(repeat)]
    return [min(t[i] for t in ts) for i in range(len(fns))]


def unfused(lin):
    """The GEMV through the row buffer for every type (the kernel before the fused dots)."""
    return gemv_with(lin, fused=False)


def gemv_with(lin, **kw):
    """The GEMV of ``lin`` with ``qmatmul.gemv``'s keywords (fused, ints)."""
    from kvslim.kernels import qmatmul as qm

    def run(x):
        y = torch.empty(x.shape[0], lin.n_out)
        qm.gemv(lin.data, lin.parts, lin.work, x.numpy(), y.numpy(), **kw)
        return y
    return run


# ---------------------------------------------------------------- kernels


def random_qtensor(qt, rows: int, cols: int, rng):
    """A QTensor of random bytes with finite fp16 scales (speed does not depend on values)."""
    from kvslim.kernels.qmatmul_ref import random_blocks
    from kvslim.weights import QTensor

    b = random_blocks(qt, rows, cols, rng).reshape(-1)
    b.flags.writeable = False
    return QTensor(b, 0, qt, (rows, cols))


def int4pack(rows: int, cols: int):
    """torch's int4 weight-only matmul on a repacked [rows, cols] 4-bit matrix (groups of 32)."""
    aten = torch.ops.aten
    packed = aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (rows, cols), dtype=torch.int32), 8)
    sz = torch.rand(cols // 32, rows, 2) * 0.01
    return lambda x: aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)


def bench_kernels(types, shapes, repeat: int, bw: float) -> None:
    from kvslim.kernels import qmatmul as qm
    from kvslim.kernels.qchoice import gemv_ints
    from kvslim.weights import QLinear

    rng = np.random.default_rng(0)
    chosen = gemv_ints()
    print(f"\n## GEMV, one input row: weight GB/s (floor: streaming read {bw / 1e9:.1f} GB/s)")
    print("(ms, GB/s: the float fused dot; int: the integer dot (x quantized per 32 values), timed in"
          " turn with it;\n buffer: x time of the unfused row-buffer GEMV, also in turn;"
          " runs: the dot kernels/qchoice picks here)")
    print(f"{'type':<8}{'shape':>12}{'MB':>8}{'ms':>8}{'GB/s':>7}{'of floor':>10}{'int ms':>8}{'int GB/s':>9}"
          f"{'of floor':>10}{'M=512 vs f32':>14}{'buffer':>8}{'runs':>6}")
    for rows, cols in shapes:
        x1, xp = torch.randn(1, cols), torch.randn(512, cols)
        w = torch.randn(rows, cols)
        f32_1 = best_of(lambda: F.linear(x1, w), repeat)
        f32_p = best_of(lambda: F.linear(xp, w), max(2, repeat // 4))
        rows_out = [("f32", rows * cols * 4, f32_1, None, 1.0, None, "")]
        try:
            mm = int4pack(rows, cols)
            t1, tp = best_of(lambda: mm(x1), repeat), best_of(lambda: mm(xp), max(2, repeat // 4))
            rows_out.append(("int4pack", rows * cols // 2 + rows * cols // 32 * 8, t1, None, tp / f32_p, None, ""))
        except (RuntimeError, AttributeError) as e:  # not in every torch build
            print(f"# torch int4pack unavailable: {e}")
        for qt in types:
            lin = QLinear([random_qtensor(qt, rows, cols, rng)])
            code = int(lin.parts[0, 2])
            fns = [gemv_with(lin), unfused(lin)] + ([gemv_with(lin, ints=qm.INT_DOTS)] if qm.INT_DOTS[code] else [])
            ts = best_of_turns([lambda f=f: f(x1) for f in fns], repeat)
            tp = best_of(lambda: lin(xp), max(2, repeat // 4))
            runs = "" if not qm.INT_DOTS[code] else "int" if chosen[code] else "float"
            rows_out.append((qt.name, lin.qtensors[0].nbytes, ts[0], ts[2] if len(ts) > 2 else None,
                             tp / f32_p, ts[1] / ts[0], runs))
        for name, nbytes, t1, t_int, rel, speedup, runs in rows_out:
            gbs = nbytes / t1 / 1e9
            ints = (f"{t_int * 1e3:>8.2f}{nbytes / t_int / 1e9:>9.1f}{nbytes / t_int / bw:>10.0%}"
                    if t_int else " " * 27)
            print(f"{name:<8}{f'{rows}x{cols}':>12}{nbytes / 1e6:>8.1f}{t1 * 1e3:>8.2f}{gbs:>7.1f}"
                  f"{gbs * 1e9 / bw:>10.0%}{ints}{rel:>14.2f}"
                  f"{'' if speedup is None else f'{speedup:>8.2f}'}{runs:>6}", flush=True)


def bench_core(types, repeat: int) -> None:
    """The dots' compute ceiling: one thread dotting one input row with a 64 x 2048 matrix
    (in L2) over and over, in thread CPU time (a busy machine's other processes do not
    count), float fused and integer dot timed in turn; where the CPU has VNNI, also the
    integer dot built without it (``qmatmul._make_idot(vnni=False)``)."""
    from numba import njit
    from numba.core.registry import cpu_target

    from kvslim.kernels import qmatmul as qm
    from kvslim.kernels.qtypes import CODES

    # one loop a dot: a loop holding both dots behind a branch ran the integer one 20-30%
    # slower than a loop of its own (Zen 4), which is what gemv runs
    @njit(fastmath=True)
    def float_loop(code, d, rb, rows, k, x, xs, xq, xd, xs32, xs16, reps):
        t = np.float32(0)
        for _ in range(reps):
            for j in range(rows):
                t += qm._dot(code, d, j * rb, k, x, xs)
        return t

    @njit(fastmath=True)
    def int_loop(code, d, rb, rows, k, x, xs, xq, xd, xs32, xs16, reps):
        t = np.float32(0)
        for _ in range(reps):
            for j in range(rows):
                t += qm._idot(code, d, j * rb, k, xq, xd, xs32, xs16)
        return t

    def loop_of(dot, per):
        @njit(fastmath=True)
        def plain(code, d, rb, rows, k, x, xs, xq, xd, xs32, xs16, reps):
            t = np.float32(0)
            for _ in range(reps):
                for j in range(rows):
                    t += dot(d, j * rb, k // per, xq, xd, xs32, xs16)
            return t
        return plain

    vnni = qm._vnni(cpu_target.target_context)
    rng = np.random.default_rng(0)
    rows, cols, reps = 64, 2048, 200
    print("\n## Dot compute ceiling: one thread, matrix in L2, GB/s of weight bytes in thread CPU time")
    print(f"(no VNNI: the integer dot without vpdpbusd, timed in turn; this CPU has VNNI: {'yes' if vnni else 'no'})")
    print(f"{'type':<8}{'float GB/s':>12}{'int GB/s':>10}{'int / float':>13}{'no VNNI GB/s':>14}")
    for qt in types:
        code = CODES[qt]
        if not qm.INT_DOTS[code]:
            continue
        q = random_qtensor(qt, rows, cols, rng)
        x = rng.standard_normal((1, cols)).astype(np.float32)
        (xq, xd, xs32, xs16), xs = qm.quantize_rows(x), qm.sums16(x)
        args = (code, q.data, q.row_bytes, rows, cols, x[0], xs[0], xq[0], xd[0], xs32[0], xs16[0])
        runs = [lambda n: float_loop(*args, n), lambda n: int_loop(*args, n)]
        if vnni:
            block = qm.IDOT_BLOCKS[code]
            runs.append(lambda n, f=loop_of(qm._make_idot(*block, vnni=False), block[1]): f(*args, n))
        ts = [[] for _ in runs]
        for run in runs:
            run(1)
        for _ in range(repeat):
            for run, t in zip(runs, ts):
                t0 = time.thread_time()
                run(reps)
                t.append(time.thread_time() - t0)
        gbs = [q.nbytes * reps / min(t) / 1e9 for t in ts]
        plain = f"{gbs[2]:>14.1f}" if vnni else f"{'-':>14}"
        print(f"{qt.name:<8}{gbs[0]:>12.1f}{gbs[1]:>10.1f}{gbs[1] / gbs[0]:>13.2f}{plain}", flush=True)


# ---------------------------------------------------------------- models


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's largest resident set so far: VmHWM (ru_maxrss would also count the
    parent's peak, which Linux carries across fork and exec)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib * 1024


def run_kvslim(model: str, weights: str, lengths, types, n_decode: int) -> dict:
    """One (model, weights mode) in this process: load, RSS, speed per length and type."""
    from kvslim import LLM
    from kvslim.engine import Engine

    t0 = time.perf_counter()
    llm = LLM(model, weights=weights, num_ctx=64, progress=False)
    load = time.perf_counter() - t0
    out = {"load_s": load, "rss": rss_bytes(), "weight_bytes": llm.model.weight_bytes, "rows": []}
    for n in lengths:
        ids = prompt_ids(llm, n)
        engines = {(k, k): Engine(llm.model, llm.tokenizer, cache_type_k=k, cache_type_v=k,
                                  num_ctx=n + n_decode + 8) for k in types}
        for (k, _), (pre, med, best, _attn) in interleaved(engines, ids, n_decode).items():
            out["rows"].append({"n": n, "type": k, "prefill": pre, "decode": 1 / med, "best": 1 / best})
        out["rss_end"] = rss_bytes()  # the last length's caches still held
        del engines
    out["rss_peak"] = peak_rss_bytes()
    return out


def run_llamacpp(model: str, lengths, types, n_decode: int) -> dict:
    import llama_cpp

    from kvslim import store

    codes = {"f16": 1, "q8_0": 8, "q4_0": 2}
    path = str(store.resolve(model))
    out = {"rows": []}
    for k in types:
        for n in lengths:
            t0 = time.perf_counter()
            llm = llama_cpp.Llama(path, n_ctx=n + n_decode + 8, n_threads=os.cpu_count(), verbose=False,
                                  type_k=codes[k], type_v=codes[k], flash_attn=True)
            out.setdefault("load_s", time.perf_counter() - t0)
            out.setdefault("rss", rss_bytes())
            ids = [(i * 7919) % llm.n_vocab() for i in range(n)]
            pre = _timed(lambda: llm.eval(ids))
            steps = []
            for i in range(n_decode):  # the speed of a step does not depend on the token
                steps.append(_timed(lambda: llm.eval([ids[i % n]])))
            out["rows"].append({"n": n, "type": k, "prefill": n / pre, "decode": 1 / float(np.median(steps)),
                                "best": 1 / min(steps)})
            out["rss_end"] = rss_bytes()
            del llm
    out["rss_peak"] = peak_rss_bytes()
    return out


def child(args) -> None:
    lengths = [int(x) for x in args.lengths.split(",")]
    types = args.types.split(",")
    if args.child_engine == "llama.cpp":
        res = run_llamacpp(args.child_model, lengths, types, args.decode)
    else:
        res = run_kvslim(args.child_model, args.child_engine, lengths, types, args.decode)
    print("RESULT " + json.dumps(res), flush=True)


def synth(name: str) -> str:
    path = SYNTH / f"{name}-q4_k_m.gguf"
    if not path.exists():
        import synth_model
        print(f"# writing {path}", flush=True)
        synth_model.write(name, "q4_k_m", path)
    return str(path)


def model_of(name: str) -> str:
    """A synthetic layout's file (written on first use), else the name as the engines take
    it: a model in the store (``kvslim list``), a built-in name or a .gguf path."""
    import synth_model

    from kvslim import store

    if name in synth_model.LAYOUTS:
        return synth(name)
    try:
        store.resolve(name)
    except Exception as e:  # unknown, not pulled: one line, before any engine runs
        raise SystemExit(f"weights.py: --models {name}: {e}") from None
    return name


def bench_models(args, bw: float) -> None:
    models = [model_of(m) for m in args.models.split(",")]
    engines = ["quantized", "dequantize"]
    try:
        import llama_cpp  # noqa: F401
        engines.append("llama.cpp")
    except ImportError:
        print("# llama_cpp not importable: no llama.cpp rows")
    for model in models:
        print(f"\n## {Path(model).name}")
        print(f"{'weights':<12}{'load s':>8}{'RSS MB':>8}{'end MB':>8}{'peak MB':>9}{'held MB':>9}{'prompt':>8}{'cache':>7}"
              f"{'prefill tok/s':>15}{'decode tok/s':>14}{'best step':>11}{'floor tok/s':>13}")
        for eng in engines:
            if eng == "dequantize" and args.big and "8b" in model:
                continue  # 32 GB of float32: does not fit here
            cmd = [sys.executable, __file__, "--child-model", model, "--child-engine", eng,
                   "--lengths", args.lengths, "--types", args.types, "--decode", str(args.decode)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{eng:<12}failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            r = json.loads(lines[-1][7:])
            held = r.get("weight_bytes")
            for row in r["rows"]:
                floor = bw / held if held else float("nan")  # weights only: a lower bound per step
                print(f"{eng:<12}{r['load_s']:>8.2f}{r['rss'] / 1e6:>8.0f}{r['rss_end'] / 1e6:>8.0f}"
                      f"{r['rss_peak'] / 1e6:>9.0f}"
                      f"{(held or 0) / 1e6:>9.0f}{row['n']:>8}{row['type']:>7}{row['prefill']:>15.1f}"
                      f"{row['decode']:>14.1f}{row['best']:>11.1f}{floor:>13.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("kernels", "models", "core"))
    ap.add_argument("--types-kernel", default="q4_0,q4_1,q5_0,q8_0,q4_k,q6_k,f16",
                    help="weight types for the kernel table ('all': every type with a kernel)")
    ap.add_argument("--shapes", default="2048x8192,8192x2048", help="ROWSxCOLS list for the kernel table")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--models", default="smollm2,llama-3.2-1b",
                    help="synthetic layouts (llama-3.2-1b, llama-3.1-8b, smollm2-135m), models in the store"
                         " (smollm2, gemma3:270m) or .gguf paths")
    ap.add_argument("--big", action="store_true", help="add the synthetic llama-3.1-8b Q4_K_M")
    ap.add_argument("--lengths", default="512,4096")
    ap.add_argument("--types", default="f16,q8_0", help="K/V cache types")
    ap.add_argument("--decode", type=int, default=16, help="decode steps timed per row")
    ap.add_argument("--child-model", help=argparse.SUPPRESS)
    ap.add_argument("--child-engine", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_model:
        return child(args)
    if args.big:
        args.models += ",llama-3.1-8b"
    bw = read_bandwidth()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    print(f"# commit {commit}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}, streaming read {bw / 1e9:.1f} GB/s")
    if args.only == "core":
        names = [t.name for t in KERNEL_TYPES] if args.types_kernel == "all" else args.types_kernel.upper().split(",")
        return bench_core([T[n] for n in names], max(3, args.repeat // 2))
    if args.only != "models":
        names = [t.name for t in KERNEL_TYPES] if args.types_kernel == "all" else args.types_kernel.upper().split(",")
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        bench_kernels([T[n] for n in names], shapes, args.repeat, bw)
    if args.only != "kernels":
        bench_models(args, bw)
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
