"""Shared inputs for the pytest-benchmark cases (benchmarks/bench_kernels.py).

Inputs are built once per (shape, dtype) and cached for the session: generating a 4096x4096
normal sample costs more than most kernels it feeds.  ``APRENDER_BENCH_THREADS`` sets the thread
count passed to every kernel (default: what OpenMP allows).
"""
import os
import sys

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # a source checkout built in place
    sys.path.insert(0, _ROOT)

_CACHE = {}


def dtype_of(name):
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def weights(shape, dtype_name, seed=0):
    """Standard-normal weights of the given shape and dtype (cached; do not modify them)."""
    key = (tuple(shape), dtype_name, seed)
    if key not in _CACHE:
        w = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        if dtype_name != "float32":
            w = w.astype(dtype_of(dtype_name))
        w.flags.writeable = False
        _CACHE[key] = w
    return _CACHE[key]


@pytest.fixture(scope="session")
def n_threads():
    env = os.environ.get("APRENDER_BENCH_THREADS")
    if env:
        return int(env)
    from aprender._kernels import _openmp

    return max(1, _openmp.max_threads())
