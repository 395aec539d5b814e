"""Structured-pruning criteria and least-squares compensation against slow, obviously-correct
references: per-column loops in float64 for the scores, stable sorts for the orders and the kept
indices, np.linalg.lstsq on the calibration inputs for the compensation, and an exhaustive
nearest-value search over every 16-bit pattern for the rounding of compensated 16-bit weights."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aprender import Bits16
from aprender import _reference as ref
from aprender.errors import (CalibrationError, HessianError, InvalidArgumentError,
                             InvalidDTypeError, InvalidShapeError, InvalidSparsityError,
                             NumericalInstabilityError, PruningError, ShapeMismatchError)
from aprender.pruning import ActivationStats, BlockStats, CalibrationContext, ExpertStats
from aprender.structured import criteria as C
from aprender.structured.compensate import compensate_columns

DTYPES = [np.float16, "bfloat16", np.float32, np.float64]


def cast(w, dtype):
    """float64 -> the dtype (bfloat16 as Bits16, rounded to nearest even through float32)."""
    if dtype == "bfloat16":
        u = w.astype(np.float32).view(np.uint32)
        bits = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return Bits16(bits.astype(np.uint16), "bfloat16")
    return w.astype(dtype)


# ------------------------------------------------------------------------------------------------
# the slow references
# ------------------------------------------------------------------------------------------------

def ref_column_scores(w, ss=None):
    w = ref.to_float64(w)
    out = []
    for j in range(w.shape[1]):
        norm = math.sqrt(sum(float(v) ** 2 for v in w[:, j]))
        out.append(norm * (math.sqrt(float(ss[j])) if ss is not None else 1.0))
    return np.array(out)


def ref_kv_scores(w, n_heads, n_kv, head_dim, ss=None):
    cols = ref_column_scores(w, ss)
    per_kv = n_heads // n_kv
    out = np.zeros(n_kv)
    for h in range(n_heads):
        for d in range(head_dim):
            out[h // per_kv] += cols[h * head_dim + d]  # head h reads KV group h // per_kv
    return out


def ref_kept_count(width, fraction, round_to):
    kept = max(1, width - ref.prune_count(fraction, width))
    while kept % round_to:
        kept += 1
    return min(kept, width)


def ref_keep(scores, kept):
    # remove the width - kept lowest, ties: the lower index goes first (stable sort)
    s = np.where(scores == 0, 0.0, scores.astype(np.float64))
    gone = np.argsort(s, kind="stable")[:scores.size - kept]
    return np.array(sorted(set(range(scores.size)) - set(gone.tolist())), dtype=np.intp)


# ------------------------------------------------------------------------------------------------
# MLP channels and KV groups
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("calibrated", [False, True])
def test_mlp_channel_scores_match_the_loop(dtype, calibrated):
    rng = np.random.default_rng(1)
    w = cast(rng.standard_normal((9, 13)), dtype)
    ss = rng.uniform(0, 50, 13) if calibrated else None
    ss_in = ss
    if calibrated:
        ss[3] = 0.0  # a channel that never fired scores 0
    scores, used = C.mlp_channel_scores(w, ss_in)
    assert used is calibrated
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, ref_column_scores(w, ss), rtol=1e-12)
    if calibrated:
        assert scores[3] == 0.0


def test_mlp_scores_read_16_bit_weights_a_block_of_rows_at_a_time(monkeypatch):
    rng = np.random.default_rng(2)
    w = cast(rng.standard_normal((37, 11)), "bfloat16")
    whole = C.mlp_channel_scores(w)[0]
    monkeypatch.setattr(C, "_CHUNK", 20)  # one row per block... and a partial last block
    np.testing.assert_allclose(C.mlp_channel_scores(w)[0], whole, rtol=1e-14)
    np.testing.assert_allclose(whole, ref_column_scores(w), rtol=1e-12)


def test_mlp_scores_take_other_layouts_and_sources():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 10))
    expect = ref_column_scores(w)
    np.testing.assert_allclose(C.mlp_channel_scores(np.asfortranarray(w))[0], expect)
    np.testing.assert_allclose(C.mlp_channel_scores(w.astype(">f8"))[0], expect)
    np.testing.assert_allclose(C.mlp_channel_scores(w[:, ::-1].copy()[:, ::-1])[0], expect)
    stats = ActivationStats(10)
    x = rng.standard_normal((20, 10))
    stats.update(x)
    np.testing.assert_allclose(C.mlp_channel_scores(w, stats)[0],
                               ref_column_scores(w, (x ** 2).sum(0)), rtol=1e-12)
    ml = pytest.importorskip("ml_dtypes")
    wb = w.astype(ml.bfloat16)
    np.testing.assert_allclose(C.mlp_channel_scores(wb)[0], ref_column_scores(wb), rtol=1e-12)


def test_mlp_scores_of_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    w = rng.standard_normal((5, 8)).astype(np.float32)
    t = torch.from_numpy(w).to(torch.bfloat16)
    expect = ref_column_scores(t.float().numpy())
    np.testing.assert_allclose(C.mlp_channel_scores(t)[0], expect, rtol=1e-12)
    lin = torch.nn.Linear(8, 5, bias=False)
    np.testing.assert_allclose(C.mlp_channel_scores(lin)[0],
                               ref_column_scores(lin.weight.detach().numpy()), rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads,n_kv,head_dim", [(4, 4, 3), (8, 2, 4), (6, 1, 2), (6, 3, 5)])
def test_kv_group_scores_match_the_loop(dtype, n_heads, n_kv, head_dim):
    rng = np.random.default_rng(5)
    w = cast(rng.standard_normal((7, n_heads * head_dim)), dtype)
    for ss in (None, rng.uniform(0, 9, n_heads * head_dim)):
        scores, used = C.kv_group_scores(w, n_heads, n_kv, head_dim, ss)
        assert used is (ss is not None)
        assert scores.shape == (n_kv,)
        np.testing.assert_allclose(scores, ref_kv_scores(w, n_heads, n_kv, head_dim, ss),
                                   rtol=1e-12)


def test_kv_group_scores_follow_transformers_repeat_kv():
    """The query heads of a group are the ones that read its keys in transformers' GQA."""
    torch = pytest.importorskip("torch")
    from transformers.models.llama.modeling_llama import repeat_kv

    n_heads, n_kv, head_dim = 8, 2, 1
    kv = torch.arange(n_kv, dtype=torch.float32).reshape(1, n_kv, 1, 1)
    group_of_head = repeat_kv(kv, n_heads // n_kv).reshape(-1).long().tolist()
    w = np.zeros((1, n_heads * head_dim))
    w[0, 5] = 1.0  # only query head 5 matters
    scores, _ = C.kv_group_scores(w, n_heads, n_kv, head_dim)
    assert int(np.argmax(scores)) == group_of_head[5] and scores.sum() == 1.0


def test_width_scores_refuse_bad_input():
    w = np.ones((4, 6))
    with pytest.raises(ShapeMismatchError, match="6 input columns"):
        C.mlp_channel_scores(w, np.ones(5))
    with pytest.raises(CalibrationError, match=r"input_sq_norms\[2\]"):
        C.mlp_channel_scores(w, [1, 1, -1, 1, 1, 1])
    with pytest.raises(CalibrationError, match="nan"):
        C.mlp_channel_scores(w, [1, 1, 1, np.nan, 1, 1])
    with pytest.raises(CalibrationError, match="real numbers"):
        C.mlp_channel_scores(w, np.array(["a"] * 6))
    with pytest.raises(InvalidShapeError, match="2-D"):
        C.mlp_channel_scores(np.ones(6))
    with pytest.raises(InvalidDTypeError):
        C.mlp_channel_scores(np.ones((4, 6), dtype=np.int32))
    bad = w.copy()
    bad[1, 2] = np.inf
    with pytest.raises(NumericalInstabilityError, match=r"\(1, 2\)"):
        C.mlp_channel_scores(bad)
    with pytest.raises(InvalidArgumentError, match="multiple of n_kv"):
        C.kv_group_scores(w, 3, 2, 2)
    with pytest.raises(ShapeMismatchError, match="2 x 2 = 4"):
        C.kv_group_scores(w, 2, 1, 2)
    with pytest.raises(InvalidArgumentError, match="head_dim"):
        C.kv_group_scores(w, 6, 2, 0)
    with pytest.raises(InvalidArgumentError, match="n_heads"):
        C.kv_group_scores(w, True, 1, 6)


# ------------------------------------------------------------------------------------------------
# layers and experts
# ------------------------------------------------------------------------------------------------

def test_layer_order_is_block_influence_ascending_ties_by_index():
    cos = [0.9, 0.99, 0.5, 0.99, 0.95, 0.9]
    stats = {f"model.layers.{i}": BlockStats(c * 10, 10) for i, c in enumerate(cos)}
    prefixes = list(stats)
    influence = [stats[p].influence for p in prefixes]
    expect = sorted(range(len(cos)), key=lambda i: (influence[i], i))
    assert C.layer_order(stats, prefixes) == expect == [1, 3, 4, 0, 5, 2]
    ctx = CalibrationContext()
    for p in prefixes[::-1]:  # the order of the statistics does not matter, the prefixes' does
        s = stats[p]
        ctx.add_block_stats(p, s.cos_sum, s.tokens)
    assert C.layer_order(ctx, prefixes) == expect
    # a subset, in another order: indices into that list
    sub = [prefixes[2], prefixes[3], prefixes[1]]
    assert C.layer_order(stats, sub) == [1, 2, 0]
    assert C.layer_order_last(None, prefixes) == [5, 4, 3, 2, 1, 0]


def test_layer_order_names_what_is_missing():
    stats = {"model.layers.0": BlockStats(5.0, 10), "model.layers.1": BlockStats(0.0, 0)}
    with pytest.raises(CalibrationError, match=r"'model\.layers\.2'.*block statistics from "
                                               r"'aprender calibrate'"):
        C.layer_order(stats, ["model.layers.0", "model.layers.2"])
    with pytest.raises(CalibrationError, match=r"'model\.layers\.1' saw no tokens"):
        C.layer_order(stats, ["model.layers.0", "model.layers.1"])
    with pytest.raises(CalibrationError, match=r"\\x1b"):  # names from files are escaped
        C.layer_order(stats, ["layer\x1b[2J"])
    with pytest.raises(InvalidArgumentError, match="twice"):
        C.layer_order(stats, ["model.layers.0", "model.layers.0"])
    with pytest.raises(InvalidArgumentError, match="sequence"):
        C.layer_order(stats, "model.layers.0")
    with pytest.raises(InvalidArgumentError, match="mapping"):
        C.layer_order([1, 2], ["model.layers.0"])


def test_expert_scores_are_reap_means():
    stats = {"l.0.e.0": ExpertStats(4, 2.0), "l.0.e.1": ExpertStats(0, 0.0),
             "l.0.e.2": ExpertStats(3, 9.0)}
    np.testing.assert_array_equal(C.expert_scores(stats, ["l.0.e.2", "l.0.e.0", "l.0.e.1"]),
                                  [3.0, 0.5, 0.0])
    ctx = CalibrationContext()
    ctx.add_expert_stats("l.0.e.0", 4, 2.0)
    np.testing.assert_array_equal(C.expert_scores(ctx, ["l.0.e.0"]), [0.5])
    with pytest.raises(CalibrationError, match=r"expert 'l\.0\.e\.3' has no statistics"):
        C.expert_scores(stats, ["l.0.e.0", "l.0.e.3"])


# ------------------------------------------------------------------------------------------------
# uniform kept widths
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width,fraction,round_to,expect", [
    (12, 0.25, 1, 9), (12, 0.25, 4, 12), (12, 0.5, 4, 8), (1536, 0.25, 128, 1152),
    (100, 0.3, 64, 100), (100, 0.9, 64, 64), (10, 0.99, 1, 1), (10, 0.99, 8, 8),
    (10, 0.0, 3, 10), (10, 0.25, 1, 8), (10, 0.26, 1, 7), (0, 0.5, 4, 0)])
def test_kept_count(width, fraction, round_to, expect):
    # 10 x 0.25 = 2.5 removes 2: halves round down, as every count in aprender
    assert C.kept_count(width, fraction, round_to) == expect
    assert ref_kept_count(width, fraction, round_to) == expect


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.floats(0, 0.99), st.integers(1, 16),
       st.integers(0, 2 ** 32 - 1), st.sampled_from([np.float32, np.float64, np.int64]))
def test_keep_uniform_matches_a_stable_sort(layers, width, fraction, round_to, seed, dtype):
    rng = np.random.default_rng(seed)
    # few distinct values, so ties and signed zeros are common
    scores = {f"model.layers.{i}": rng.integers(-2, 3, width).astype(dtype) *
              (np.float64(-0.0) if i % 2 else 1.0) if dtype != np.int64 else
              rng.integers(0, 3, width) for i in range(layers)}
    kept = ref_kept_count(width, fraction, round_to)
    got = C.keep_uniform(scores, fraction, round_to)
    assert list(got) == list(scores)
    for name, s in scores.items():
        assert got[name].dtype == np.intp
        np.testing.assert_array_equal(got[name], ref_keep(np.asarray(s, np.float64), kept))
        assert got[name].size == kept and 0 < kept <= width


def test_keep_uniform_keeps_the_highest_scores():
    got = C.keep_uniform({0: [5.0, 1.0, 3.0, 3.0, 0.5, 9.0], "b": np.arange(6.0)}, 0.5, 1)
    np.testing.assert_array_equal(got[0], [0, 3, 5])  # 3.0 at 2 and 3 tie: the lower goes
    np.testing.assert_array_equal(got["b"], [3, 4, 5])


def test_keep_uniform_refuses_bad_input():
    with pytest.raises(ShapeMismatchError, match="same width"):
        C.keep_uniform({0: np.ones(4), 1: np.ones(5)}, 0.5, 1)
    with pytest.raises(InvalidSparsityError, match="below 1"):
        C.keep_uniform({0: np.ones(4)}, 1.0, 1)
    with pytest.raises(InvalidSparsityError):
        C.keep_uniform({0: np.ones(4)}, -0.1, 1)
    with pytest.raises(InvalidArgumentError, match="round_to"):
        C.keep_uniform({0: np.ones(4)}, 0.5, 0)
    with pytest.raises(NumericalInstabilityError, match=r"layer 'b'.*NaN at index \(1,\)"):
        C.keep_uniform({"a": np.ones(4), "b": np.array([1.0, np.nan, 2.0, 3.0])}, 0.5, 1)
    with pytest.raises(InvalidShapeError, match="1-D"):
        C.keep_uniform({0: np.ones((2, 2))}, 0.5, 1)
    with pytest.raises(InvalidArgumentError, match="booleans"):
        C.keep_uniform({0: np.ones(4, bool)}, 0.5, 1)
    with pytest.raises(InvalidArgumentError, match="mapping"):
        C.keep_uniform([np.ones(4)], 0.5, 1)
    assert C.keep_uniform({}, 0.5, 1) == {}


def test_registry(monkeypatch):
    assert C.get_criterion("layers") is C.layer_order
    assert C.get_criterion("mlp") is C.mlp_channel_scores
    assert C.get_criterion("heads", "magnitude") is C.kv_group_magnitude_scores
    assert C.get_criterion("experts") is C.expert_scores
    w = np.random.default_rng(0).standard_normal((3, 4))
    assert C.get_criterion("mlp", "magnitude")(w, np.ones(4) * 7)[1] is False
    with pytest.raises(InvalidArgumentError, match="known: activation, magnitude"):
        C.get_criterion("mlp", "taylor")
    with pytest.raises(InvalidArgumentError, match="unknown axis"):
        C.get_criterion("rows")
    monkeypatch.setitem(C.CRITERIA, "mlp", dict(C.CRITERIA["mlp"]))

    def taylor(w_down, input_sq_norms=None):
        return np.ones(np.shape(w_down)[1]), False

    C.register_criterion("mlp", "taylor", taylor)
    assert C.get_criterion("mlp", "taylor") is taylor
    with pytest.raises(InvalidArgumentError, match="replace=True"):
        C.register_criterion("mlp", "taylor", taylor)
    C.register_criterion("mlp", "taylor", taylor, replace=True)
    with pytest.raises(InvalidArgumentError, match="callable"):
        C.register_criterion("mlp", "x", 3)


# ------------------------------------------------------------------------------------------------
# compensation
# ------------------------------------------------------------------------------------------------

def inputs(kind, tokens, cols, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, cols))
    if kind == "correlated":  # features that mix their neighbours and share a common factor
        x[:, 1:] += 0.8 * x[:, :-1]
        x += 1.5 * rng.standard_normal((tokens, 1))
        x *= rng.uniform(0.1, 4.0, cols)
    return x


def ridge(x, w, kept, lam):
    """The damped least-squares refit, directly: minimise ||X Wᵀ - X_S W'ᵀ||² + lam ||W'||²
    as one ordinary least-squares problem with lam's rows appended."""
    xs = x[:, kept]
    a = np.vstack([xs, math.sqrt(lam) * np.eye(len(kept))])
    b = np.vstack([x @ w.T, np.zeros((len(kept), w.shape[0]))])
    return np.linalg.lstsq(a, b, rcond=None)[0].T


@pytest.mark.parametrize("kind", ["random", "correlated"])
@pytest.mark.parametrize("seed", [0, 1])
def test_compensation_is_the_least_squares_refit(kind, seed):
    x = inputs(kind, 300, 24, seed)
    w = np.random.default_rng(seed + 10).standard_normal((7, 24))
    kept = np.sort(np.random.default_rng(seed + 20).choice(24, 15, replace=False))
    h = x.T @ x
    # undamped (nearly): the plain least-squares solution W'·X_S ≈ W·X
    plain = np.linalg.lstsq(x[:, kept], x @ w.T, rcond=None)[0].T
    np.testing.assert_allclose(compensate_columns(w, h, kept, percdamp=1e-12), plain,
                               rtol=1e-6, atol=1e-8)
    # damped as SparseGPT damps: lam = percdamp * mean diag H
    for pd in (0.01, 0.5):
        lam = pd * float(np.mean(np.diag(h)))
        np.testing.assert_allclose(compensate_columns(w, h, kept, percdamp=pd),
                                   ridge(x, w, kept, lam), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["random", "correlated"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_compensation_lowers_the_output_error(kind, dtype):
    """The issue's criterion: on the calibration inputs, the compensated layer's output error
    is below the slice-only error."""
    x = inputs(kind, 400, 32, 3)
    w = cast(np.random.default_rng(4).standard_normal((16, 32)), dtype)
    w64 = ref.to_float64(w)
    h = (x.T @ x).astype(np.float32)  # as a calibration file stores it
    for n_kept in (8, 16, 24):
        kept = np.sort(np.random.default_rng(n_kept).choice(32, n_kept, replace=False))
        dense = x @ w64.T
        sliced = np.linalg.norm(dense - x[:, kept] @ w64[:, kept].T)
        comp = compensate_columns(w, h, kept)
        comp_err = np.linalg.norm(dense - x[:, kept] @ ref.to_float64(comp).T)
        # independent inputs leave little to recover (only their sample correlations);
        # correlated ones, as real activations are, a lot
        assert comp_err < (0.7 if kind == "correlated" else 1.0) * sliced, \
            (n_kept, comp_err, sliced)


def nearest16(values, fmt):
    """Round float64 values to the nearest 16-bit float (ties to the even pattern) by searching
    every finite pattern of the format."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    with np.errstate(invalid="ignore"):  # the NaN patterns
        if fmt == "bfloat16":
            all_v = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        else:
            all_v = bits.view(np.float16).astype(np.float64)
    ok = np.isfinite(all_v) & ~((all_v == 0) & (bits >= 0x8000))  # one zero
    cand_v, cand_b = all_v[ok], bits[ok]
    order = np.argsort(cand_v, kind="stable")
    cand_v, cand_b = cand_v[order], cand_b[order]
    out = np.empty(values.shape, dtype=np.uint16)
    for i, v in enumerate(values.reshape(-1)):
        j = np.searchsorted(cand_v, v)
        best = None
        for k in (j - 1, j):
            if 0 <= k < cand_v.size:
                d = abs(cand_v[k] - v)
                key = (d, int(cand_b[k]) & 1)  # nearest; on a tie the even pattern
                if best is None or key < best[0]:
                    best = (key, cand_b[k])
        out.reshape(-1)[i] = best[1]
    return out


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16", np.float32])
def test_compensated_weights_are_rounded_once_to_the_dtype(dtype):
    x = inputs("correlated", 200, 20, 5)
    w = cast(np.random.default_rng(6).standard_normal((9, 20)), dtype)
    h = x.T @ x
    kept = np.arange(0, 20, 2)
    exact = compensate_columns(ref.to_float64(w), h, kept)
    got = compensate_columns(w, h, kept)
    if dtype == np.float32:
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, exact.astype(np.float32))
        return
    fmt = "bfloat16" if dtype == "bfloat16" else "float16"
    got_bits = got.bits if isinstance(got, Bits16) else got.view(np.uint16)
    assert isinstance(got, Bits16) == (dtype == "bfloat16")
    np.testing.assert_array_equal(got_bits, nearest16(exact, fmt))


def test_round_to_odd_on_exact_ties():
    """Values halfway between two 16-bit floats plus a hair: rounding through plain float32
    would land on the tie and go to even; the hair must win."""
    from aprender.structured.compensate import _odd_float32

    base = np.float64(1.0) + 2.0 ** -8  # halfway between bfloat16 1.0 and 1.0078125
    x = np.array([base + 2.0 ** -40, base - 2.0 ** -40, base, -base - 2.0 ** -40])
    u = _odd_float32(x).view(np.uint32)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(bits, nearest16(x, "bfloat16"))


def test_compensation_of_torch_and_16_bit_sources():
    torch = pytest.importorskip("torch")
    x = inputs("random", 100, 12, 7)
    h = x.T @ x
    w = np.random.default_rng(8).standard_normal((5, 12)).astype(np.float32)
    kept = [0, 3, 4, 10]
    tb = torch.from_numpy(w).to(torch.bfloat16)
    got = compensate_columns(tb, h, kept)
    assert isinstance(got, Bits16)
    exact = compensate_columns(tb.float().numpy().astype(np.float64), h, kept)
    np.testing.assert_array_equal(got.bits, nearest16(exact, "bfloat16"))
    lin = torch.nn.Linear(12, 5, bias=False)
    out = compensate_columns(lin, torch.from_numpy(h), kept)
    assert out.dtype == np.float32 and out.shape == (5, 4)


def test_compensation_details():
    x = inputs("random", 120, 10, 9)
    x[:, 6] = 0.0  # an input that never fired
    h = x.T @ x
    w = np.random.default_rng(10).standard_normal((4, 10))
    w_before = w.copy()
    kept = np.array([9, 6, 1, 2])  # any order; the dead column 6 among them
    got = compensate_columns(w, h, kept)
    np.testing.assert_array_equal(w, w_before)  # the input is not modified
    np.testing.assert_array_equal(got[:, 1], w[:, 6])  # a dead column keeps its weights
    live = np.array([9, 1, 2])
    lam = 0.01 * float(np.mean(np.where(np.diag(h) == 0, 1.0, np.diag(h))))
    np.testing.assert_allclose(got[:, [0, 2, 3]], ridge(x, w, live, lam), rtol=1e-9)
    # ActivationStats with a Hessian serve as the Hessian
    stats = ActivationStats(10, hessian=True)
    stats.update(x)
    np.testing.assert_allclose(compensate_columns(w, stats, kept), got, rtol=1e-12)
    # keeping everything with almost no damping gives the weights back
    np.testing.assert_allclose(compensate_columns(w, h + np.eye(10), np.arange(10),
                                                  percdamp=1e-12), w, rtol=1e-8, atol=1e-10)
    assert compensate_columns(w, h, []).shape == (4, 0)
    assert compensate_columns(np.zeros((0, 10)), h, kept).shape == (0, 4)
    # the scale of H does not matter (with no dead input: SparseGPT counts a dead input's
    # diagonal as 1 in the damping's mean, whatever the scale)
    h2 = h + np.diag(np.where(np.diag(h) == 0, 5.0, 0.0))
    np.testing.assert_allclose(compensate_columns(w, h2 * 1e-6, kept),
                               compensate_columns(w, h2, kept), rtol=1e-9)


def test_compensation_refuses_bad_input():
    x = inputs("random", 50, 6, 11)
    h = x.T @ x
    w = np.ones((3, 6))
    cases = [
        (dict(kept=[0, 6]), InvalidArgumentError, r"kept\[1\] = 6 is outside"),
        (dict(kept=[-1]), InvalidArgumentError, "outside"),
        (dict(kept=[1, 1]), InvalidArgumentError, "column 1 more than once"),
        (dict(kept=np.ones(6, bool)), InvalidDTypeError, "flatnonzero"),
        (dict(kept=[0.5]), InvalidDTypeError, "integer"),
        (dict(kept=[[0, 1]]), InvalidShapeError, "1-D"),
        (dict(hessian=h[:5, :5]), ShapeMismatchError, "6 input columns"),
        (dict(hessian=h[:, :5]), HessianError, "square"),
        (dict(hessian=np.triu(h)), HessianError, "symmetric"),
        (dict(hessian=np.where(np.eye(6, dtype=bool), np.nan, h)), HessianError, "finite"),
        (dict(hessian=np.zeros((6, 6))), HessianError, "all zero"),
        (dict(hessian=h.astype(np.float16)), InvalidDTypeError, "float32 or float64"),
        (dict(percdamp=0), InvalidArgumentError, "percdamp"),
        (dict(percdamp=float("nan")), InvalidArgumentError, "percdamp"),
        (dict(w=np.ones(6)), InvalidShapeError, "2-D"),
        (dict(w=np.full((3, 6), np.nan)), NumericalInstabilityError, "NaN"),
    ]
    for change, err, msg in cases:
        args = dict(w=w, hessian=h, kept=[0, 2, 3])
        args.update(change)
        with pytest.raises(err, match=msg):
            compensate_columns(args["w"], args["hessian"], args["kept"],
                               **({"percdamp": change["percdamp"]} if "percdamp" in change
                                  else {}), layer="mlp.down_proj")
    # not positive definite even after damping: a strongly indefinite symmetric H[S, S]
    bad = np.array([[1.0, 10.0], [10.0, 1.0]])
    with pytest.raises(HessianError, match="not positive definite.*raise percdamp") as e:
        compensate_columns(np.ones((2, 2)), bad, [0, 1], layer="mlp.down_proj")
    assert e.value.layer == "mlp.down_proj" and "mlp.down_proj" in str(e.value)
    # a result beyond the dtype's range
    big = np.full((2, 2), 60000.0, np.float16)
    hc = np.array([[1.0, 1.0 - 1e-3], [1.0 - 1e-3, 1.0]])
    with pytest.raises(NumericalInstabilityError, match="overflows|not finite"):
        compensate_columns(big, hc, [0], percdamp=1e-9)
    assert all(issubclass(e, PruningError) for e in (HessianError, ShapeMismatchError))


def test_compensation_reads_the_hessian_a_block_of_rows_at_a_time(monkeypatch):
    import aprender.structured.compensate as comp

    x = inputs("correlated", 150, 30, 12)
    h = (x.T @ x).astype(np.float32)
    w = np.random.default_rng(13).standard_normal((6, 30)).astype(np.float32)
    kept = np.arange(1, 30, 2)
    whole = compensate_columns(w.astype(np.float64), h, kept)
    monkeypatch.setattr(comp, "_BLOCK", 70)  # two rows of H per block, a partial last block
    np.testing.assert_allclose(compensate_columns(w.astype(np.float64), h, kept), whole,
                               rtol=1e-12)
    lam = 0.01 * float(np.mean(np.diag(h.astype(np.float64))))
    np.testing.assert_allclose(whole, ridge(x, w.astype(np.float64), kept, lam), rtol=1e-4)
