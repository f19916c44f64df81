"""The GGUF weight types ``kernels.qmatmul`` reads in place, without importing numba (the
loader and the planner count bytes with it)."""
from __future__ import annotations

from gguf import GGMLQuantizationType as T

# in kernel code order
TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K,
         T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS)
CODES = {t: i for i, t in enumerate(TYPES)}
