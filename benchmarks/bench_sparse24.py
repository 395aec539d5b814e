"""pytest-benchmark cases for the 2:4 layouts (run with --benchmark-enable)."""
import numpy as np
import pytest

from aprender import sparse24

SHAPES = [(4096, 4096), (11008, 4096)]
DTYPES = ["float16", "bfloat16"]


def _dense(shape, name):
    w = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        w = w.astype(ml_dtypes.bfloat16)
    else:
        w = w.astype(np.float16)
    return sparse24.compress(w, layout="raw", select=True).to_dense()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("layout", ["cutlass", "bitmask"])
def test_compress(benchmark, layout, name, shape):
    dense = _dense(shape, name)
    s = benchmark(sparse24.compress, dense, layout=layout)
    assert s.values.shape == (shape[0], shape[1] // 2)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("layout", ["cutlass", "bitmask"])
def test_decompress(benchmark, layout, name, shape):
    dense = _dense(shape, name)
    s = sparse24.compress(dense, layout=layout)
    out = benchmark(s.to_dense)
    assert out.shape == shape


@pytest.mark.parametrize("name", DTYPES)
def test_compress_select(benchmark, name):
    w = np.random.default_rng(1).standard_normal((4096, 4096), dtype=np.float32).astype(np.float16)
    benchmark(sparse24.compress, w, layout="cutlass", select=True)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_compress_cutlass_float32_pairs(benchmark, shape):
    """float32 in PyTorch's 1:2 cutlass layout."""
    w = np.random.default_rng(2).standard_normal(shape, dtype=np.float32)
    dense = np.where(np.arange(shape[1]) % 2 == 0, w, np.float32(0)).astype(np.float32)
    s = benchmark(sparse24.compress, dense, layout="cutlass")
    assert s.metadata.shape == (shape[0], shape[1] // 8)


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "scalar"])
@pytest.mark.parametrize("layout", ["cutlass", "bitmask"])
def test_compress_encoder(benchmark, layout, simd):
    """The SIMD group encoder against the scalar fallback on the same float16 weight."""
    from aprender._kernels import sparse24 as k

    dense = _dense((4096, 4096), "float16")
    was = k.simd(simd)
    try:
        benchmark(sparse24.compress, dense, layout=layout)
    finally:
        k.simd(was)
