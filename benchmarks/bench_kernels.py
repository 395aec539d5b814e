"""pytest-benchmark cases for every aprender kernel entry point.

    python -m pytest benchmarks/bench_kernels.py -q                     # smoke: each case once
    python -m pytest benchmarks/bench_kernels.py -q --benchmark-enable  # measure
    python -m pytest benchmarks/bench_kernels.py -q --benchmark-enable -k "4096 and float32"

(pyproject's addopts disable timing by default, so a plain run is a quick correctness smoke
check.)  Every kernel is timed at (768, 3072) and (4096, 4096) in float32, float16 and bfloat16;
``APRENDER_BENCH_THREADS`` sets the thread count.  For one-process comparisons with NumPy,
PyTorch and the memory-bandwidth floors, see benchmarks/compare.py.
"""
import numpy as np
import pytest

from aprender.pruning import (ActivationStats, MagnitudeImportance, SparsityMask,
                              WandaImportance, generate_block_mask,
                              generate_column_mask, generate_global_mask, generate_nm_mask,
                              generate_row_mask, generate_unstructured_mask, magnitude_mask,
                              magnitude_nm_mask)
from conftest import weights

SHAPES = [(768, 3072), (4096, 4096)]
DTYPES = ["float32", "float16", "bfloat16"]

_SCORES = {}


def scores(shape, dtype, seed=0):
    """|w| in the weights' dtype: non-negative importance scores for the generate_* functions."""
    key = (shape, dtype, seed)
    if key not in _SCORES:
        s = np.abs(weights(shape, dtype, seed))
        s.flags.writeable = False
        _SCORES[key] = s
    return _SCORES[key]


def _ids(shape):
    return f"{shape[0]}x{shape[1]}"


shape_param = pytest.mark.parametrize("shape", SHAPES, ids=_ids)
dtype_param = pytest.mark.parametrize("dtype", DTYPES)


def _run(benchmark, group, shape, dtype, fn, *args, **kwargs):
    benchmark.group = f"{group} {_ids(shape)}"
    benchmark.extra_info.update(shape=list(shape), dtype=dtype, elements=int(np.prod(shape)))
    return benchmark(fn, *args, **kwargs)


@shape_param
@dtype_param
def test_magnitude_mask(benchmark, shape, dtype, n_threads):
    w = weights(shape, dtype)
    m = _run(benchmark, "magnitude_mask 50%", shape, dtype, magnitude_mask, w, 0.5,
             n_threads=n_threads)
    assert m.num_zeros() == w.size // 2


@shape_param
@dtype_param
def test_generate_unstructured_mask(benchmark, shape, dtype, n_threads):
    s = scores(shape, dtype)
    m = _run(benchmark, "generate_unstructured_mask 50%", shape, dtype,
             generate_unstructured_mask, s, 0.5, n_threads=n_threads)
    assert m.num_zeros() == s.size // 2


@shape_param
@dtype_param
def test_magnitude_mask_per_row(benchmark, shape, dtype, n_threads):
    w = weights(shape, dtype)
    m = _run(benchmark, "magnitude_mask per_row 50%", shape, dtype, magnitude_mask, w, 0.5,
             per_row=True, n_threads=n_threads)
    assert (m.shape[1] - m.keep[:3].sum(axis=1) == shape[1] // 2).all()


@shape_param
@dtype_param
def test_magnitude_nm_mask(benchmark, shape, dtype, n_threads):
    w = weights(shape, dtype)
    m = _run(benchmark, "magnitude_nm_mask 2:4", shape, dtype, magnitude_nm_mask, w, 2, 4,
             n_threads=n_threads)
    assert m.nnz() == w.size // 2


@shape_param
@dtype_param
def test_generate_nm_mask(benchmark, shape, dtype, n_threads):
    s = scores(shape, dtype)
    m = _run(benchmark, "generate_nm_mask 2:4", shape, dtype, generate_nm_mask, s, 2, 4,
             n_threads=n_threads)
    assert m.nnz() == s.size // 2


@shape_param
@dtype_param
def test_generate_global_mask(benchmark, shape, dtype, n_threads):
    vals = [scores(shape, dtype, seed) for seed in range(4)]
    masks = _run(benchmark, "generate_global_mask 4 tensors 50%", shape, dtype,
                 generate_global_mask, vals, 0.5, n_threads=n_threads)
    assert sum(m.num_zeros() for m in masks) == 4 * vals[0].size // 2


@shape_param
@dtype_param
def test_generate_block_mask(benchmark, shape, dtype, n_threads):
    s = scores(shape, dtype)
    m = _run(benchmark, "generate_block_mask 4x4 50%", shape, dtype, generate_block_mask, s, 0.5,
             (4, 4), n_threads=n_threads)
    assert m.num_zeros() == s.size // 2


@shape_param
@dtype_param
def test_generate_row_mask(benchmark, shape, dtype, n_threads):
    s = scores(shape, dtype)
    m = _run(benchmark, "generate_row_mask 50%", shape, dtype, generate_row_mask, s, 0.5,
             n_threads=n_threads)
    assert m.num_zeros() == s.size // 2


@shape_param
@dtype_param
def test_generate_column_mask(benchmark, shape, dtype, n_threads):
    s = scores(shape, dtype)
    m = _run(benchmark, "generate_column_mask 50%", shape, dtype, generate_column_mask, s, 0.5,
             n_threads=n_threads)
    assert m.num_zeros() == s.size // 2


@shape_param
@dtype_param
def test_sparsity_mask_apply(benchmark, shape, dtype, n_threads):
    w = weights(shape, dtype).copy()  # apply zeroes in place: a private, writable copy
    mask = magnitude_mask(w, 0.5, n_threads=n_threads)
    assert isinstance(mask, SparsityMask)
    out = _run(benchmark, "SparsityMask.apply", shape, dtype, mask.apply, w, n_threads=n_threads)
    assert out is w
    assert not w.view(np.uint16 if w.itemsize == 2 else np.uint32)[~mask.keep].any()


@shape_param
@dtype_param
@pytest.mark.parametrize("p", [1, 2], ids=["l1", "l2"])
def test_magnitude_importance(benchmark, shape, dtype, p, n_threads):
    w = weights(shape, dtype)
    imp = MagnitudeImportance.l1() if p == 1 else MagnitudeImportance.l2()
    sc = _run(benchmark, f"MagnitudeImportance.{imp.name[-2:]}().compute", shape, dtype,
              imp.compute, w, n_threads=n_threads)
    assert sc.values.shape == w.shape and sc.values.dtype == w.dtype
    assert sc.stats.count == w.size


CALIB_SHAPES = [(2048, 4096), (8192, 4096)]


@pytest.mark.parametrize("shape", CALIB_SHAPES, ids=_ids)
@dtype_param
def test_activation_stats_update(benchmark, shape, dtype, n_threads):
    """Sum of squares per input feature (ActivationStats.update) over a batch of activations;
    target: >= 3x faster than (x.astype(np.float64) ** 2).sum(0) on (8192, 4096) bfloat16
    (benchmarks/compare_calibration.py prints the ratio)."""
    x = weights(shape, dtype)
    st = ActivationStats(shape[1])
    _run(benchmark, "ActivationStats.update", shape, dtype, st.update, x, n_threads=n_threads)
    assert st.count % shape[0] == 0 and st.count > 0


@shape_param
@dtype_param
def test_wanda_importance(benchmark, shape, dtype, n_threads):
    st = ActivationStats(shape[1]).update(weights((64, shape[1]), "float32", seed=3))
    w = weights(shape, dtype)
    sc = _run(benchmark, "WandaImportance.compute", shape, dtype, WandaImportance().compute, w,
              st, n_threads=n_threads)
    assert sc.values.shape == w.shape and sc.values.dtype == np.float32


@shape_param
@dtype_param
@pytest.mark.parametrize("pack", ["simd", "scalar"])
def test_per_row_bracket(benchmark, shape, dtype, n_threads, pack):
    """Per-row selection (shared bracket, one pass a row), with the SIMD candidate pack or the
    scalar fallback."""
    from aprender._kernels import select

    w = weights(shape, dtype)
    was = select.simd(pack == "simd")
    try:
        m = _run(benchmark, f"per-row 50% ({pack} pack)", shape, dtype, magnitude_mask, w, 0.5,
                 per_row=True, n_threads=n_threads)
    finally:
        select.simd(was)
    assert m.num_zeros() == (w.shape[1] // 2) * w.shape[0]


@shape_param
@dtype_param
def test_magnitude_mask_out(benchmark, shape, dtype, n_threads):
    """Unstructured 50 % into a reused out= buffer (no fresh pages)."""
    w = weights(shape, dtype)
    out = np.empty(w.shape, np.bool_)
    m = _run(benchmark, "magnitude_mask 50% out=", shape, dtype, magnitude_mask, w, 0.5,
             n_threads=n_threads, out=out)
    assert m.num_zeros() == w.size // 2


@shape_param
@pytest.mark.parametrize("kernel", ["simd", "scalar"])
def test_nm4_kernel(benchmark, shape, n_threads, kernel):
    """2:4 along rows of float32: the AVX2 N:4 kernel against the scalar one."""
    from aprender._kernels import nm

    w = weights(shape, "float32")
    out = np.empty(w.shape, np.bool_)
    was = nm.simd(kernel == "simd")
    try:
        _run(benchmark, f"2:4 ({kernel})", shape, "float32", magnitude_nm_mask, w, 2, 4,
             n_threads=n_threads, out=out)
    finally:
        nm.simd(was)
