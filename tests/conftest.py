import os

import pytest

# Keep numba/torch from fighting over the two cores of the CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")
