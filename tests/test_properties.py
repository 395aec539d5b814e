"""Property tests: every kernel against its slow reference in aprender._reference.

Inputs cover float16, bfloat16 (ml_dtypes or aprender.Bits16), float32 and float64; heavy ties
(values drawn from a tiny set), signed zeros, subnormals and extreme magnitudes; C, Fortran,
strided, reversed and byte-swapped layouts; and n_threads 1, 2 and 4.  Hypothesis arrays are small
(the search is in the values); the parallel paths are covered by the large-array tests at the end
(determinism across thread counts, adversarial distributions, concurrent Python threads).

The number of examples comes from the hypothesis profile (tests/conftest.py): HYPOTHESIS_PROFILE=ci
runs 10000 examples per property test.
"""
import concurrent.futures
import inspect
import math

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
ml_dtypes = pytest.importorskip("ml_dtypes")

from hypothesis import given, note, strategies as st  # noqa: E402

import aprender  # noqa: E402
import aprender.nn  # noqa: E402,F401
from aprender import Bits16, pruning  # noqa: E402
from aprender import _reference as ref  # noqa: E402
from aprender.pruning import (MagnitudeImportance, SparsityMask, SparsityPattern,  # noqa: E402
                              generate_block_mask, generate_column_mask, generate_global_mask,
                              generate_nm_mask, generate_row_mask, generate_unstructured_mask,
                              magnitude_mask, magnitude_nm_mask)

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float16": np.dtype(np.float16), "bfloat16": BF16, "float32": np.dtype(np.float32),
          "float64": np.dtype(np.float64)}
THREADS = st.sampled_from([1, 2, 4])

# ----------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------

TIES = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0]


def _bf16_from_bits(b):
    return float(np.array([b], np.uint16).view(BF16)[0])


def _extremes(name):
    """Largest finite, smallest normal and smallest subnormal magnitudes of the format, both signs."""
    if name == "bfloat16":
        mags = [_bf16_from_bits(0x7F7F), _bf16_from_bits(0x0080), _bf16_from_bits(0x0001)]
    else:
        fi = np.finfo(DTYPES[name])
        mags = [float(fi.max), float(fi.smallest_normal), float(fi.smallest_subnormal)]
    return mags + [-m for m in mags]


def _general(name):
    """Any finite value of the format (as a Python float that the format holds exactly)."""
    if name == "bfloat16":
        return st.integers(0, 0xFFFF).filter(lambda b: b & 0x7F80 != 0x7F80).map(_bf16_from_bits)
    width = {"float16": 16, "float32": 32, "float64": 64}[name]
    return st.floats(allow_nan=False, allow_infinity=False, width=width)


def _subnormal(name):
    if name == "bfloat16":
        return st.integers(0, 0x7F).flatmap(
            lambda b: st.sampled_from([b, b | 0x8000])).map(_bf16_from_bits)
    width = {"float16": 16, "float32": 32, "float64": 64}[name]
    tiny = float(np.finfo(DTYPES[name]).smallest_normal)
    return st.floats(-tiny, tiny, width=width, exclude_min=True, exclude_max=True)


def elements(name, mode):
    ties = st.sampled_from(TIES)
    if mode == "ties":
        return ties
    if mode == "general":
        return _general(name)
    return st.one_of(ties, st.sampled_from(_extremes(name)), _subnormal(name), _general(name))


@st.composite
def float_arrays(draw, dtype=None, shape=None, min_ndim=1, max_ndim=3, max_side=6):
    """(name, C-contiguous array) with values from one of the modes ties / general / mixed."""
    name = dtype or draw(st.sampled_from(sorted(DTYPES)))
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(0, max_side), min_size=min_ndim,
                                    max_size=max_ndim)))
    mode = draw(st.sampled_from(["ties", "general", "mixed"]))
    n = math.prod(shape)
    vals = draw(st.lists(elements(name, mode), min_size=n, max_size=n))
    arr = np.array(vals, dtype=np.float64).reshape(shape).astype(DTYPES[name])
    note(f"dtype={name} shape={shape} mode={mode}")
    return name, arr


@st.composite
def layouts(draw, name, arr):
    """The same values in another memory layout (or wrapped in Bits16)."""
    kinds = ["C", "F", "strided", "reversed"]
    if name != "bfloat16":
        kinds.append("swapped")
    if name in ("float16", "bfloat16"):
        kinds.append("bits16")
    kind = draw(st.sampled_from(kinds))
    note(f"layout={kind}")
    if kind == "F":
        return np.asfortranarray(arr)
    if kind == "strided":
        if arr.ndim == 0:
            return arr
        base = np.zeros(arr.shape[:-1] + (2 * arr.shape[-1],), arr.dtype)
        base[..., ::2] = arr
        base[..., 1::2] = np.array(1e4, np.float64).astype(arr.dtype)  # must not leak into results
        return base[..., ::2]
    if kind == "reversed":
        return np.ascontiguousarray(arr[::-1])[::-1]
    if kind == "swapped":
        return arr.astype(arr.dtype.newbyteorder(">" if np.little_endian else "<"))
    if kind == "bits16":
        return Bits16(arr.view(np.uint16), name)
    return arr


@st.composite
def sparsities(draw, n):
    """Round fractions, arbitrary ones, exact k/n, exact halves (k + 1/2)/n and their neighbours."""
    kind = draw(st.sampled_from(["fixed", "any", "exact", "half"]))
    if kind == "fixed" or n == 0:
        return draw(st.sampled_from([0.0, 1.0, 0.5, 0.25, 0.75, 1 / 3, 0.9, 0.1]))
    if kind == "any":
        return draw(st.floats(0.0, 1.0))
    k = draw(st.integers(0, n))
    s = (k + (0.5 if kind == "half" else 0.0)) / n
    s = draw(st.sampled_from([s, np.nextafter(s, 0.0), np.nextafter(s, 1.0)]))
    return float(min(max(s, 0.0), 1.0))


def expected_pruned(sparsity, n):
    """Documented count, computed independently of the library: nearest integer, halves down."""
    p = float(sparsity) * n
    return int(math.ceil(p - 0.5)) if p > 0 else 0


def keep_of(m):
    assert isinstance(m, SparsityMask)
    assert m.keep.dtype == np.bool_
    return m.keep


def assert_same_mask(got, want):
    got = keep_of(got)
    assert got.shape == want.shape
    if not np.array_equal(got, want):
        diff = np.argwhere(got != want)
        raise AssertionError(f"{len(diff)} elements differ, first at {tuple(diff[0])}: "
                             f"got {got[tuple(diff[0])]}, reference {want[tuple(diff[0])]}")


# ----------------------------------------------------------------------------------------------
# unstructured, per-row, global
# ----------------------------------------------------------------------------------------------

@given(st.data(), st.booleans(), THREADS)
def test_unstructured_matches_reference(data, magnitude, nt):
    name, arr = data.draw(float_arrays())
    inp = data.draw(layouts(name, arr))
    s = data.draw(sparsities(arr.size))
    fn = magnitude_mask if magnitude else generate_unstructured_mask
    m = fn(inp, s, n_threads=nt)
    assert_same_mask(m, ref.unstructured_mask(arr, s, magnitude=magnitude))
    assert m.num_zeros() == expected_pruned(s, arr.size)
    assert m.nnz() + m.num_zeros() == arr.size
    assert m.pattern == SparsityPattern.unstructured()


@given(st.data(), st.booleans(), THREADS)
def test_per_row_matches_reference(data, magnitude, nt):
    name, arr = data.draw(float_arrays())
    inp = data.draw(layouts(name, arr))
    s = data.draw(sparsities(arr.shape[-1]))
    fn = magnitude_mask if magnitude else generate_unstructured_mask
    m = fn(inp, s, per_row=True, n_threads=nt)
    # (the reference cannot reshape an empty array whose last axis is 0: compare with an empty mask)
    want = ref.per_row_mask(arr, s, magnitude=magnitude) if arr.size else np.ones(arr.shape, bool)
    assert_same_mask(m, want)
    if arr.size:
        pruned_per_row = (~m.keep).reshape(-1, arr.shape[-1]).sum(axis=1)
        assert np.all(pruned_per_row == expected_pruned(s, arr.shape[-1]))


@given(st.data(), THREADS)
def test_global_matches_reference(data, nt):
    same = data.draw(st.booleans())
    dtype = data.draw(st.sampled_from(sorted(DTYPES))) if same else None
    count = data.draw(st.integers(1, 4))
    arrays = [data.draw(float_arrays(dtype=dtype)) for _ in range(count)]
    inputs = [data.draw(layouts(name, a)) for name, a in arrays]
    plain = [a for _, a in arrays]
    total = sum(a.size for a in plain)
    s = data.draw(sparsities(total))
    want = ref.global_masks(plain, s)
    as_dict = data.draw(st.booleans())
    if as_dict:
        got = generate_global_mask({f"t{i}": x for i, x in enumerate(inputs)}, s, n_threads=nt)
        assert list(got) == [f"t{i}" for i in range(count)]
        got = list(got.values())
    else:
        got = generate_global_mask(inputs, s, n_threads=nt)
    assert len(got) == count
    for g, w in zip(got, want):
        assert_same_mask(g, w)
    assert sum(g.num_zeros() for g in got) == expected_pruned(s, total)


@pytest.mark.parametrize("first", ["float32", "float64"])
@pytest.mark.parametrize("second", ["float16", "bfloat16"])
def test_global_with_empty_wide_tensor_first(first, second):
    """An empty float32/float64 tensor before 16-bit ones must not change the exact count."""
    v = np.array([-1.0, 0.5, -0.5, 2.0, 1.0, -2.0]).astype(DTYPES[second])
    got = generate_global_mask([np.zeros(0, DTYPES[first]), v], 0.5)
    assert got[0].keep.shape == (0,)
    assert_same_mask(got[1], ref.global_masks([v], 0.5)[0])
    assert got[1].num_zeros() == 3


# ----------------------------------------------------------------------------------------------
# N:M
# ----------------------------------------------------------------------------------------------

@st.composite
def nm_cases(draw):
    m = draw(st.integers(1, 32))
    n = draw(st.integers(1, m))
    ndim = draw(st.integers(1, 3))
    axis = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[axis] = m * draw(st.integers(0, 3))
    name, arr = draw(float_arrays(shape=tuple(shape)))
    return n, m, axis, name, arr


@given(st.data(), st.booleans(), THREADS)
def test_nm_matches_reference(data, magnitude, nt):
    n, m, axis, name, arr = data.draw(nm_cases())
    inp = data.draw(layouts(name, arr))
    fn = magnitude_nm_mask if magnitude else generate_nm_mask
    got = fn(inp, n, m, axis=axis, n_threads=nt)
    want = ref.nm_mask(arr, n, m, axis=axis, magnitude=magnitude)
    assert_same_mask(got, want)
    assert got.pattern == SparsityPattern.nm(n, m, axis=axis)
    moved = np.moveaxis(got.keep, axis, -1).reshape(-1, m)
    assert np.all(moved.sum(axis=1) == n)
    SparsityPattern.nm(n, m, axis=axis).validate(got.keep)


# ----------------------------------------------------------------------------------------------
# block, row, column
# ----------------------------------------------------------------------------------------------

@st.composite
def block_cases(draw):
    h = draw(st.integers(1, 3))
    w = draw(st.integers(1, 3))
    ndim = draw(st.integers(1, 3))
    if ndim == 1:
        h = 1
        shape = (w * draw(st.integers(0, 4)),)
    else:
        # the rows of the 2-D view are the product of the leading axes: put them in the last one
        shape = (1,) * (ndim - 2) + (h * draw(st.integers(0, 3)), w * draw(st.integers(0, 3)))
    name, arr = draw(float_arrays(shape=shape))
    return (h, w), name, arr


def _lowest_bit_exponent(v):
    m, e = math.frexp(v)
    mant = int(m * 2.0 ** 53)
    return e - 53 + ((mant & -mant).bit_length() - 1)


def _sums_exact_in_float64(arr):
    """True when every partial sum of the values, in any order, is exact in float64 (then the
    kernel's float64 block sums equal the reference's exactly rounded ones, whatever the order)."""
    v = ref.to_float64(arr).reshape(-1)
    nz = [float(x) for x in v if x != 0]
    if not nz:
        return True
    q = min(_lowest_bit_exponent(abs(x)) for x in nz)
    try:
        return math.fsum(abs(x) for x in nz) < 2.0 ** (52 + q)
    except OverflowError:
        return False


def _check_structured(fast, slow, arr, s, nblocks, block_size, pattern, nt):
    """Compare with the reference where float64 block sums are exact; otherwise (sums that round
    or overflow) the mask must still prune exactly the documented number of whole blocks and not
    depend on the thread count -- or the call raises a typed error."""
    if arr.size == 0:  # the reference cannot take empty arrays: "empty arrays give empty masks"
        assert_same_mask(fast(nt), np.ones(arr.shape, bool))
        return
    if _sums_exact_in_float64(arr):
        got = fast(nt)
        assert_same_mask(got, slow())
    else:
        try:
            got = fast(nt)
        except pruning.NumericalInstabilityError:
            return
        again = fast(1 if nt != 1 else 2)
        assert np.array_equal(got.keep, again.keep)
    assert got.pattern == pattern
    pattern.validate(got.keep)
    assert got.num_zeros() == expected_pruned(s, nblocks) * block_size


@given(st.data(), THREADS)
def test_block_matches_reference(data, nt):
    block, name, arr = data.draw(block_cases())
    inp = data.draw(layouts(name, arr))
    rows = math.prod(arr.shape[:-1]) if arr.ndim > 1 else 1
    nblocks = (rows // block[0]) * (arr.shape[-1] // block[1]) if arr.size else 0
    s = data.draw(sparsities(nblocks))
    _check_structured(lambda t: generate_block_mask(inp, s, block, n_threads=t),
                      lambda: ref.block_mask(arr, s, block), arr, s, nblocks,
                      block[0] * block[1], SparsityPattern.block_pattern(*block), nt)


@given(st.data(), st.sampled_from(["row", "column"]), THREADS)
def test_row_column_match_reference(data, kind, nt):
    name, arr = data.draw(float_arrays(min_ndim=1, max_ndim=3, max_side=5))
    inp = data.draw(layouts(name, arr))
    rows = math.prod(arr.shape[:-1]) if arr.ndim > 1 else 1
    count = rows if kind == "row" else arr.shape[-1]
    s = data.draw(sparsities(count if arr.size else 0))
    if kind == "row":
        fast, slow, pattern = generate_row_mask, ref.row_mask, SparsityPattern.rows()
        size = arr.shape[-1] if arr.ndim else 1
    else:
        fast, slow, pattern = generate_column_mask, ref.column_mask, SparsityPattern.columns()
        size = rows
    _check_structured(lambda t: fast(inp, s, n_threads=t), lambda: slow(arr, s), arr, s, count,
                      size, pattern, nt)


def test_block_scores_that_overflow_float64_give_an_exact_mask_or_an_error():
    """Finite values whose block sums overflow float64: the mask must still prune exactly
    round(sparsity * blocks) whole blocks (deterministically), or raise a typed error."""
    big = float(np.finfo(np.float64).max)
    v = np.array([[big, big, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0]])
    cases = [(lambda: generate_block_mask(v, 0.5, (1, 2)), 2 * 2),
             (lambda: generate_row_mask(v, 0.5), 1 * 4),
             (lambda: generate_column_mask(v, 0.5), 2 * 2)]
    for fn, pruned in cases:
        try:
            first = fn()
        except pruning.NumericalInstabilityError:
            continue
        assert first.num_zeros() == pruned
        for _ in range(3):
            assert np.array_equal(fn().keep, first.keep)


# ----------------------------------------------------------------------------------------------
# apply
# ----------------------------------------------------------------------------------------------

APPLY_DTYPES = ["float16", "bfloat16", "float32", "float64", "int8", "int32", "uint16", ">f4",
                "complex64", "bits16-bf16", "bits16-f16"]


@given(st.data(), st.sampled_from(APPLY_DTYPES), st.sampled_from(["C", "F", "strided"]), THREADS)
def test_apply_matches_reference(data, dt, layout, nt):
    shape = tuple(data.draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)))
    n = math.prod(shape)
    keep = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)),
                    dtype=bool).reshape(shape)
    raw = np.array(data.draw(st.lists(st.integers(1, 100), min_size=n, max_size=n)),
                   dtype=np.float64).reshape(shape)
    if dt.startswith("bits16"):
        fmt = "bfloat16" if dt.endswith("bf16") else "float16"
        bits = raw.astype(BF16 if fmt == "bfloat16" else np.float16).view(np.uint16)
        base = bits
    else:
        base = raw.astype(DTYPES.get(dt, np.dtype(dt)))
    if layout == "F":
        arr = np.asfortranarray(base)
    elif layout == "strided":
        big = np.ones(shape[:-1] + (2 * shape[-1],), base.dtype)
        big[..., ::2] = base
        arr = big[..., ::2]
    else:
        arr = base.copy()
    before_rest = big[..., 1::2].copy() if layout == "strided" else None
    want = ref.apply_mask(base, keep)
    mask = SparsityMask(keep)
    target = Bits16(arr, fmt) if dt.startswith("bits16") else arr
    out = mask.apply(target, n_threads=nt)
    assert out is target
    assert arr.dtype == want.dtype
    assert np.array_equal(arr, want)
    if before_rest is not None:  # elements outside the view are untouched
        assert np.array_equal(big[..., 1::2], before_rest)


# ----------------------------------------------------------------------------------------------
# scores and stats
# ----------------------------------------------------------------------------------------------

def _score_array(values, name):
    """Scores as an array of the weights' float dtype (Bits16 or raw uint16 bits reinterpreted)."""
    if isinstance(values, Bits16):
        values = values.bits
    values = np.asarray(values)
    if values.dtype == np.uint16:
        values = values.view(DTYPES[name])
    return values


@given(st.data(), st.sampled_from([1, 2, 0.5, 1.5, 3]), THREADS)
def test_scores_and_stats_match_reference(data, p, nt):
    name, arr = data.draw(float_arrays())
    inp = data.draw(layouts(name, arr))
    imp = MagnitudeImportance(p)
    with np.errstate(over="ignore", invalid="ignore"):
        want = ref.scores(arr, p)
    if not np.all(np.isfinite(ref.to_float64(want))):
        # finite weights whose score overflows the weights' dtype: a typed error, not inf scores
        with pytest.raises(pruning.NumericalInstabilityError, match="overflows"):
            imp.compute(inp, n_threads=nt)
        return
    sc = imp.compute(inp, n_threads=nt)
    got = _score_array(sc.values, name)
    assert got.shape == arr.shape
    assert got.dtype == arr.dtype.newbyteorder("=")
    assert sc.method == imp.name
    g, w = ref.to_float64(got), ref.to_float64(want)
    if p in (1, 2):  # exactly rounded in the weights' dtype
        assert np.array_equal(g, w) and not np.any(np.signbit(g)), (got, want)
    else:  # |w|**p may round twice for 16-bit formats: at most one unit in the last place apart
        up = ref.to_float64(np.nextafter(want.astype(np.float32), np.float32(np.inf))
                            .astype(arr.dtype)) if arr.dtype != np.float64 else \
            np.nextafter(w, np.inf)
        ulp = np.abs(up - w)
        with np.errstate(invalid="ignore"):
            close = (g == w) | (np.abs(g - w) <= ulp)
        assert np.all(close), (got, want)
    assert sc.stats.count == arr.size
    if arr.size:
        s64 = ref.to_float64(got)
        if np.all(np.isfinite(s64)) and np.max(s64) < 1e150:
            mn, mx, mean, std = ref.stats(got)
            assert sc.stats.min == mn and sc.stats.max == mx
            assert sc.stats.mean == pytest.approx(mean, rel=1e-9, abs=1e-300)
            # the std of nearly equal values is ill-conditioned: compare it against the
            # rounding noise of the values themselves as well as relatively
            assert sc.stats.std == pytest.approx(std, rel=1e-6,
                                                 abs=max(1e-150, abs(mean) * 1e-13))


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
@pytest.mark.parametrize("p", [1, 2])
def test_scores_of_bits16_weights_are_usable_as_values(fmt, p):
    """compute(Bits16) must give scores that the mask functions accept (as they do for every other
    input format): the same mask as for the equivalent ml_dtypes / numpy array."""
    w = np.array([1.0, -0.5, 2.0, 0.0, -3.0, 0.25, 1.5, -1.0]).astype(DTYPES[fmt])
    sc = MagnitudeImportance(p).compute(Bits16(w.view(np.uint16), fmt))
    want = ref.unstructured_mask(ref.scores(w, p), 0.5)
    assert_same_mask(generate_unstructured_mask(sc, 0.5), want)


# ----------------------------------------------------------------------------------------------
# large arrays: parallel paths, determinism across thread counts, adversarial distributions
# ----------------------------------------------------------------------------------------------

LARGE = 300_007  # > the kernels' serial cut-offs and > the direct-selection limit


def _large(kind, dtype, n=LARGE, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "ties":
        v = rng.choice(np.array(TIES), n)
    elif kind == "all_equal":
        v = np.full(n, 0.5)
    elif kind == "signed_zeros":
        v = rng.choice(np.array([0.0, -0.0, 0.0, -0.0, 1.0]), n)
    elif kind == "ascending":
        v = np.linspace(-1, 1, n)
    elif kind == "descending":
        v = np.linspace(1, -1, n)
    elif kind == "outlier":
        v = rng.choice(np.array([1.0, 2.0]), n)
        v[n // 3] = float(np.finfo(np.float16).max)
    elif kind == "subnormal":
        tiny = float(np.finfo(np.float16).smallest_subnormal)
        v = rng.integers(-3, 4, n) * tiny
    else:
        v = rng.standard_normal(n)
    return v.astype(DTYPES[dtype])


KINDS = ["ties", "all_equal", "signed_zeros", "ascending", "descending", "outlier", "subnormal",
         "normal"]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_large_unstructured_all_thread_counts(kind, dtype):
    v = _large(kind, dtype)
    for s in (0.5, 0.3333, 0.9):
        want_v = ref.unstructured_mask(v, s)
        want_m = ref.unstructured_mask(v, s, magnitude=True)
        for nt in (1, 2, 4):
            assert_same_mask(generate_unstructured_mask(v, s, n_threads=nt), want_v)
            assert_same_mask(magnitude_mask(v, s, n_threads=nt), want_m)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_large_structured_kernels_identical_across_threads(dtype):
    v = _large("ties", dtype, n=600 * 512).reshape(600, 512)
    cases = {
        "per_row": (lambda nt: magnitude_mask(v, 0.5, per_row=True, n_threads=nt),
                    lambda: ref.per_row_mask(v, 0.5, magnitude=True)),
        "nm24": (lambda nt: magnitude_nm_mask(v, 2, 4, n_threads=nt),
                 lambda: ref.nm_mask(v, 2, 4, magnitude=True)),
        "nm_axis0": (lambda nt: generate_nm_mask(v, 3, 8, axis=0, n_threads=nt),
                     lambda: ref.nm_mask(v, 3, 8, axis=0)),
        "block": (lambda nt: generate_block_mask(v, 0.4, (4, 8), n_threads=nt),
                  lambda: ref.block_mask(v, 0.4, (4, 8))),
        "row": (lambda nt: generate_row_mask(v, 0.4, n_threads=nt), lambda: ref.row_mask(v, 0.4)),
        "column": (lambda nt: generate_column_mask(v, 0.4, n_threads=nt),
                   lambda: ref.column_mask(v, 0.4)),
    }
    for label, (fast, slow) in cases.items():
        masks = [fast(nt).keep for nt in (1, 2, 4)]
        assert np.array_equal(masks[0], masks[1]) and np.array_equal(masks[0], masks[2]), label
        assert np.array_equal(masks[0], slow()), label


def test_large_global_apply_scores_identical_across_threads():
    parts = [_large("ties", "float32", 150_001, seed=1), _large("ties", "float16", 90_000, seed=2),
             _large("normal", "bfloat16", 70_000, seed=3).reshape(700, 100)]
    want = ref.global_masks(parts, 0.6)
    for nt in (1, 2, 4):
        got = generate_global_mask(parts, 0.6, n_threads=nt)
        for g, w in zip(got, want):
            assert_same_mask(g, w)
    w = _large("normal", "float32", 400_000, seed=4)
    keep = _large("ties", "float64", 400_000, seed=5) > 0
    results, stats = [], []
    for nt in (1, 2, 4):
        x = w.copy()
        SparsityMask(keep).apply(x, n_threads=nt)
        results.append(x)
        stats.append(MagnitudeImportance.l2().compute(w, n_threads=nt).stats)
    assert all(np.array_equal(results[0], r) for r in results)
    assert np.array_equal(results[0], ref.apply_mask(w, keep))
    assert stats[0] == stats[1] == stats[2]  # bit-identical statistics for every thread count
    assert SparsityMask(keep).nnz() == int(np.count_nonzero(keep))


def test_concurrent_python_threads_get_correct_results():
    rng = np.random.default_rng(7)
    arrays = [rng.choice(np.array(TIES), 120_000).astype(np.float32) + np.float32(i)
              for i in range(8)]
    jobs = []
    for i, a in enumerate(arrays):
        s = 0.1 + 0.1 * i
        jobs.append((lambda a=a, s=s: magnitude_mask(a, s, n_threads=2).keep,
                     ref.unstructured_mask(a, s, magnitude=True)))
        jobs.append((lambda a=a: generate_nm_mask(a, 2, 4, n_threads=2).keep,
                     ref.nm_mask(a, 2, 4)))
        jobs.append((lambda a=a, s=s: generate_global_mask([a, a[:1000]], s, n_threads=2)[0].keep,
                     ref.global_masks([a, a[:1000]], s)[0]))
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        for _ in range(2):
            futures = [(pool.submit(fn), want) for fn, want in jobs]
            for fut, want in futures:
                assert np.array_equal(fut.result(), want)


# ----------------------------------------------------------------------------------------------
# inputs are never mutated
# ----------------------------------------------------------------------------------------------

def _calls():
    """(public name, callable taking one array) for every public function of aprender.pruning."""
    return [
        ("generate_unstructured_mask", lambda a: generate_unstructured_mask(a, 0.5)),
        ("generate_unstructured_mask", lambda a: generate_unstructured_mask(a, 0.5, per_row=True)),
        ("magnitude_mask", lambda a: magnitude_mask(a, 0.5)),
        ("magnitude_mask", lambda a: magnitude_mask(a, 0.5, per_row=True)),
        ("generate_nm_mask", lambda a: generate_nm_mask(a, 2, 4)),
        ("magnitude_nm_mask", lambda a: magnitude_nm_mask(a, 1, 2, axis=0)),
        ("generate_global_mask", lambda a: generate_global_mask([a, a], 0.5)),
        ("generate_global_mask", lambda a: generate_global_mask({"x": a}, 0.5,
                                                                max_tensor_sparsity=0.6)),
        ("generate_block_mask", lambda a: generate_block_mask(a, 0.5, (2, 2))),
        ("generate_row_mask", lambda a: generate_row_mask(a, 0.5)),
        ("generate_column_mask", lambda a: generate_column_mask(a, 0.5)),
        ("MagnitudeImportance", lambda a: MagnitudeImportance.l1().compute(a)),
        ("MagnitudeImportance", lambda a: MagnitudeImportance.l2().compute(a)),
        ("MagnitudeImportance", lambda a: MagnitudeImportance(1.5).compute(a)),
        ("SparsityMask", lambda a: SparsityMask(a > 0)),
        ("SparsityMask", lambda a: SparsityMask(np.abs(ref.to_float64(a)) >= 0,
                                                SparsityPattern.unstructured())),
        # calibration-aware pruning: activations, weights and scores are read, never written
        ("ActivationStats", lambda a: pruning.ActivationStats(8, hessian=True).update(
            a, where=np.ones(8, bool))),
        ("CalibrationContext", lambda a: pruning.CalibrationContext(
            {"l": pruning.ActivationStats(8).update(a)})),
        ("WandaImportance", lambda a: pruning.WandaImportance().compute(
            a, pruning.ActivationStats(8).update(np.ones((2, 8), np.float32)))),
        ("wanda_scale", lambda a: pruning.wanda_scale(pruning.ActivationStats(8).update(a))),
        ("wanda_scores", lambda a: pruning.wanda_scores(
            a, np.ones(8, np.float64 if a.dtype.itemsize == 8 else np.float32))),
        ("owl_outlier_ratio", lambda a: pruning.owl_outlier_ratio([a, a], 2.0)),
        ("owl_sparsities", lambda a: pruning.owl_sparsities({"x": a, "y": [a, a]}, 0.5)),
        ("owl_allocation", lambda a: pruning.owl_allocation([0.5, 0.25], [a.size, 3], 0.5)),
        # SparseGPT reads the weights and the Hessian and returns new weights
        ("sparsegpt", lambda a: pruning.sparsegpt(a, _SPD8, 0.5)),
        ("sparsegpt", lambda a: pruning.sparsegpt(np.ones((3, 8), a.dtype), a.T @ a + np.eye(8),
                                                  pattern="2:4")
         if a.dtype.itemsize >= 4 else None),
        ("SparseGPTImportance", lambda a: pruning.SparseGPTImportance().compute(
            a, pruning.ActivationStats(8, hessian=True).update(np.eye(8, dtype=np.float32)))),
    ]


_SPD8 = np.eye(8) * 4 + 0.5  # a positive definite 8 x 8 Hessian


def _mask_calls():
    """Calls that take a mask array: the mask must not change either."""
    return [
        ("SparsityMask", lambda k: SparsityMask(k)),
        ("SparsityMask", lambda k: SparsityMask(k.astype(np.float32))),
        ("SparsityPattern", lambda k: SparsityPattern.nm(2, 4).count_groups(k)),
        ("SparsityPattern", lambda k: SparsityPattern.block_pattern(2, 2).count_groups(k)),
        ("SparsityPattern", lambda k: SparsityPattern.unstructured().validate(k)),
        ("SparsityMask", lambda k: SparsityMask(k).apply(np.ones(k.shape, np.float32))),
    ]


def _input_variants():
    rng = np.random.default_rng(11)
    base = rng.choice(np.array([-1.0, -0.0, 0.0, 0.5, 2.0]), (8, 8))
    out = []
    for name, dt in DTYPES.items():
        a = base.astype(dt)
        out += [a.copy(), np.asfortranarray(a), a.T]
        big = np.zeros((8, 16), dt)
        big[:, ::2] = a
        out.append(big[:, ::2])
        if name != "bfloat16":
            out.append(a.astype(a.dtype.newbyteorder(">" if np.little_endian else "<")))
    return out


def test_public_functions_are_all_covered_by_the_mutation_test():
    covered = {name for name, _ in _calls() + _mask_calls()}
    public = set()
    for n in pruning.__all__:
        obj = getattr(pruning, n)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            continue
        if callable(obj):
            public.add(n)
    # the protocol and the plain data classes take no arrays of their own
    public -= {"Importance", "ImportanceScores", "ImportanceStats", "OwlAllocation",
               "BlockStats", "ExpertStats"}
    assert public <= covered, f"add these to the mutation test: {sorted(public - covered)}"


def test_inputs_never_mutated():
    for a in _input_variants():
        for name, call in _calls():
            before = a.copy(order="K")
            flags = (a.flags.c_contiguous, a.flags.f_contiguous, a.flags.writeable)
            call(a)
            assert a.tobytes(order="A") == before.tobytes(order="A"), (name, a.dtype)
            assert (a.flags.c_contiguous, a.flags.f_contiguous, a.flags.writeable) == flags
        if a.dtype.itemsize == 2 and a.dtype.isnative and a.flags.c_contiguous:
            bits = Bits16(a.view(np.uint16), "float16" if a.dtype == np.float16 else "bfloat16")
            raw = bits.bits.copy()
            for name, call in _calls()[:14]:  # everything that takes weights or values
                call(bits)
                assert np.array_equal(bits.bits, raw), name
    keep = np.random.default_rng(12).integers(0, 2, (8, 8)).astype(bool)
    keep[:, 1::2] = ~keep[:, ::2]  # a valid 1:2 (hence 2:4) mask
    for k in (keep.copy(), np.asfortranarray(keep), keep.T, keep.view(np.uint8)):
        for name, call in _mask_calls():
            before = k.copy()
            call(k)
            assert np.array_equal(k, before), name


def test_scores_object_is_usable_as_values_and_not_mutated():
    w = np.linspace(-2, 2, 64, dtype=np.float32).reshape(8, 8)
    sc = MagnitudeImportance.l2().compute(w)
    before = sc.values.copy()
    m1 = generate_unstructured_mask(sc, 0.5)
    m2 = magnitude_mask(w, 0.5)
    assert np.array_equal(sc.values, before)
    assert np.array_equal(m1.keep, m2.keep)


def test_module_with_weight_attribute():
    lin = aprender.nn.Linear(16, 8, seed=3)
    w = lin.weight.copy()
    sc = MagnitudeImportance.l1().compute(lin)
    assert np.array_equal(lin.weight, w)
    assert np.array_equal(sc.values, np.abs(w))
