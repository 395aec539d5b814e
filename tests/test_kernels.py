"""Each kernel against the slow references in aprender._reference, on sizes that reach the
parallel, sampled and fallback paths, over dtypes, orders and thread counts."""
import numpy as np
import pytest

import aprender._reference as ref
from aprender import Bits16
from aprender._kernels import select
from aprender.pruning import selection
from aprender.pruning import (MagnitudeImportance, NumericalInstabilityError, SparsityMask, generate_block_mask,
                              generate_column_mask, generate_global_mask, generate_nm_mask,
                              generate_row_mask, generate_unstructured_mask, magnitude_mask,
                              magnitude_nm_mask)

ml_dtypes = pytest.importorskip("ml_dtypes")
DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]
DT_IDS = ["f16", "bf16", "f32", "f64"]


def sample(shape, dtype, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    if ties:
        x = rng.choice(np.array([-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0]), size=shape)
    else:
        x = rng.standard_normal(shape)
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (64, 33), (300, 1000), (1, 200_001)])
@pytest.mark.parametrize("ties", [False, True])
def test_unstructured_vs_reference(dtype, shape, ties):
    w = sample(shape, dtype, seed=shape[-1], ties=ties)
    for sparsity in (0.0, 0.3, 0.5, 0.97, 1.0):
        exp = ref.unstructured_mask(w, sparsity, magnitude=True)
        np.testing.assert_array_equal(np.asarray(magnitude_mask(w, sparsity)), exp)
        vals = np.abs(w)
        np.testing.assert_array_equal(np.asarray(generate_unstructured_mask(vals, sparsity)),
                                      ref.unstructured_mask(vals, sparsity))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_signed_values_and_threads(dtype):
    w = sample((512, 640), dtype, seed=3)
    exp = ref.unstructured_mask(w, 0.42)
    for nt in (1, 2, 4):
        np.testing.assert_array_equal(np.asarray(generate_unstructured_mask(w, 0.42, n_threads=nt)),
                                      exp)


def test_fallback_radix_path_is_exact():
    """A bracket that cannot hold the candidates (tiny budget) takes the radix histogram path."""
    for dtype in (np.float16, np.float32, np.float64):
        x = sample(300_000, dtype, seed=9, ties=dtype == np.float16)
        kern = x.view(np.uint16) if x.dtype.itemsize == 2 else x
        k = 123_457
        t1, b1, bad1, m1 = selection.find_threshold([kern], [x.size], k, 1, 0x7C00, 2)
        t2, b2, bad2, m2 = selection.find_threshold([kern], [x.size], k, 1, 0x7C00, 2, 10)
        assert (m1, m2) == ("sample", "radix") and (t1, b1) == (t2, b2) and bad1 == bad2 == 0


def test_adversarial_layouts_stay_exact():
    # sorted, reversed, all-equal and two-valued inputs: the sample bracket must not matter
    n = 400_000
    for x in (np.arange(n, dtype=np.float32), np.arange(n, 0, -1).astype(np.float32),
              np.ones(n, np.float32), np.repeat(np.array([1.0, 2.0], np.float32), n // 2)):
        for s in (0.1, 0.5, 0.9):
            np.testing.assert_array_equal(np.asarray(magnitude_mask(x, s)),
                                          ref.unstructured_mask(x, s, magnitude=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(1, 8), (5, 17), (300, 256), (2, 3, 40)])
def test_per_row_vs_reference(dtype, shape):
    w = sample(shape, dtype, seed=1, ties=True)
    for s in (0.0, 0.25, 0.5, 1.0):
        np.testing.assert_array_equal(np.asarray(magnitude_mask(w, s, per_row=True)),
                                      ref.per_row_mask(w, s, magnitude=True))
        np.testing.assert_array_equal(
            np.asarray(generate_unstructured_mask(w, s, per_row=True, n_threads=2)),
            ref.per_row_mask(w, s))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(160, 1024), (96, 1539), (70, 4096)])
def test_per_row_shared_bracket_vs_reference(dtype, shape):
    # long rows take the shared bracket (one pass, candidates' select); rows scaled apart from
    # the others miss it and take the exact radix select; ties and signed order ride along
    rng = np.random.default_rng(shape[1])
    w = sample(shape, dtype, seed=2, ties=shape[0] == 96)
    scale = np.ones((shape[0], 1))
    scale[::7] = 64.0  # every 7th row misses the bracket
    w = (np.asarray(w, dtype=np.float64) * scale).astype(dtype)
    w[3] = w[3, 0]  # an all-equal row: every key is the threshold
    w[5, rng.integers(0, shape[1], 40)] = 0.0
    for s in (0.1, 0.5, 0.77):
        want = ref.per_row_mask(w, s, magnitude=True)
        for nt in (1, 2, 3):
            np.testing.assert_array_equal(
                np.asarray(magnitude_mask(w, s, per_row=True, n_threads=nt)), want)
        was = select.simd(False)  # the scalar mark pass
        try:
            np.testing.assert_array_equal(
                np.asarray(magnitude_mask(w, s, per_row=True, n_threads=2)), want)
        finally:
            select.simd(was)
        np.testing.assert_array_equal(
            np.asarray(generate_unstructured_mask(w, s, per_row=True, n_threads=2)),
            ref.per_row_mask(w, s))


def test_per_row_shared_bracket_non_finite():
    w = np.random.default_rng(0).standard_normal((128, 2048)).astype(np.float32)
    for bad in (np.inf, np.nan):
        v = w.copy()
        v[77, 1000] = bad
        with pytest.raises(NumericalInstabilityError):
            magnitude_mask(v, 0.5, per_row=True, n_threads=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2), (5, 16), (7, 32), (1, 1)])
def test_nm_vs_reference(dtype, n, m):
    w = sample((96, 64), dtype, seed=m, ties=(n + m) % 2 == 0)
    np.testing.assert_array_equal(np.asarray(magnitude_nm_mask(w, n, m)),
                                  ref.nm_mask(w, n, m, magnitude=True))
    np.testing.assert_array_equal(np.asarray(generate_nm_mask(w, n, m, axis=0, n_threads=2)),
                                  ref.nm_mask(w, n, m, axis=0))


def test_nm_middle_axis_and_large():
    w = sample((6, 16, 5), np.float32, seed=2, ties=True)
    np.testing.assert_array_equal(np.asarray(generate_nm_mask(w, 2, 4, axis=1)),
                                  ref.nm_mask(w, 2, 4, axis=1))
    big = sample((1024, 512), np.float32, seed=5)
    m = magnitude_nm_mask(big, 2, 4, n_threads=2)
    np.testing.assert_array_equal(np.asarray(m), ref.nm_mask(big, 2, 4, magnitude=True))
    assert m.pattern.count_groups(m) == (big.size // 4, big.size // 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_global_vs_reference(dtype):
    parts = [sample(s, dtype, seed=i, ties=i == 1) for i, s in enumerate([(64, 48), (1000,),
                                                                         (3, 7), (200, 300)])]
    vals = [np.abs(p) for p in parts]
    for s in (0.0, 0.33, 0.5, 0.9, 1.0):
        got = generate_global_mask(vals, s, n_threads=2)
        for g, e in zip(got, ref.global_masks(vals, s)):
            np.testing.assert_array_equal(np.asarray(g), e)
    named = generate_global_mask({"a": vals[0], "b": vals[1]}, 0.5)
    assert list(named) == ["a", "b"]


def test_global_mixed_dtypes_compare_exactly():
    a = sample((50, 40), np.float16, seed=1)
    b = sample((30, 30), ml_dtypes.bfloat16, seed=2)
    c = sample((20, 20), np.float32, seed=3)
    vals = [np.abs(a), np.abs(b), np.abs(c)]
    for g, e in zip(generate_global_mask(vals, 0.6), ref.global_masks(vals, 0.6)):
        np.testing.assert_array_equal(np.asarray(g), e)


def test_global_max_tensor_sparsity_keeps_total_exact():
    rng = np.random.default_rng(0)
    small = np.abs(rng.standard_normal((64, 64))).astype(np.float32) * 1e-3  # would collapse
    big = np.abs(rng.standard_normal((128, 128))).astype(np.float32)
    plain = generate_global_mask([small, big], 0.5)
    assert plain[0].sparsity() == 1.0
    capped = generate_global_mask([small, big], 0.5, max_tensor_sparsity=0.8)
    total = small.size + big.size
    assert capped[0].num_zeros() == int(np.floor(0.8 * small.size))
    assert capped[0].num_zeros() + capped[1].num_zeros() == round(0.5 * total)
    # what the capped tensor could not take came from the smallest of the other
    kept_big = big[np.asarray(capped[1])]
    assert big[~np.asarray(capped[1])].max() <= kept_big.min()


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_structured_vs_reference(dtype):
    v = np.abs(sample((48, 64), dtype, seed=4, ties=True))
    for s in (0.0, 0.3, 0.5, 1.0):
        np.testing.assert_array_equal(np.asarray(generate_block_mask(v, s, (4, 8))),
                                      ref.block_mask(v, s, (4, 8)))
        np.testing.assert_array_equal(np.asarray(generate_row_mask(v, s)), ref.row_mask(v, s))
        np.testing.assert_array_equal(np.asarray(generate_column_mask(v, s, n_threads=2)),
                                      ref.column_mask(v, s))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64,
                                   np.int8, np.uint8, np.int32, np.int64], ids=str)
def test_apply_every_dtype(dtype):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((300, 301)) * 10).astype(dtype)
    keep = rng.random(w.shape) < 0.5
    out = w.copy()
    SparsityMask(keep).apply(out, n_threads=2)
    np.testing.assert_array_equal(out.view(np.uint8), ref.apply_mask(w, keep).view(np.uint8))


def test_apply_zeroes_nan_weights():
    w = np.array([np.nan, 1.0, np.inf, 2.0], np.float32)
    SparsityMask(np.array([False, True, False, True])).apply(w)
    np.testing.assert_array_equal(w, [0.0, 1.0, 0.0, 2.0])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("p", [1, 2, 3, 0.5])
def test_scores_and_stats_vs_reference(dtype, p):
    w = sample((257, 300), dtype, seed=6)
    s = MagnitudeImportance(p).compute(w, n_threads=2)
    assert s.values.dtype == w.dtype
    exp = ref.scores(w, p)
    if p in (1, 2):
        np.testing.assert_array_equal(s.values.view(np.uint8), exp.view(np.uint8))
    else:
        np.testing.assert_allclose(ref.to_float64(s.values), ref.to_float64(exp), rtol=1e-2)
    mn, mx, mean, std = ref.stats(s.values)
    assert (s.stats.min, s.stats.max) == (mn, mx)
    assert s.stats.mean == pytest.approx(mean, rel=1e-12)
    assert s.stats.std == pytest.approx(std, rel=1e-9)
    # statistics do not depend on the thread count
    assert MagnitudeImportance(p).compute(w, n_threads=1).stats == s.stats


def test_f16_rounding_of_squares_is_exact_over_all_halves():
    bits = np.arange(0, 0x5BFF + 1, dtype=np.uint16)  # every half whose square is finite
    w = bits.view(np.float16)
    s = MagnitudeImportance.l2().compute(w).values
    np.testing.assert_array_equal(s, (w.astype(np.float32) ** 2).astype(np.float16))
    with pytest.raises(NumericalInstabilityError, match=r"index \(1,\) overflows float16"):
        MagnitudeImportance.l2().compute(np.array([1.0, 256.0], np.float16))
    raw = np.arange(0, 0x5F80, dtype=np.uint16)  # bfloat16 with finite squares
    b = MagnitudeImportance.l2().compute(Bits16(raw, "bfloat16")).values
    assert isinstance(b, Bits16) and b.format == "bfloat16"
    wb = raw.view(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(b.bits, (wb.astype(np.float32) ** 2).astype(ml_dtypes.bfloat16)
                                  .view(np.uint16))


def test_orders_and_byte_orders_give_same_masks():
    w = sample((64, 48), np.float32, seed=8, ties=True)
    base = np.asarray(magnitude_mask(w, 0.5))
    np.testing.assert_array_equal(np.asarray(magnitude_mask(np.asfortranarray(w), 0.5)), base)
    np.testing.assert_array_equal(np.asarray(magnitude_mask(w.astype(">f4"), 0.5)), base)
    wide = np.zeros((64, 96), np.float32)
    wide[:, ::2] = w
    np.testing.assert_array_equal(np.asarray(magnitude_mask(wide[:, ::2], 0.5)), base)


def test_bits16_matches_ml_dtypes():
    w = sample((100, 64), ml_dtypes.bfloat16, seed=2, ties=True)
    raw = Bits16(w.view(np.uint16), "bfloat16")
    np.testing.assert_array_equal(np.asarray(magnitude_mask(raw, 0.5)),
                                  np.asarray(magnitude_mask(w, 0.5)))
    np.testing.assert_array_equal(np.asarray(magnitude_nm_mask(raw, 2, 4)),
                                  np.asarray(magnitude_nm_mask(w, 2, 4)))


def test_inputs_are_not_modified():
    w = sample((256, 256), np.float32, seed=1, ties=True)
    before = w.copy()
    magnitude_mask(w, 0.5)
    generate_unstructured_mask(w, 0.5, per_row=True)
    generate_nm_mask(w, 2, 4)
    generate_global_mask([w, w], 0.5)
    generate_block_mask(np.abs(w), 0.5, (4, 4))
    MagnitudeImportance.l2().compute(w)
    np.testing.assert_array_equal(w, before)


def test_radix_select_matches_sort():
    rng = np.random.default_rng(0)
    for n in (1, 2, 17, 1000, 50_000):
        for hi in (3, 2**63):
            a = rng.integers(0, hi, n, dtype=np.uint64)
            for arr in (a, np.sort(a), np.sort(a)[::-1].copy()):
                r = int(rng.integers(0, n))
                b = arr.copy()
                assert select.select_keys(b, r) == np.sort(arr)[r]
                assert np.array_equal(np.sort(b), np.sort(arr))  # only permuted
                t, below = select.select_keys_below(arr.copy(), r)
                assert t == np.sort(arr)[r] and below == np.count_nonzero(arr < t)


def test_global_with_many_tiny_tensors_after_a_large_one():
    """Tiny tensors whose share of the sample is smaller than their size must not write past
    their slots of the sample buffer (a heap overflow, found in review)."""
    rng = np.random.default_rng(3)
    vals = [np.abs(rng.standard_normal(1_500_000)).astype(np.float32)] + \
        [np.abs(rng.standard_normal(n)).astype(np.float32) for n in [15, 10, 12, 9, 15] * 40]
    for g, e in zip(generate_global_mask(vals, 0.5, n_threads=1), ref.global_masks(vals, 0.5)):
        np.testing.assert_array_equal(np.asarray(g), e)
    x = np.arange(15, dtype=np.float32)
    buf = np.full(20, 0xDEAD, np.uint64)
    got = select.sample_keys(x, 1, 1, 0, 1, buf[:9])
    assert got.shape[0] <= 1 and np.all(buf[9:] == 0xDEAD)


def test_count_groups_accepts_numeric_masks():
    from aprender.pruning import SparsityPattern

    p = SparsityPattern.nm(2, 4)
    assert p.count_groups(np.array([[2, 0, 0, 0], [1, 1, 1, 0]])) == (1, 2)
    assert p.validate(np.array([[1, 0, 0, 1]], dtype=np.int64))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=["f16", "f32", "f64"])
def test_mark_collect_equals_mark_and_gather(dtype):
    # the fused mark pass collects exactly the candidates (keys, positions, flat order) that
    # gather_marked reads from mark_pass's marks, per task; a capacity too small says so
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(100_003) * 3).astype(dtype)
    x[::97] = 0.0
    kern = x.view(np.uint16) if x.dtype.itemsize == 2 else x
    kdt = {2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize]
    lo = int(np.sort(np.abs(x).astype(dtype).view(kdt))[40_000]) | (1 << (8 * x.itemsize - 1))
    hi = int(np.sort(np.abs(x).astype(dtype).view(kdt))[43_000]) | (1 << (8 * x.itemsize - 1))
    for nt in (1, 2, 3):
        a = np.empty(x.size, np.uint8)
        b = np.empty(x.size, np.uint8)
        below, inside, bad, counts = select.mark_pass(kern, lo, hi, 1, 0, a, nt)
        keys = np.empty(inside, kdt)
        pos = np.empty(inside, np.uint32)
        select.gather_marked(kern, a, counts, 1, keys, nt, pos)
        ck = np.empty(8000 * len(counts), kdt)
        cp = np.empty(8000 * len(counts), np.uint32)
        b2, i2, bad2, c2, got = select.mark_collect(kern, lo, hi, 1, 0, b, ck, cp, nt)
        assert (b2, i2, bad2) == (below, inside, bad) and np.array_equal(a, b)
        assert np.array_equal(c2, counts) and got is not None
        per = ck.shape[0] // len(got)
        gk = np.concatenate([ck[t * per:t * per + g] for t, g in enumerate(got)])
        gp = np.concatenate([cp[t * per:t * per + g] for t, g in enumerate(got)])
        np.testing.assert_array_equal(gk, keys)
        np.testing.assert_array_equal(gp, pos)
        small = select.mark_collect(kern, lo, hi, 1, 0, b, ck[:100], cp[:100], nt)
        assert small[4] is None and np.array_equal(a, b)


def _native_keys(bits, magnitude):
    """Order keys of raw float bits (unsigned, the input's width), written out plainly."""
    w = bits.dtype.itemsize * 8
    sign = np.array(1 << (w - 1), dtype=bits.dtype)
    b = bits & ~sign if magnitude else bits.copy()
    b[b == sign] = 0  # -0 is +0
    neg = (b & sign) != 0
    return np.where(neg, ~b, b | sign)


@pytest.mark.parametrize("fmt", ["f16", "bf16", "f32", "f64"])
@pytest.mark.parametrize("magnitude", [1, 0])
def test_mark_simd_equals_scalar(fmt, magnitude):
    # the AVX2 mark pass (32 keys a step, scalar tail) writes the same marks, counts the same keys
    # and collects the same candidates in the same order as the scalar pass, on every length,
    # with +-0, subnormals, ties, infinities and NaNs, and the same overflow rule
    dtype = {"f16": np.float16, "bf16": ml_dtypes.bfloat16, "f32": np.float32,
             "f64": np.float64}[fmt]
    kdt = {"f16": np.uint16, "bf16": np.uint16, "f32": np.uint32, "f64": np.uint64}[fmt]
    rng = np.random.default_rng(11)
    inf16 = {"f16": 0x7C00, "bf16": 0x7F80, "f32": 0, "f64": 0}[fmt]
    for n in list(range(0, 70)) + [1000, 100_003]:
        x = (rng.standard_normal(n) * 2).astype(dtype)
        x[::5] = np.round(x[::5])
        x[::7] = -0.0
        x[::11] = 0.0
        if n > 50:
            x[13] = np.inf
            x[29] = -np.inf
            x[41] = np.nan
        bits = x.view(kdt)
        kern = bits if kdt == np.uint16 else x  # float32/64, or 16-bit patterns
        keys = np.sort(_native_keys(bits, magnitude))
        for lo_q, hi_q in [(0.4, 0.45), (0.0, 1.0), (0.5, 0.5), (0.9, 0.2)]:
            if n == 0:
                lo = hi = 1 << 15
            else:
                lo, hi = int(keys[int(lo_q * (n - 1))]), int(keys[int(hi_q * (n - 1))])
            for nt in (1, 2):
                res = {}
                for on in (False, True):
                    was = select.simd(on)
                    try:
                        out = np.full(n, 7, np.uint8)
                        plain = select.mark_pass(kern, lo, hi, magnitude, inf16, out.copy(), nt)
                        per = max(n, 1)
                        ck = np.zeros(per * 2, kdt)
                        cp = np.zeros(per * 2, np.uint32)
                        got = select.mark_collect(kern, lo, hi, magnitude, inf16, out, ck, cp,
                                                  nt)
                        inside = got[1]
                        short = select.mark_collect(kern, lo, hi, magnitude, inf16,
                                                    np.empty(n, np.uint8),
                                                    np.empty(max(inside - 1, 0), kdt),
                                                    np.empty(max(inside - 1, 0), np.uint32), nt)
                    finally:
                        select.simd(was)
                    assert plain[:3] == got[:3]
                    res[on] = (out, got, ck, cp, short)
                (o0, g0, k0, p0, s0), (o1, g1, k1, p1, s1) = res[False], res[True]
                np.testing.assert_array_equal(o1, o0)
                assert g1[:3] == g0[:3]
                np.testing.assert_array_equal(g1[3], g0[3])
                np.testing.assert_array_equal(g1[4], g0[4])
                if g0[4] is not None:  # what each task collected (slots past it are scratch)
                    per = k0.shape[0] // len(g0[4])
                    for t, g in enumerate(g0[4]):
                        span = slice(t * per, t * per + int(g))
                        np.testing.assert_array_equal(k1[span], k0[span])
                        np.testing.assert_array_equal(p1[span], p0[span])
                        assert np.all(p0[span][1:] > p0[span][:-1])  # flat order
                        np.testing.assert_array_equal(  # the candidates' own keys
                            k0[span], _native_keys(bits, magnitude)[p0[span]])
                assert s1[:3] == s0[:3] and (s1[4] is None) == (s0[4] is None)
                if nt == 1 and inside:  # one task: one slot short never fits
                    assert s1[4] is None
                if nt == 1 and g0[4] is not None:  # exactly enough slots: the same candidates
                    for on in (False, True):
                        was = select.simd(on)
                        try:
                            ek, ep = np.empty(g0[1], kdt), np.empty(g0[1], np.uint32)
                            ex = select.mark_collect(kern, lo, hi, magnitude, inf16,
                                                     np.empty(n, np.uint8), ek, ep, 1)
                        finally:
                            select.simd(was)
                        assert list(ex[4]) == [g0[1]]
                        np.testing.assert_array_equal(ek, k0[:g0[1]])
                        np.testing.assert_array_equal(ep, p0[:g0[1]])
                # the marks themselves, against the definition
                if n:
                    k = _native_keys(bits, magnitude)
                    want = np.where(k > hi, 1, np.where(k < lo, 0, 2)).astype(np.uint8)
                    np.testing.assert_array_equal(o1, want)  # crossed brackets too


@pytest.mark.parametrize("kdt", [np.uint16, np.uint32, np.uint64])
def test_sample_bracket_holds_its_ranks(kdt):
    # the bracket from histogram bins contains the keys of both ranks, counts exactly the keys
    # inside it, reads the buffer only, and on spread keys is as tight as promised
    rng = np.random.default_rng(int(np.dtype(kdt).itemsize))
    top = np.iinfo(kdt).max
    f = {np.uint16: np.float16, np.uint32: np.float32, np.uint64: np.float64}[kdt]
    cases = [
        np.abs(rng.standard_normal(262_144)).astype(f).view(kdt),
        rng.integers(0, top, 50_000, dtype=kdt, endpoint=True),
        rng.choice(np.array([0, 1, 5, top], dtype=kdt), 10_000),
        np.full(1000, 3, dtype=kdt),
        np.array([top], dtype=kdt),
        np.array([0, top], dtype=kdt),
        np.concatenate([np.zeros(5000, kdt), np.abs(rng.standard_normal(5000)).astype(f).view(kdt)]),
    ]
    for keys in cases:
        n = keys.shape[0]
        srt = np.sort(keys)
        for q, h in [(0.5, 0.004), (0.1, 0.01), (0.99, 0.001), (0.0, 0.0), (1.0, 0.0), (0.3, 0.4)]:
            r_lo = min(n - 1, max(0, int((q - h) * n)))
            r_hi = min(n - 1, max(r_lo, int((q + h) * n)))
            before = keys.copy()
            lo, hi, inside = select.sample_bracket(keys, r_lo, r_hi)
            assert np.array_equal(keys, before)
            assert lo <= srt[r_lo] and hi >= srt[r_hi]
            assert inside == np.count_nonzero((keys >= lo) & (keys <= hi))
        if n == 262_144:  # spread keys: refined to within 5/4 of the ranks' span plus 64
            lo, hi, inside = select.sample_bracket(keys, 130_000, 132_000)
            assert inside <= 2001 * 5 // 4 + 64


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_nm4_avx2_equals_scalar_and_reference(n):
    # N:4 along rows of float32 runs an AVX2 kernel (eight groups a step, scalar tail); the
    # scalar kernel and the reference must agree on ties, +-0, subnormals and odd group counts
    from aprender._kernels import nm

    rng = np.random.default_rng(n)
    for shape in [(64, 64), (33, 100), (300, 1028), (3, 4)]:
        w = rng.standard_normal(shape).astype(np.float32)
        w.flat[::5] = np.round(w.flat[::5])
        w.flat[::7] = -0.0
        w.flat[::11] = 0.0
        w.flat[::13] = np.float32(1e-45)
        want = ref.nm_mask(w, n, 4, magnitude=True)
        for nt in (1, 2, 3):
            np.testing.assert_array_equal(np.asarray(magnitude_nm_mask(w, n, 4, n_threads=nt)),
                                          want)
        np.testing.assert_array_equal(np.asarray(generate_nm_mask(w, n, 4, n_threads=2)),
                                      ref.nm_mask(w, n, 4))
        was = nm.simd(False)
        try:
            np.testing.assert_array_equal(np.asarray(magnitude_nm_mask(w, n, 4)), want)
        finally:
            nm.simd(was)
    bad = rng.standard_normal((64, 64)).astype(np.float32)
    bad[40, 13] = np.nan
    with pytest.raises(NumericalInstabilityError):
        magnitude_nm_mask(bad, n, 4)
