"""Model weights as held in memory: GGUF blocks in place, or dequantized at load.

A model file builds every matrix through ``linear`` and its token table through
``embedding``; what they are given decides the path:

- ``QTensor`` (``weights="quantized"``, the default on CPU): a view of one tensor's
  blocks in the read-only memory map of the GGUF file. ``QLinear`` multiplies by it
  with ``kernels.qmatmul``: a fused dequantize-and-dot for a few input rows (decode;
  the integer or the float dot per type, as ``kernels.qchoice`` measured on this machine),
  tiles of rows dequantized into a small float32 buffer for torch's GEMM beyond that
  (prefill). Several tensors given together (q, k, v; gate, up) are one matmul over
  their blocks, never concatenated.
- ``torch.Tensor`` (``weights="dequantize"``, and always on GPU/MPS for now: there is
  no Triton weight kernel yet): today's float path, ``Linear``.

``held_bytes`` counts what a model holds, a tied head's table once.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES

from kvslim.kernels import qmatmul as qm
from kvslim.kernels.ggml import dense
from kvslim.kernels.qchoice import gemv_ints
from kvslim.kernels.qtypes import CODES
from kvslim.kernels.threads import threads

__all__ = ["WEIGHT_MODES", "QTensor", "QLinear", "Linear", "Embedding", "linear", "embedding",
           "held_bytes", "resolve_mode", "sampled_rows", "step_rows", "decode_only"]

log = logging.getLogger("kvslim")

WEIGHT_MODES = ("quantized", "dequantize")
# Up to this many rows, a dense CPU matmul is split over threads by output rows (Linear).
SPLIT_MAX_ROWS = 16
# Up to this many input rows QLinear runs the fused GEMV; beyond, dequantized tiles and
# torch's GEMM (benchmarks/weights.py measures both sides of this). The GEMV sums each
# row alone, so a decode batch of up to this many sequences gives every sequence the
# same logits it gets alone (greedy output independent of the batch): at least the
# server's usual num_parallel.
GEMV_MAX_ROWS = 16
# A prefill tile of weight rows: 4 MiB of float32. Against 16 MiB, timed in turn on a
# 512-row prompt (AMD EPYC, 2 threads): Llama-3.2-1B's layer 0.94x the time, SmolLM2's
# layers 0.87x, and the buffer held at the prompt's peak 12 MiB smaller; 2 MiB was 1.05x.
TILE_FLOATS = 1 << 20
# Prefill rows go to torch's GEMM at least this many at a time (zero rows pad a shorter
# input). BLAS libraries switch to other kernels for a few rows (MKL on AMD EPYC: below
# 8), and a row's sums then differ in the last bits; from here on a row's result does not
# depend on how many rows share the call (tests/test_qmatmul.py checks it on the machine
# that runs).
GEMM_MIN_ROWS = 16

# Set by the engine for the step it runs: the first this many rows of the activations
# are decode rows (one new token of a sequence that is generating), the rest prefill
# rows. Inside a step QLinear gives each kind one fixed path whatever else is in the
# batch, so a sequence's logits do not depend on who it shares a step with.
_DECODE_ROWS: contextvars.ContextVar[int | None] = contextvars.ContextVar("decode_rows",
                                                                          default=None)


@contextlib.contextmanager
def step_rows(decode: int):
    """Within this block the first ``decode`` input rows of every ``QLinear`` are decode
    rows: they take the fused GEMV in groups of at most ``GEMV_MAX_ROWS`` (it sums each
    row alone), the other rows dequantized tiles and one GEMM of at least
    ``GEMM_MIN_ROWS`` rows. Outside it, the path is chosen by the row count alone."""
    token = _DECODE_ROWS.set(decode)
    try:
        yield
    finally:
        _DECODE_ROWS.reset(token)


@contextlib.contextmanager
def sampled_rows(n: int):
    """Around the output head in a forward: its ``n`` input rows are the rows that sample,
    one per sequence (a decode row, or a prompt's last row), so in an engine step they
    all take the fused GEMV, whatever the step holds; outside a step nothing changes.
    (A prompt's last row through the tiled path dequantized the whole head for one row.)"""
    if _DECODE_ROWS.get() is None:
        yield
        return
    with step_rows(n):
        yield


def decode_only(m: int) -> bool:
    """Whether m input rows are decode rows only: in an engine step, all of them are;
    outside one, ``QLinear`` would take the fused GEMV for them (at most
    ``GEMV_MAX_ROWS``). Every row's GEMV result is its own, however many share a call."""
    decode = _DECODE_ROWS.get()
    return m <= GEMV_MAX_ROWS if decode is None else decode >= m


def resolve_mode(mode: str, device: str | torch.device, dtype: torch.dtype) -> str:
    """The weight mode a model on ``device`` in ``dtype`` actually uses."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"unknown weights mode '{mode}' (choose from {', '.join(WEIGHT_MODES)})")
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return "dequantize"  # the kernels are CPU float32 ones
    return mode


@dataclass(frozen=True, eq=False)
class QTensor:
    """A 2-D weight as stored: ``shape[0]`` rows of ggml blocks at ``offset`` in ``data``
    (the whole mapped file, read-only uint8). ``hd``: llama's GGUF q/k row permutation,
    undone on the matmul's output (head size; 0 for rows in order)."""

    data: np.ndarray
    offset: int
    qtype: int  # gguf.GGMLQuantizationType
    shape: tuple[int, int]  # torch order [out, in]
    hd: int = 0
    name: str = ""

    @property
    def row_bytes(self) -> int:
        n, size = GGML_QUANT_SIZES[self.qtype]
        return self.shape[1] // n * size

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def part(self, col0: int = 0) -> list[int]:
        return [self.offset, self.row_bytes, CODES[self.qtype], self.shape[0], col0, self.hd]

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in], rows in output order."""
        out = torch.empty(self.shape, dtype=torch.float32)
        parts = np.array([self.part()], dtype=np.int64)
        qm.dequantize_rows(self.data, parts, qm.plan_work(parts, _rows_per_item(self.shape[0])),
                           out.numpy())
        return out


def _rows_per_item(rows: int) -> int:
    # a few items per thread balance a busy machine; 16 rows amortize the claim
    return max(16, -(-rows // (4 * threads())))


class QLinear:
    """y = x @ W.T (+ b) for W the row-stack of ``parts`` (QTensors of one file, same in)."""

    def __init__(self, parts: list[QTensor], bias: torch.Tensor | None = None):
        k = parts[0].shape[1]
        if any(p.shape[1] != k or p.data is not parts[0].data for p in parts):
            raise ValueError("QLinear parts must share the input size and the file")
        self.qtensors, self.b, self.data = parts, bias, parts[0].data
        cols = np.cumsum([0] + [p.shape[0] for p in parts])
        self.parts = np.array([p.part(int(c)) for p, c in zip(parts, cols)], dtype=np.int64)
        self.n_out, self.n_in = int(cols[-1]), k
        self.work = qm.plan_work(self.parts, _rows_per_item(self.n_out))
        # the decode GEMV's integer or float dot per type (KVSLIM_QDOT, else measured once
        # per machine: the first QLinear of a process may take a second)
        self.ints = gemv_ints()
        self.tile_rows = max(16, TILE_FLOATS // k // 16 * 16)
        self.tiles = self._plan_tiles([p.shape[0] for p in parts])
        self.pairs = self._plan_pairs([p.shape[0] for p in parts])

    @property
    def ints(self) -> np.ndarray:
        """int8 [type codes]: 1 where the decode GEMV takes the integer dot."""
        return self._ints

    @ints.setter
    def ints(self, ints: np.ndarray) -> None:
        self._ints = ints
        self.inputs = qm.gemv_inputs(self.parts, ints)  # which forms of x a GEMV makes

    def _plan_tiles(self, rows: list[int]) -> list[tuple[int, int, int, list]]:
        """(first output column, output columns n, weight rows, pieces) per tile:
        consecutive output rows, at most ``tile_rows`` (n of them), across parts (q, k and
        v fill one tile: one GEMM); a piece is (row in the tile, work items of one part),
        one ``dequantize_rows`` job."""
        tiles, col = [], 0
        bounds = np.cumsum([0] + rows)
        while col < bounds[-1]:
            end, pieces = min(col + self.tile_rows, int(bounds[-1])), []
            for i, (c0, c1) in enumerate(zip(bounds[:-1], bounds[1:])):
                r0, r1 = max(col, c0), min(end, c1)
                if r0 < r1:
                    work = np.array(self._tile_work(i, int(r0 - c0), int(r1 - c0)), dtype=np.int64)
                    pieces.append((int(r0) - col, work.reshape(-1, 3)))
            tiles.append((col, end - col, end - col, pieces))
            col = end
        return tiles

    def _plan_pairs(self, rows: list[int]) -> list[tuple[int, int, int, list]] | None:
        """For W = [gate; up], two parts of equal rows or one of an even number (phi3's
        fused gate_up): ``_plan_tiles``' tiles for ``gated``, each n gate rows and the n up
        rows at the same place (2n weight rows, at most ``tile_rows``), giving the n
        output columns from c0 of the activation. None for any other W."""
        if len(rows) == 2 and rows[0] == rows[1]:
            f, halves = rows[0], ((0, 0), (1, 0))  # (part, first row) of gate, of up
        elif len(rows) == 1 and rows[0] % 2 == 0:
            f = rows[0] // 2
            halves = ((0, 0), (0, f))
        else:
            return None
        half, tiles = max(16, self.tile_rows // 2 // 16 * 16), []
        for c0 in range(0, f, half):
            n = min(half, f - c0)
            pieces = [(j * n, np.array(self._tile_work(p, r + c0, r + c0 + n),
                                       dtype=np.int64).reshape(-1, 3))
                      for j, (p, r) in enumerate(halves)]
            tiles.append((c0, n, 2 * n, pieces))
        return tiles

    def _tile_work(self, part: int, r0: int, r1: int) -> list[tuple[int, int, int]]:
        step = max(8, -(-(r1 - r0) // (2 * threads())))
        return [(part, r, min(r + step, r1)) for r in range(r0, r1, step)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = dense(x)  # [M, in]
        m, decode = x.shape[0], _DECODE_ROWS.get()
        if decode is None:  # not in an engine step: the faster path for M rows
            y = self._gemv(x) if m <= GEMV_MAX_ROWS else self._tiled(x)
        elif decode >= m and m <= GEMV_MAX_ROWS:  # decode rows only: one GEMV, no copy
            y = self._gemv(x)
        elif decode == 0:  # prefill rows only
            y = self._tiled(x, pad=True)
        else:
            y = torch.empty(m, self.n_out)  # [M, out]
            for r in range(0, decode, GEMV_MAX_ROWS):
                r1 = min(r + GEMV_MAX_ROWS, decode)
                y[r:r1] = self._gemv(x[r:r1])
            y[decode:] = self._tiled(x[decode:], pad=True)
        return y if self.b is None else y + self.b

    def gated(self, x: torch.Tensor, act) -> torch.Tensor:
        """act(x @ W.T) for W = [gate; up] (``_plan_pairs``: F rows each) and ``act`` [M, 2n] =
        [gate | up] -> [M, n], column j paired with n + j (``ops.silu_mul``): x [M, in] ->
        [M, F]. Prefill rows are multiplied a tile at a time, each tile's gate rows and
        the up rows at the same place together, and go through ``act`` before the next
        tile: the [M, 2F] product never exists (a 512-token prompt of Llama-3.2-1B: 33.5
        MB less at the step's peak). Anything else is act(self(x))."""
        m, decode = x.shape[0], _DECODE_ROWS.get()
        prefill = decode == 0 or (decode is None and m > GEMV_MAX_ROWS)
        if self.pairs is None or self.b is not None or not prefill:
            return act(self(x))
        return self._tiled(dense(x), pad=True, tiles=self.pairs, act=act)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], self.n_out)  # [M, out], M <= GEMV_MAX_ROWS
        qm.gemv(self.data, self.parts, self.work, x.numpy(), y.numpy(), ints=self.ints,
                inputs=self.inputs)
        return y

    def _tiled(self, x: torch.Tensor, pad: bool = False, tiles: list | None = None,
                act=None) -> torch.Tensor:
        """x [M, in] @ W.T a dequantized tile of weight rows at a time (``tiles``: the
        plain ``self.tiles``, or ``self.pairs`` with ``act`` applied to each tile's
        product) -> [M, columns of the tiles]."""
        tiles = self.tiles if tiles is None else tiles
        m = x.shape[0]
        if pad and m < GEMM_MIN_ROWS:  # x [M, in] -> [GEMM_MIN_ROWS, in]
            x = torch.cat([x, x.new_zeros(GEMM_MIN_ROWS - m, x.shape[1])])
        buf = torch.empty(tiles[0][2], self.n_in)  # [rows, in]: one tile (the largest), reused
        if len(tiles) == 1 and act is None:  # the GEMM's output is the result: no copy
            return F.linear(x, self._fill(buf, tiles[0][3]))[:m]
        y = torch.empty(x.shape[0], tiles[-1][0] + tiles[-1][1])  # [M, out]
        for c0, n, rows, pieces in tiles:
            t = F.linear(x, self._fill(buf[:rows], pieces))  # [M, rows]
            y[:, c0:c0 + n] = t if act is None else act(t)
        return y[:m]

    def _fill(self, buf: torch.Tensor, pieces: list) -> torch.Tensor:
        """buf [rows, in] holding one tile's weight rows, dequantized (float32)."""
        out = buf.numpy()
        for r0, work in pieces:
            qm.dequantize_rows(self.data, self.parts, work, out[r0:])
        return buf

    @property
    def tensors(self) -> list:
        return list(self.qtensors) + ([self.b] if self.b is not None else [])

    def sample(self, n: int) -> bytes:
        """The stored bytes of the first ``n`` rows of the first part (a cheap fingerprint)."""
        q = self.qtensors[0]
        return q.data[q.offset:q.offset + min(n, q.shape[0]) * q.row_bytes].tobytes()


class Linear:
    """y = x @ w.T + b for a float w [out, in] (the dequantized path).

    For a few rows (decode) MKL runs the matrix-vector product on one thread, which
    reads the weights at one core's bandwidth; a batched matmul over ``splits`` row
    blocks of w (a view, no copy) runs the blocks on all threads. Larger M (prefill)
    goes to one multithreaded GEMM.
    """

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None = None, splits: int = 1):
        self.w, self.b = w, b
        self.ws = w.view(splits, -1, w.shape[1]) if splits > 1 and w.shape[0] % splits == 0 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if self.ws is None or m > SPLIT_MAX_ROWS:
            return F.linear(x, self.w, self.b)
        y = torch.bmm(self.ws, x.t().expand(self.ws.shape[0], -1, -1))  # [S, out/S, M]
        y = y.view(self.w.shape[0], m).t()  # [M, out]
        y = y if m == 1 else y.contiguous()
        return y if self.b is None else y + self.b

    def gated(self, x: torch.Tensor, act) -> torch.Tensor:
        """act(x @ w.T): ``QLinear.gated``'s interface (the product is made whole here)."""
        return act(self(x))

    @property
    def tensors(self) -> list:
        return [self.w] + ([self.b] if self.b is not None else [])

    def sample(self, n: int) -> bytes:
        """float32 bytes of the first ``n`` rows (a cheap fingerprint)."""
        return self.w[:n].detach().float().cpu().numpy().tobytes()


class Embedding:
    """Token rows of a [V, d] table: dequantized per lookup from a QTensor, or indexed."""

    def __init__(self, table: QTensor | torch.Tensor):
        self.table = table
        if isinstance(table, QTensor):
            self._part = np.array(table.part(), dtype=np.int64)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.table, QTensor):
            return F.embedding(tokens, self.table)
        ids = tokens.to("cpu", torch.int64).contiguous()
        out = torch.empty(ids.shape[0], self.table.shape[1])  # [N, d]
        qm.gather_rows(self.table.data, self._part, ids.numpy(), out.numpy())
        return out

    @property
    def tensors(self) -> list:
        return [self.table]


def _dense(t: QTensor | torch.Tensor, device, dtype) -> torch.Tensor:
    t = t.dequantize() if isinstance(t, QTensor) else t
    return t.to(device=device, dtype=dtype).contiguous()


def linear(parts: list[QTensor | torch.Tensor], bias: list[torch.Tensor] | None = None, *,
           device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
           splits: int = 1) -> QLinear | Linear:
    """One matmul over the row-stack of ``parts`` (q, k, v or gate, up: never copied when
    they are QTensors); ``bias``: one per part, or None."""
    b = torch.cat([x.to(device=device, dtype=dtype) for x in bias]) if bias else None
    if all(isinstance(p, QTensor) for p in parts):
        return QLinear(list(parts), b)
    w = torch.cat([_dense(p, device, dtype) for p in parts]) if len(parts) > 1 else _dense(parts[0], device, dtype)
    return Linear(w, b, splits)


def embedding(table: QTensor | torch.Tensor, *, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> Embedding:
    return Embedding(table if isinstance(table, QTensor) else _dense(table, device, dtype))


def held_bytes(tensors) -> int:
    """Bytes of distinct weights (a QTensor's stored blocks, a tensor's elements): what
    the model holds, a tied head counted once."""
    seen: dict = {}
    for t in tensors:
        if isinstance(t, QTensor):
            seen[("q", id(t.data), t.offset)] = t.nbytes
        elif t is not None:
            seen[("t", t.data_ptr())] = t.numel() * t.element_size()
    return sum(seen.values())


def views(reader, permuted: dict[str, int]) -> dict[str, QTensor]:
    """A QTensor for every 2-D tensor of ``reader`` whose type has a kernel (no bytes are
    read: views of the file's memory map); ``permuted``: tensor name -> head size of llama's
    q/k row permutation. Matrices of other types are left to the caller to dequantize,
    with one warning naming them."""
    data = reader.data.view(np.ndarray)
    if reader.byte_order != "I":  # the kernels read little-endian blocks
        log.warning("weights: %s is byte-swapped: every tensor is dequantized at load",
                    getattr(reader.data, "filename", "the GGUF file"))
        return {}
    out, other = {}, []
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        if t.tensor_type not in CODES:
            other.append(f"{t.name} ({t.tensor_type.name})")
            continue
        shape = (int(t.shape[1]), int(t.shape[0]))  # ne = [in, out]
        out[t.name] = QTensor(data, int(t.data_offset), t.tensor_type, shape,
                              hd=permuted.get(t.name, 0), name=t.name)
    if other:
        log.warning("weights: no kernel for %s: dequantized at load", ", ".join(other))
    return out
