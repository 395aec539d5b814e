"""Wanda importance (scores against the reference, the CLI helpers, typed errors) and OWL layer
sparsities (outlier ratios against the reference, exact totals, monotonicity, bounds)."""
import math

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

from aprender import Bits16  # noqa: E402
from aprender import _reference as ref  # noqa: E402
from aprender._validation import prune_count  # noqa: E402
from aprender.pruning import (ActivationStats, CalibrationContext,  # noqa: E402
                              CalibrationError, CalibrationRequiredError,
                              ImportanceScores, InvalidArgumentError, InvalidCalibrationError,
                              InvalidDTypeError, InvalidShapeError, InvalidSparsityError,
                              MagnitudeImportance, MissingActivationStatsError,
                              NumericalInstabilityError, OwlAllocation, ShapeMismatchError,
                              WandaImportance, generate_nm_mask, generate_unstructured_mask,
                              owl_allocation, owl_outlier_ratio, owl_sparsities, wanda_scale,
                              wanda_scores)

DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
          "bfloat16": ml_dtypes.bfloat16}


def stats_for(d, seed=0, rows=50):
    x = np.random.default_rng(seed).standard_normal((rows, d)) * np.linspace(0.1, 5, d)
    return ActivationStats(d).update(x.astype(np.float32))


def weights(shape, dtype, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(DTYPES[dtype])


# ----------------------------------------------------------------------------------------------
# Wanda
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 300), (3, 4, 33), (0, 8), (33,)],
                         ids=str)
def test_wanda_scores_equal_reference(dtype, shape):
    st = stats_for(shape[-1])
    w = weights(shape, dtype)
    sc = WandaImportance().compute(w, st)
    expect = ref.wanda_scores(w, st.sum_squares)
    assert sc.values.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert sc.values.shape == w.shape and sc.method == "wanda"
    np.testing.assert_array_equal(sc.values, expect)
    if w.size:
        assert sc.stats.count == w.size
        assert sc.stats.max == pytest.approx(float(expect.max()))
        assert sc.stats.mean == pytest.approx(float(expect.astype(np.float64).mean()))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_score_is_float32_abs_times_float32_scale(dtype):
    """The documented formula, element by element: CLI and API agree bit for bit."""
    st = stats_for(40, seed=3)
    w = weights((16, 40), dtype, seed=4)
    scale = wanda_scale(st)
    assert scale.dtype == np.float32
    np.testing.assert_array_equal(scale, np.sqrt(st.sum_squares).astype(np.float32))
    expect = np.abs(w.astype(np.float32)) * scale  # numpy float32 multiply
    got = WandaImportance().compute(w, st).values
    np.testing.assert_array_equal(got, expect)
    # the CLI computes row chunks with wanda_scores: the same bits
    chunks = np.concatenate([wanda_scores(w[i:i + 5], scale) for i in range(0, 16, 5)])
    np.testing.assert_array_equal(chunks, got)
    out = np.empty((16, 40), np.float32)
    assert wanda_scores(w, scale, out=out) is out
    np.testing.assert_array_equal(out, got)


def test_scores_independent_of_threads_and_inputs():
    st = stats_for(300, seed=5)
    w = weights((400, 300), "bfloat16", seed=6)
    base = WandaImportance().compute(w, st, n_threads=1).values
    for nt in (2, 4, 64):
        np.testing.assert_array_equal(WandaImportance().compute(w, st, n_threads=nt).values, base)
    np.testing.assert_array_equal(
        WandaImportance().compute(Bits16(w.view(np.uint16), "bfloat16"), st).values, base)
    np.testing.assert_array_equal(WandaImportance().compute(np.asfortranarray(w), st).values,
                                  base)
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(w.view(np.int16)).view(torch.bfloat16)
    np.testing.assert_array_equal(WandaImportance().compute(t, st).values, base)
    lin = torch.nn.Linear(300, 400, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(t)
    np.testing.assert_array_equal(WandaImportance().compute(lin, st).values, base)


def test_wanda_with_a_context():
    st = stats_for(12)
    ctx = CalibrationContext({"blk.fc": st})
    w = weights((5, 12), "float32")
    a = WandaImportance("blk.fc").compute(w, ctx)
    b = WandaImportance().compute(w, st)
    np.testing.assert_array_equal(a.values, b.values)
    imp = WandaImportance("blk.fc")
    assert imp.name == "wanda" and imp.requires_calibration is True
    assert "blk.fc" in repr(imp) and isinstance(a, ImportanceScores)
    # masks: per-row (Wanda's default grouping) and N:M along the input dimension
    m = generate_unstructured_mask(a, 0.5, per_row=True)
    assert (m.keep.sum(axis=1) == 6).all()
    np.testing.assert_array_equal(m.keep, ref.per_row_mask(a.values, 0.5))
    nm = generate_nm_mask(a, 2, 4)
    np.testing.assert_array_equal(nm.keep, ref.nm_mask(a.values, 2, 4))


def test_wanda_errors():
    st = stats_for(12)
    ctx = CalibrationContext({"fc": st})
    w = weights((5, 12), "float32")
    with pytest.raises(CalibrationRequiredError, match="calibration") as info:
        WandaImportance("fc").compute(w)
    assert isinstance(info.value, ValueError)
    with pytest.raises(MissingActivationStatsError, match="'fc2'") as info:
        WandaImportance("fc2").compute(w, ctx)
    assert info.value.layer == "fc2" and isinstance(info.value, KeyError)
    with pytest.raises(ShapeMismatchError, match=r"\(5, 10\).*'fc'.*\(12,\)"):
        WandaImportance("fc").compute(w[:, :10], ctx)
    with pytest.raises(InvalidCalibrationError):
        WandaImportance("fc").compute(w, {"fc": st})
    with pytest.raises(InvalidCalibrationError):
        WandaImportance("fc").compute(w, st.sum_squares)
    with pytest.raises(InvalidArgumentError, match="layer_name"):
        WandaImportance().compute(w, ctx)
    with pytest.raises(InvalidArgumentError):
        WandaImportance(3)
    with pytest.raises(CalibrationError, match="no tokens"):
        WandaImportance().compute(w, ActivationStats(12))
    bad = w.copy()
    bad[2, 3] = np.nan
    with pytest.raises(NumericalInstabilityError) as info:
        WandaImportance().compute(bad, st)
    assert info.value.index == (2, 3)
    big = np.full((2, 12), 3e38, np.float32)
    with pytest.raises(NumericalInstabilityError, match="overflows float32"):
        WandaImportance().compute(big, st)
    h = weights((2, 12), "float16")
    h[1, 1] = np.inf
    with pytest.raises(NumericalInstabilityError) as info:
        WandaImportance().compute(h, st)
    assert info.value.index == (1, 1)
    with pytest.raises(InvalidDTypeError):
        WandaImportance().compute(np.ones((2, 12), np.int32), st)


def test_wanda_scale_and_scores_errors():
    st = stats_for(6)
    with pytest.raises(InvalidCalibrationError):
        wanda_scale(CalibrationContext({"a": st}))
    with pytest.raises(InvalidDTypeError):
        wanda_scale(st, np.float16)
    assert wanda_scale(st, np.float64).dtype == np.float64
    huge = ActivationStats(2).update(np.array([[1e100, 1.0]]))
    with pytest.raises(NumericalInstabilityError, match="feature 0"):
        wanda_scale(huge)
    np.testing.assert_array_equal(wanda_scale(huge, np.float64), np.sqrt(huge.sum_squares))
    w = weights((3, 6), "float32")
    with pytest.raises(InvalidDTypeError, match="float32 scale"):
        wanda_scores(w, wanda_scale(st, np.float64))
    with pytest.raises(InvalidDTypeError, match="float64 scale"):
        wanda_scores(w.astype(np.float64), wanda_scale(st))
    with pytest.raises(ShapeMismatchError):
        wanda_scores(w, np.ones(5, np.float32))
    with pytest.raises(InvalidArgumentError):
        wanda_scores(w, wanda_scale(st), out=np.empty((3, 6), np.float64))
    with pytest.raises(InvalidShapeError):
        wanda_scores(np.float32(1.0), np.ones(1, np.float32))


def test_magnitude_accepts_calibration_data():
    st = stats_for(4)
    w = weights((2, 4), "float32")
    ctx = CalibrationContext({"a": st})
    base = MagnitudeImportance.l1().compute(w).values
    np.testing.assert_array_equal(MagnitudeImportance.l1().compute(w, ctx).values, base)
    np.testing.assert_array_equal(MagnitudeImportance.l1().compute(w, st).values, base)
    with pytest.raises(InvalidCalibrationError):
        MagnitudeImportance.l1().compute(w, "ctx")


# ----------------------------------------------------------------------------------------------
# OWL
# ----------------------------------------------------------------------------------------------

def heavy_tailed(n, outliers, seed):
    rng = np.random.default_rng(seed)
    s = rng.random(n).astype(np.float32)
    s[rng.choice(n, outliers, replace=False)] = 50.0
    return s


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_outlier_ratio_equals_reference(dtype):
    s = heavy_tailed(3000, 37, seed=1).astype(DTYPES[dtype])
    assert owl_outlier_ratio(s) == ref.outlier_ratio([s], 5.0)
    assert owl_outlier_ratio(s, m=2.0) == ref.outlier_ratio([s], 2.0)
    t = heavy_tailed(500, 2, seed=2).astype(DTYPES[dtype]).reshape(20, 25)
    assert owl_outlier_ratio([s, t]) == ref.outlier_ratio([s, t], 5.0)
    assert 0.0 < owl_outlier_ratio(s) < 0.05


def test_outlier_ratio_details():
    assert owl_outlier_ratio(np.zeros(0, np.float32)) == 0.0
    assert owl_outlier_ratio(np.zeros(10, np.float32)) == 0.0  # nothing > 5 * 0
    s = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 11], np.float32)  # mean 2: 11 > 10
    assert owl_outlier_ratio(s) == 0.1
    # mean 2: 6 is not above 10
    assert owl_outlier_ratio(np.array([1, 1, 1, 1, 6], np.float32)) == 0.0
    big = heavy_tailed(200_000, 1000, seed=3)  # several kernel chunks
    assert owl_outlier_ratio(big, n_threads=1) == owl_outlier_ratio(big, n_threads=4) == \
        ref.outlier_ratio([big], 5.0)
    sc = WandaImportance().compute(weights((8, 6), "float32"), stats_for(6))
    assert owl_outlier_ratio(sc) == ref.outlier_ratio([sc.values], 5.0)
    with pytest.raises(NumericalInstabilityError):
        owl_outlier_ratio(np.array([1.0, np.nan], np.float32))
    for m in (0, -1, float("nan"), float("inf"), "5", True, None):
        with pytest.raises(InvalidArgumentError):
            owl_outlier_ratio(s, m=m)


def test_allocation_total_is_exact():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 12))
        sizes = [int(v) for v in rng.integers(0, 5000, n)]
        ratios = list(rng.random(n) * rng.choice([0.001, 0.1, 1.0]))
        target = float(rng.choice([0.0, 1.0, rng.random(), 0.5, 0.7]))
        lam = float(rng.choice([0.0, 0.08, 0.2, rng.random()]))
        c = owl_allocation(ratios, sizes, target, lam)
        assert c.dtype == np.int64 and c.shape == (n,)
        assert int(c.sum()) == prune_count(target, sum(sizes)), (ratios, sizes, target, lam)
        assert (c >= 0).all() and (c <= np.array(sizes)).all()


def test_allocation_hypothesis():
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 10**7)), min_size=1, max_size=20),
           st.floats(0, 1), st.floats(0, 1))
    def check(layers, target, lam):
        ratios = [r for r, _ in layers]
        sizes = [n for _, n in layers]
        c = owl_allocation(ratios, sizes, target, lam)
        assert int(c.sum()) == prune_count(target, sum(sizes))
        assert (c >= 0).all() and (c <= np.array(sizes)).all()

    check()


def test_allocation_monotonic_and_bounded():
    ratios = [0.001, 0.004, 0.0025, 0.009, 0.0, 0.006]
    sizes = [1_000_000] * 6
    for target in (0.3, 0.5, 0.7):
        for lam in (0.02, 0.08, 0.15):
            c = owl_allocation(ratios, sizes, target, lam)
            frac = c / 1e6
            order = np.argsort(ratios)
            assert (np.diff(frac[order]) < 0).all()  # more outliers: pruned less
            assert frac.max() - frac.min() == pytest.approx(2 * lam, abs=2e-6)
            assert (frac <= target + 2 * lam + 1e-6).all()
            assert (frac >= target - 2 * lam - 1e-6).all()
            # the paper's formula (equal sizes: its unweighted mean is ours)
            d = np.array(ratios)
            norm = (d - d.min()) / (d.max() - d.min())
            density = norm * 2 * lam - np.mean(norm * 2 * lam) + (1 - target)
            np.testing.assert_allclose(frac, 1 - density, atol=1e-6)
    # ratios spread evenly over their range: exactly [s - lam, s + lam]
    c = owl_allocation([0.0, 0.5, 1.0], [10**6] * 3, 0.5, 0.1)
    assert list(c) == [600_000, 500_000, 400_000]


def test_allocation_weighted_mean_and_sizes():
    sizes = [100, 10_000, 3_000, 0]
    c = owl_allocation([0.01, 0.02, 0.05, 0.5], sizes, 0.6, 0.1)
    assert c[3] == 0 and int(c.sum()) == prune_count(0.6, sum(sizes))
    s = np.array(ref.owl_layer_sparsities([0.01, 0.02, 0.05, 0.5], sizes, 0.6, 0.1))
    np.testing.assert_allclose(c[:3] / np.array(sizes[:3]), s[:3], atol=1.5 / 100)


def test_lam_zero_is_uniform():
    c = owl_allocation([0.1, 0.9, 0.3], [1000, 1000, 1000], 0.5, 0.0)
    assert list(c) == [500, 500, 500]
    c = owl_allocation([0.1, 0.9, 0.3], [1000, 3000, 2000], 0.25, 0.0)
    assert list(c) == [250, 750, 500]
    same = owl_allocation([0.2, 0.2, 0.2], [1000, 1000, 1000], 0.5, 0.3)  # no spread: uniform
    assert list(same) == [500, 500, 500]


def test_clamping_keeps_the_total():
    c = owl_allocation([0.0, 1.0, 0.5], [1000, 1000, 1000], 0.95, 0.2)
    assert list(c <= 1000) == [True] * 3 and c[0] == 1000
    assert int(c.sum()) == 2850
    c = owl_allocation([0.0, 1.0], [10, 1000], 0.02, 0.5)
    assert c[0] == 10 and int(c.sum()) == prune_count(0.02, 1010)  # s_0 = 1.01, clamped
    assert list(owl_allocation([0.3, 0.1], [10, 20], 1.0, 0.5)) == [10, 20]
    assert list(owl_allocation([0.3, 0.1], [10, 20], 0.0, 0.5)) == [0, 0]
    assert list(owl_allocation([], [], 0.5)) == []


def test_allocation_errors():
    with pytest.raises(InvalidSparsityError):
        owl_allocation([0.1], [10], 1.5)
    with pytest.raises(InvalidSparsityError):
        owl_allocation([0.1], [10], float("nan"))
    with pytest.raises(InvalidSparsityError):
        owl_allocation([0.1], [10], "0.5")
    for lam in (-0.1, 1.5, float("nan"), float("inf"), "0.1", None):
        with pytest.raises(InvalidArgumentError):
            owl_allocation([0.1], [10], 0.5, lam)
    for ratios in ([float("nan")], [1.5], [-0.1], ["a"]):
        with pytest.raises(InvalidArgumentError):
            owl_allocation(ratios, [10], 0.5)
    for sizes in ([-1], [1.5], [True]):
        with pytest.raises(InvalidArgumentError):
            owl_allocation([0.1], sizes, 0.5)
    with pytest.raises(InvalidShapeError):
        owl_allocation([0.1, 0.2], [10], 0.5)


def test_owl_sparsities_end_to_end():
    rng = np.random.default_rng(4)
    ctx = CalibrationContext()
    layers, scores = {}, {}
    for i, outliers in enumerate([5, 200, 40]):
        d = 64
        x = rng.standard_normal((100, d)).astype(np.float32)
        ctx.add_layer_stats(f"l{i}", ActivationStats(d).update(x))
        w = rng.standard_normal((128, d)).astype(np.float32)
        w.reshape(-1)[rng.choice(w.size, outliers, replace=False)] *= 40
        layers[f"l{i}"] = w
        scores[f"l{i}"] = WandaImportance(f"l{i}").compute(w, ctx)
    alloc = owl_sparsities(scores, 0.6, lam=0.1)
    assert isinstance(alloc, OwlAllocation)
    assert alloc.names == ("l0", "l1", "l2") and alloc.sizes == (8192,) * 3
    assert alloc.pruned == prune_count(0.6, alloc.total)
    assert alloc.outlier_ratios[0] < alloc.outlier_ratios[2] < alloc.outlier_ratios[1]
    s = alloc.sparsities
    assert s[1] < s[2] < s[0]
    assert alloc["l1"] == s[1] and alloc.as_dict() == dict(zip(alloc.names, s))
    with pytest.raises(KeyError):
        alloc["nope"]
    for name, frac, count in zip(alloc.names, s, alloc.counts):  # the fractions are exact
        assert generate_unstructured_mask(scores[name], frac).num_zeros() == count
    # groups, sequences and explicit sizes
    grouped = owl_sparsities({"a": [scores["l0"], scores["l1"]], "b": scores["l2"]}, 0.5)
    assert grouped.sizes == (16384, 8192)
    assert grouped.outlier_ratios[0] == ref.outlier_ratio([scores["l0"].values,
                                                           scores["l1"].values], 5.0)
    seq = owl_sparsities([scores["l0"], scores["l1"]], 0.5, weights=[100, 300])
    assert seq.names == (0, 1) and seq.sizes == (100, 300) and seq.pruned == 200
    mapped = owl_sparsities(scores, 0.5, weights={"l0": 10, "l1": 10, "l2": 20})
    assert mapped.sizes == (10, 10, 20)
    with pytest.raises(InvalidArgumentError):
        owl_sparsities(scores, 0.5, weights={"l0": 10})
    with pytest.raises(InvalidShapeError):
        owl_sparsities(scores, 0.5, weights=[1, 2])
    with pytest.raises(InvalidArgumentError):
        owl_sparsities(np.ones(3), 0.5)
    with pytest.raises(InvalidArgumentError):
        owl_sparsities(scores, 0.5, m=-1)
    with pytest.raises(InvalidArgumentError):
        owl_sparsities(scores, 0.5, lam=2)
    with pytest.raises(InvalidSparsityError):
        owl_sparsities(scores, 2)
    assert math.isclose(sum(c for c in alloc.counts) / alloc.total, 0.6, abs_tol=1e-4)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_wanda_statistics(dtype):
    """The statistics come from the scoring pass: float64, independent of the thread count."""
    st = stats_for(257, seed=8)
    w = weights((301, 257), dtype, seed=9)
    base = WandaImportance().compute(w, st, n_threads=1)
    v = base.values.astype(np.float64)
    assert base.stats.min == v.min() and base.stats.max == v.max()
    assert base.stats.mean == pytest.approx(v.mean(), rel=1e-13)
    assert base.stats.std == pytest.approx(v.std(), rel=1e-11)
    for nt in (2, 3, 64):
        assert WandaImportance().compute(w, st, n_threads=nt).stats == base.stats
    empty = WandaImportance().compute(np.zeros((0, 257), DTYPES[dtype]), st).stats
    assert empty.count == 0 and math.isnan(empty.mean)
