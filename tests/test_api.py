"""The object API of the case study: names, shapes, counts, patterns and errors."""
import numpy as np
import pytest

import aprender
from aprender.nn import Linear, Sequential
from aprender.pruning import (Importance, ImportanceScores, InvalidPatternError,
                              InvalidSparsityError, MagnitudeImportance, NumericalInstabilityError,
                              PruningError, ShapeMismatchError, SparsityMask, SparsityPattern,
                              generate_nm_mask, generate_unstructured_mask)


def test_case_study_walkthrough():
    layer = Linear(16, 8, seed=0)
    w = layer.weight
    assert w.shape == (8, 16) and w.dtype == np.float32 and w.size == 128
    assert layer.bias.shape == (8,)
    scores = MagnitudeImportance.l1().compute(layer)
    assert isinstance(scores, ImportanceScores)
    assert scores.method == "magnitude_l1"
    np.testing.assert_array_equal(scores.values, np.abs(w))
    assert scores.stats.min == pytest.approx(float(np.abs(w).min()))
    assert scores.stats.max == pytest.approx(float(np.abs(w).max()))
    assert scores.stats.mean == pytest.approx(float(np.abs(w).astype(np.float64).mean()))
    assert scores.stats.std == pytest.approx(float(np.abs(w).astype(np.float64).std()))
    mask = generate_unstructured_mask(scores.values, 0.5)
    assert (mask.sparsity(), mask.nnz(), mask.num_zeros()) == (0.5, 64, 64)
    assert mask.pattern == SparsityPattern.unstructured()
    keep = np.asarray(mask)
    assert keep.dtype == np.bool_ and keep.shape == w.shape
    # the kept weights are exactly the 64 largest magnitudes
    assert np.abs(w)[keep].min() >= np.abs(w)[~keep].max()
    # the same mask from the ImportanceScores object
    np.testing.assert_array_equal(np.asarray(generate_unstructured_mask(scores, 0.5)), keep)
    nm = generate_nm_mask(MagnitudeImportance.l1().compute(Linear(8, 8, seed=1)).values, 2, 4)
    assert nm.pattern.theoretical_sparsity == 0.5
    assert np.all(np.asarray(nm).reshape(-1, 4).sum(axis=1) == 2)
    pruned = w.copy()
    assert mask.apply(pruned) is pruned
    assert np.count_nonzero(pruned == 0) == 64
    np.testing.assert_array_equal(pruned[keep], w[keep])


def test_l2_and_lp_scores():
    w = Linear(16, 8, seed=3).weight
    l2 = MagnitudeImportance.l2().compute(w)
    assert l2.method == "magnitude_l2"
    np.testing.assert_array_equal(l2.values, w * w)
    l3 = MagnitudeImportance(3).compute(w)
    assert l3.method == "magnitude_l3"
    np.testing.assert_allclose(l3.values, np.abs(w.astype(np.float64)) ** 3, rtol=1e-6)
    assert MagnitudeImportance(1.5).name == "magnitude_l1.5"


def test_importance_protocol():
    imp = MagnitudeImportance.l1()
    assert isinstance(imp, Importance)
    assert imp.requires_calibration is False
    assert imp.compute(np.ones((2, 4), np.float32), calibration=None).values.shape == (2, 4)


def test_linear_matches_torch_init_bounds_and_call():
    layer = Linear(64, 10, seed=1)
    bound = 1 / np.sqrt(64)
    assert np.all(np.abs(layer.weight) <= bound) and np.all(np.abs(layer.bias) <= bound)
    x = np.ones((3, 64), np.float32)
    np.testing.assert_allclose(layer(x), x @ layer.weight.T + layer.bias, rtol=1e-6)
    assert Linear(4, 2, bias=False, seed=0).bias is None
    np.testing.assert_array_equal(Linear(4, 2, seed=5).weight, Linear(4, 2, seed=5).weight)
    model = Sequential(Linear(8, 4, seed=0), Linear(4, 2, seed=1))
    assert model(np.ones((1, 8), np.float32)).shape == (1, 2)
    assert [name for name, _ in model.named_linears()] == ["0", "1"]
    with pytest.raises(ShapeMismatchError, match="last dimension 64"):
        layer(np.ones((3, 5), np.float32))


@pytest.mark.parametrize("sparsity,n,expected", [
    (0.5, 128, 64), (0.25, 10, 2), (0.35, 10, 3), (0.45, 10, 4), (0.55, 10, 5), (0.05, 10, 0),
    (0.15, 10, 1), (0.0, 7, 0), (1.0, 7, 7), (1, 7, 7), (0, 7, 0), (0.5, 1, 0), (0.5, 3, 1),
])
def test_counting_rule_halves_round_down(sparsity, n, expected):
    values = np.arange(1, n + 1, dtype=np.float64)
    mask = generate_unstructured_mask(values, sparsity)
    assert mask.num_zeros() == expected
    # the smallest values are the ones pruned
    assert np.all(np.asarray(mask) == (np.arange(n) >= expected))


def test_ties_prune_lowest_index_first():
    values = np.array([[3.0, 1.0, 1.0, 2.0], [1.0, 5.0, 1.0, 1.0]], dtype=np.float32)
    mask = generate_unstructured_mask(values, 0.5)  # prune 4 of 8: the five 1.0s compete
    np.testing.assert_array_equal(np.asarray(mask), [[True, False, False, True],
                                                     [False, True, False, True]])


def test_per_row_ties_and_counts():
    values = np.array([[1, 1, 1, 1], [4, 3, 2, 1], [2, 2, 9, 2]], dtype=np.float32)
    mask = generate_unstructured_mask(values, 0.5, per_row=True)
    np.testing.assert_array_equal(np.asarray(mask), [[False, False, True, True],
                                                     [True, True, False, False],
                                                     [False, False, True, True]])


def test_nm_ties_and_axis():
    values = np.array([[1, 1, 1, 1, 0, 5, 5, 5]], dtype=np.float32)
    mask = generate_nm_mask(values, 2, 4)
    np.testing.assert_array_equal(np.asarray(mask), [[False, False, True, True,
                                                      False, False, True, True]])
    cols = generate_nm_mask(values.T.copy(), 2, 4, axis=0)
    np.testing.assert_array_equal(np.asarray(cols), np.asarray(mask).T)
    with pytest.raises(InvalidPatternError, match=r"shape \(1, 6\).*M=4"):
        generate_nm_mask(np.ones((1, 6), np.float32), 2, 4)


def test_signed_zeros_are_equal_scores():
    values = np.array([-0.0, 0.0, -0.0, 1.0], dtype=np.float32)
    mask = generate_unstructured_mask(values, 0.5)
    np.testing.assert_array_equal(np.asarray(mask), [False, False, True, True])


def test_negative_importance_values_order_by_value():
    values = np.array([-3.0, 2.0, -1.0, 0.5], dtype=np.float64)
    mask = generate_unstructured_mask(values, 0.5)
    np.testing.assert_array_equal(np.asarray(mask), [False, True, False, True])


def test_sparsity_pattern_api():
    p = SparsityPattern.nm(2, 4)
    assert str(p) == "2:4" and p.theoretical_sparsity == 0.5
    assert SparsityPattern.parse("2:4") == p
    assert SparsityPattern.parse("block:2x2").block == (2, 2)
    assert SparsityPattern.unstructured().theoretical_sparsity is None
    good = np.array([[1, 1, 0, 0, 0, 1, 0, 1]], dtype=bool)
    assert p.validate(good)
    assert p.count_groups(good) == (2, 2)
    with pytest.raises(InvalidPatternError, match="1 of 2 groups"):
        p.validate(np.array([[1, 1, 1, 0, 0, 1, 0, 1]], dtype=bool))
    blk = SparsityPattern.block_pattern(2, 2)
    assert blk.validate(np.kron(np.array([[1, 0]]), np.ones((2, 2))).astype(bool))
    with pytest.raises(InvalidPatternError, match="partly pruned"):
        blk.validate(np.array([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=bool))
    for bad in ("2-4", "5:4", "0:4", "x"):
        with pytest.raises(InvalidPatternError):
            SparsityPattern.parse(bad)


def test_sparsity_mask_construction_and_apply_errors():
    m = SparsityMask(np.array([[1, 0], [0, 1]]))
    assert m.nnz() == 2 and m.sparsity() == 0.5
    with pytest.raises(InvalidPatternError, match="binary"):
        SparsityMask(np.array([0, 2, 1]))
    with pytest.raises(InvalidPatternError):
        SparsityMask(np.array([[1, 1, 1, 0]], dtype=bool), SparsityPattern.nm(2, 4))
    with pytest.raises(ShapeMismatchError, match=r"\(2, 2\).*\(3,\)"):
        m.apply(np.ones(3, np.float32))
    ro = np.ones((2, 2), np.float32)
    ro.flags.writeable = False
    with pytest.raises(PruningError, match="read-only"):
        m.apply(ro)


def test_apply_keeps_dtype_and_handles_orders():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 8)).astype(np.float16)
    m = generate_unstructured_mask(np.abs(w), 0.5)
    f = np.asfortranarray(w)
    m.apply(f)
    assert f.dtype == np.float16
    np.testing.assert_array_equal(f, np.where(np.asarray(m), w, 0))
    strided = np.zeros((6, 16), np.float32)
    strided[:, ::2] = w
    view = strided[:, ::2]
    m.apply(view)
    np.testing.assert_array_equal(view, np.where(np.asarray(m), w.astype(np.float32), 0))


def test_errors_are_typed_and_named():
    assert issubclass(InvalidSparsityError, ValueError) and issubclass(InvalidSparsityError,
                                                                       PruningError)
    for bad in (-0.1, 1.5, float("nan"), "0.5", True, np.complex64(0.5)):
        with pytest.raises(InvalidSparsityError):
            generate_unstructured_mask(np.ones(4, np.float32), bad)
    w = np.ones((3, 4), np.float32)
    w[1, 2] = np.nan
    with pytest.raises(NumericalInstabilityError, match=r"\(1, 2\)") as info:
        MagnitudeImportance.l1().compute(w)
    assert info.value.index == (1, 2)
    w[1, 2] = -np.inf
    with pytest.raises(NumericalInstabilityError, match=r"-inf at index \(1, 2\)"):
        generate_unstructured_mask(w, 0.5)


def test_empty_in_empty_out():
    mask = generate_unstructured_mask(np.zeros((0, 4), np.float32), 0.5)
    assert mask.shape == (0, 4) and mask.nnz() == 0 and mask.sparsity() == 0.0
    assert generate_nm_mask(np.zeros((0, 4), np.float32), 2, 4).shape == (0, 4)


def test_show_config_reports_build(capsys):
    cfg = aprender.show_config()
    out = capsys.readouterr().out
    assert cfg["version"] == aprender.__version__
    assert isinstance(cfg["openmp"], bool) and cfg["threads"] >= 1
    assert "openmp" in out and "cupy_available" in cfg
    import sys
    assert "cupy" not in sys.modules or cfg["cupy_available"]


# ----------------------------------------------------------------------------------------------
# one pattern vocabulary: SparsityPattern.parse is the only parser of pattern names
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want, flags", [
    ("unstructured", SparsityPattern.unstructured(), (True, False, False)),
    ("per-row", SparsityPattern.per_row(), (False, True, False)),
    (" Per-Row ", SparsityPattern.per_row(), (False, True, False)),
    ("2:4", SparsityPattern.nm(2, 4), (False, False, True)),
    ("1 : 8", SparsityPattern.nm(1, 8), (False, False, True)),
    ("block:4x2", SparsityPattern.block_pattern(4, 2), (False, False, False)),
    ("row", SparsityPattern.rows(), (False, False, False)),
    ("column", SparsityPattern.columns(), (False, False, False)),
])
def test_parse_vocabulary(text, want, flags):
    p = SparsityPattern.parse(text)
    assert p == want and hash(p) == hash(want)
    assert (p.is_unstructured, p.is_per_row, p.is_nm) == flags
    # str() of the simple patterns parses back to the same pattern
    if p.kind != "block":
        assert SparsityPattern.parse(str(p)) == p
    assert eval(repr(p), {"SparsityPattern": SparsityPattern}) == p


def test_parse_nm_exposes_n_m_axis_and_sparsity():
    p = SparsityPattern.parse("2:4")
    assert (p.kind, p.n, p.m, p.axis) == ("nm", 2, 4, -1)
    assert p.resolve_sparsity() == 0.5 and p.resolve_sparsity(0.5) == 0.5
    with pytest.raises(InvalidSparsityError, match=r"0\.3.*2:4"):
        p.resolve_sparsity(0.3)
    assert SparsityPattern.per_row().resolve_sparsity(0.25) == 0.25
    with pytest.raises(InvalidSparsityError, match="per-row.*needs a sparsity"):
        SparsityPattern.per_row().resolve_sparsity(None)


def test_parse_row_means_whole_rows_unless_legacy():
    """'row' is whole-row structured pruning in the object API; only the front ends where it
    used to mean per-row (torch prune_, the CLI) read it so, with a DeprecationWarning."""
    assert SparsityPattern.parse("row") == SparsityPattern.rows()
    with pytest.warns(DeprecationWarning, match="per-row"):
        assert SparsityPattern.parse("row", legacy_row=True) == SparsityPattern.per_row()
    assert SparsityPattern.parse(SparsityPattern.nm(2, 4)) == SparsityPattern.nm(2, 4)


def test_nm_axis_is_part_of_the_pattern():
    a0, a1, last = (SparsityPattern.nm(2, 4, axis=0), SparsityPattern.nm(2, 4, axis=1),
                    SparsityPattern.nm(2, 4))
    assert a0 != a1 and a0 != last and a1 != last
    assert len({a0, a1, last, SparsityPattern.nm(2, 4, axis=0)}) == 3
    assert str(a0) != str(a1) and "axis 0" in str(a0) and str(last) == "2:4"
    assert repr(a0) == "SparsityPattern.nm(2, 4, axis=0)"
    # masks carry the axis their caller named
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert generate_nm_mask(x, 2, 4, axis=0).pattern == a0
    assert generate_nm_mask(x, 2, 4).pattern == last


def test_per_row_masks_carry_the_per_row_pattern():
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    m = aprender.magnitude_mask(x, 0.25, per_row=True)
    assert m.pattern == SparsityPattern.per_row()
    assert generate_unstructured_mask(x, 0.25, per_row=True).pattern.is_per_row
    assert SparsityPattern.per_row().validate(m)
    assert SparsityPattern.per_row().count_groups(m) == (4, 4)
    keep = m.keep.copy()
    keep[2, :] = True
    with pytest.raises(InvalidPatternError, match="per-row.*1 of 4 rows"):
        SparsityMask(keep, SparsityPattern.per_row())


def test_layer_magnitude_mask_takes_patterns():
    from aprender.pruning.mask import layer_magnitude_mask

    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    per_row = layer_magnitude_mask(x, SparsityPattern.per_row(), 0.5)
    np.testing.assert_array_equal(per_row.keep, aprender.magnitude_mask(x, 0.5, per_row=True).keep)
    nm = layer_magnitude_mask(x, "2:4")
    assert nm.pattern == SparsityPattern.nm(2, 4)
    # the kind strings of the first release still work ("row" meant per-row there)
    np.testing.assert_array_equal(layer_magnitude_mask(x, "row", 0.5).keep, per_row.keep)
    np.testing.assert_array_equal(layer_magnitude_mask(x, "nm", None, 2, 4).keep, nm.keep)
    with pytest.raises(InvalidPatternError, match="block 2x2"):
        layer_magnitude_mask(x, "block:2x2", 0.5)


def test_out_buffers_for_masks():
    from aprender.errors import InvalidArgumentError
    from aprender.pruning import generate_nm_mask, generate_unstructured_mask

    rng = np.random.default_rng(3)
    v = rng.standard_normal((16, 32)).astype(np.float32)
    from aprender.pruning import (generate_block_mask, generate_column_mask, generate_row_mask,
                                  magnitude_mask, magnitude_nm_mask)
    from aprender.pruning.mask import layer_magnitude_mask

    for make in (lambda **kw: generate_unstructured_mask(v, 0.4, **kw),
                 lambda **kw: generate_unstructured_mask(v, 0.4, per_row=True, **kw),
                 lambda **kw: generate_nm_mask(v, 2, 4, **kw),
                 lambda **kw: magnitude_mask(v, 0.4, **kw),
                 lambda **kw: magnitude_mask(v, 0.4, per_row=True, **kw),
                 lambda **kw: magnitude_nm_mask(v, 2, 4, **kw),
                 lambda **kw: layer_magnitude_mask(v, "unstructured", 0.3, **kw),
                 lambda **kw: layer_magnitude_mask(v, "2:4", **kw),
                 lambda **kw: generate_block_mask(v, 0.5, (4, 4), **kw),
                 lambda **kw: generate_row_mask(v, 0.5, **kw),
                 lambda **kw: generate_column_mask(v, 0.5, **kw)):
        out = np.ones(v.shape, np.bool_)
        m = make(out=out)
        assert m.keep is out or np.shares_memory(m.keep, out)
        np.testing.assert_array_equal(out, make().keep)
        for bad in (np.ones(v.shape, np.uint8), np.ones((16, 31), np.bool_),
                    np.ones(v.shape, np.bool_).T.copy().T, "x"):
            with pytest.raises(InvalidArgumentError):
                make(out=bad)


def test_out_buffers_for_global_masks():
    from aprender.errors import InvalidArgumentError
    from aprender.pruning import generate_global_mask

    rng = np.random.default_rng(4)
    vs = [rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal(40)]
    want = generate_global_mask(vs, 0.5)
    outs = [np.ones(v.shape, np.bool_) for v in vs]
    got = generate_global_mask(vs, 0.5, out=outs)
    for g, o, w in zip(got, outs, want):
        assert np.shares_memory(g.keep, o)
        np.testing.assert_array_equal(o, w.keep)
    named = {"a": vs[0], "b": vs[1]}
    outd = {"b": np.zeros(40, np.bool_), "a": np.zeros((8, 16), np.bool_)}
    gotd = generate_global_mask(named, 0.5, out=outd)
    np.testing.assert_array_equal(outd["a"], want[0].keep)
    assert np.shares_memory(gotd["b"].keep, outd["b"])
    for bad in ([outs[0]], {"a": outs[0]}, [outs[0], np.ones(40, np.uint8)], "x"):
        with pytest.raises(InvalidArgumentError):
            generate_global_mask(named if isinstance(bad, dict) else vs, 0.5, out=bad)
