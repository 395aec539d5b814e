"""SparseGPT: the kernel path against an independent float64 reference, the point of the method
(lower reconstruction error than the same mask alone), exact counts, bad input, the importance
scores, and the shared Hessians of calibration files."""
import json
import struct

import numpy as np
import pytest

from aprender import Bits16
from aprender import _reference as ref
from aprender.errors import (CalibrationError, CalibrationFileError, HessianError,
                             InvalidArgumentError, InvalidDTypeError, InvalidPatternError,
                             InvalidShapeError, NumericalInstabilityError, ShapeMismatchError)
from aprender.pruning import (ActivationStats, CalibrationContext, SparseGPTImportance,
                              sparsegpt)
from aprender.pruning.calibration import HessianFile
from aprender.pruning.reconstruct import hessian_factor


def layer(rows, cols, tokens=None, seed=0, dtype=np.float32):
    """Weights and correlated activations (each feature mixes its neighbours, as real
    activations do) and their Hessian XᵀX (float64)."""
    rng = np.random.default_rng(seed)
    tokens = tokens or 4 * cols
    x = rng.standard_normal((tokens, cols))
    x[:, 1:] += 0.7 * x[:, :-1]
    x *= rng.uniform(0.2, 3.0, cols)  # features of different scales
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return cast(w, dtype), x, x.T @ x


def cast(w, dtype):
    if dtype == "bfloat16":
        bits = ((w.view(np.uint32) + 0x7FFF + ((w.view(np.uint32) >> 16) & 1)) >> 16)
        return Bits16(bits.astype(np.uint16), "bfloat16")
    return w.astype(dtype)


def f64(w):
    return ref.to_float64(w)


PATTERNS = [("unstructured", 0.5, {}), ("per-row", 0.6, {"per_row": True}),
            ("2:4", None, {"n": 2, "m": 4}), ("1:4", None, {"n": 1, "m": 4}),
            ("2:8", None, {"n": 2, "m": 8}), ("4:16", None, {"n": 4, "m": 16})]


def _valid_choice(decisions, keep, rtol=1e-4):
    """Every selection the kernel made is also a valid choice for the reference's saliencies up
    to float32 rounding: what it pruned is never clearly more salient than what it kept."""
    for kind, sal, chosen in decisions:
        groups = [(sal.reshape(-1), chosen.reshape(-1))] if kind == "block" else \
            list(zip(sal, chosen))
        for s, k in groups:
            if k.all() or not k.any():
                continue
            assert s[~k].max() <= s[k].min() * (1 + rtol) + 1e-30


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("pattern,sparsity,kw", PATTERNS, ids=[p[0] for p in PATTERNS])
def test_agrees_with_the_float64_reference(dtype, pattern, sparsity, kw):
    w, _, h = layer(24, 96, seed=3, dtype=dtype)
    before = f64(w).copy()
    out, mask = sparsegpt(w, h.astype(np.float32), sparsity, pattern=pattern, block_size=32)
    np.testing.assert_array_equal(f64(w), before)  # the input is not modified
    want, keep, decisions = ref.sparsegpt(w, h.astype(np.float32), sparsity, block_size=32, **kw)
    if not np.array_equal(mask.keep, keep):  # a near-tie rounded the other way in float32
        _valid_choice(ref.sparsegpt(w, h.astype(np.float32), sparsity, block_size=32,
                                    force_keep=mask.keep, **kw)[2], mask.keep)
        want = ref.sparsegpt(w, h.astype(np.float32), sparsity, block_size=32,
                             force_keep=mask.keep, **kw)[0]
    got = f64(out)
    scale = np.abs(want).max()
    if dtype == "float32":
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * scale)
    else:  # rounded once to the dtype: at most one unit in the last place apart
        ulp = 2.0 ** (-10 if dtype == "float16" else -7)
        np.testing.assert_allclose(got, want, rtol=2 * ulp, atol=1e-4 * scale)
    assert isinstance(out, Bits16) == (dtype == "bfloat16")
    if dtype != "bfloat16":
        assert out.dtype == np.dtype(dtype)
    # exact count / pattern, pruned positions are +0.0
    rows, cols = 24, 96
    if pattern == "unstructured":
        assert mask.num_zeros() == ref.prune_count(0.5, rows * cols)
    elif pattern == "per-row":
        assert (np.count_nonzero(~mask.keep, axis=1) == ref.prune_count(0.6, cols)).all()
    else:
        assert (mask.keep.reshape(rows, -1, kw["m"]).sum(-1) == kw["n"]).all()
    bits = out.bits if isinstance(out, Bits16) else out.view(f"u{out.dtype.itemsize}")
    assert (bits[~mask.keep] == 0).all()  # +0.0, never -0.0
    assert (got[mask.keep] != 0).mean() > 0.99


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("per-row", 0.5),
                                              ("2:4", None)])
def test_the_update_lowers_the_reconstruction_error(pattern, sparsity):
    w, x, h = layer(64, 128, seed=5)
    out, mask = sparsegpt(w, h, sparsity, pattern=pattern)
    dense = x @ w.T.astype(np.float64)
    with_update = np.linalg.norm(dense - x @ out.T.astype(np.float64))
    mask_only = np.linalg.norm(dense - x @ (w * mask.keep).T.astype(np.float64))
    assert with_update < 0.97 * mask_only


def test_float64_weights_are_computed_in_float64():
    w, _, h = layer(16, 64, seed=1, dtype=np.float64)
    out, mask = sparsegpt(w, h, 0.5, block_size=16)
    want, keep, _ = ref.sparsegpt(w, h, 0.5, block_size=16)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(mask.keep, keep)
    np.testing.assert_allclose(out, want, rtol=1e-9, atol=1e-11 * np.abs(want).max())


def test_results_do_not_depend_on_threads_or_input_kind():
    torch = pytest.importorskip("torch")
    w, _, h = layer(600, 256, seed=2)  # large enough for every kernel to use two threads
    a, ma = sparsegpt(w, h, 0.5, n_threads=1)
    b, mb = sparsegpt(w, h, 0.5, n_threads=2)
    c, mc = sparsegpt(torch.from_numpy(w), torch.from_numpy(h), 0.5, n_threads=2)
    assert a.tobytes() == b.tobytes() == c.tobytes()
    assert np.array_equal(ma.keep, mb.keep) and np.array_equal(ma.keep, mc.keep)
    tb = torch.from_numpy(w).to(torch.bfloat16)
    d, _ = sparsegpt(tb, h, 0.5)
    e, _ = sparsegpt(cast(w, "bfloat16"), h, 0.5)
    assert isinstance(d, Bits16) and np.array_equal(d.bits, e.bits)


def test_activation_stats_and_scaled_hessians_give_the_same_result():
    w, x, h = layer(16, 64, seed=4)
    st = ActivationStats(64, hessian=True).update(x)
    a, ma = sparsegpt(w, st, 0.5)
    b, mb = sparsegpt(w, st.hessian * (2.0 / x.shape[0]), 0.5)  # the paper's 2/n XᵀX
    assert np.array_equal(ma.keep, mb.keep)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dead_inputs_are_zeroed_and_pruned_first():
    w, x, _ = layer(8, 32, seed=6)
    x[:, [3, 17]] = 0.0
    h = x.T @ x
    out, mask = sparsegpt(w, h, 0.25)
    assert not mask.keep[:, [3, 17]].any()
    assert (out[:, [3, 17]] == 0).all()
    want, keep, _ = ref.sparsegpt(w, h, 0.25)
    np.testing.assert_array_equal(mask.keep, keep)


def test_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    _, _, h = layer(4, 48, seed=7)
    f = hessian_factor(h, 0.01, wide=True)
    damped = (h + 0.01 * np.mean(np.diag(h)) * np.eye(48)) / np.mean(np.diag(h))  # scaled
    np.testing.assert_allclose(f.u.T @ f.u, np.linalg.inv(damped), rtol=1e-8,
                               atol=1e-12 * np.abs(np.linalg.inv(damped)).max())
    assert np.array_equal(f.u, np.triu(f.u)) and (np.diag(f.u) > 0).all()
    f32 = hessian_factor(h.astype(np.float32), 0.01)
    assert f32.u.dtype == np.float32
    np.testing.assert_allclose(f32.u, f.u, rtol=1e-5, atol=1e-6 * np.abs(f.u).max())


def test_empty_and_edge_shapes():
    w, _, h = layer(0, 16, seed=0)
    out, mask = sparsegpt(w, h, 0.5)
    assert out.shape == (0, 16) and mask.keep.shape == (0, 16)
    w, _, h = layer(3, 5, seed=0)  # fewer columns than a block, odd sizes
    out, mask = sparsegpt(w, h, 0.4)
    want, keep, _ = ref.sparsegpt(w, h, 0.4)
    np.testing.assert_array_equal(mask.keep, keep)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    out, mask = sparsegpt(w, h, 0.0)
    assert mask.keep.all()
    out, mask = sparsegpt(w, h, 1.0)
    assert not mask.keep.any() and (out == 0).all()


# ----------------------------------------------------------------------------------------------
# bad input: typed errors naming the layer
# ----------------------------------------------------------------------------------------------

def _bad_cases():
    w, _, h = layer(8, 16, seed=0)
    asym = h.copy()
    asym[2, 5] += 10 * np.sqrt(h[2, 2] * h[5, 5])
    nan = h.copy()
    nan[4, 1] = np.nan
    neg = h.copy()
    neg[3, 3] = -1.0
    indefinite = np.eye(16) + 0.99 * (np.ones((16, 16)) - np.eye(16))
    indefinite[0, 1] = indefinite[1, 0] = 5.0
    return w, h, [
        ("not-square", dict(hessian=h[:, :8]), HessianError, r"layer 'L': .*square"),
        ("size", dict(hessian=h[:8, :8]), ShapeMismatchError, r"8 x 8 but the weights have 16"),
        ("asymmetric", dict(hessian=asym), HessianError, r"not symmetric: h\[2, 5\]"),
        ("nan", dict(hessian=nan), HessianError, r"holds nan at \(4, 1\)"),
        ("negative-diagonal", dict(hessian=neg), HessianError, r"negative diagonal .* \(3, 3\)"),
        ("not-positive-definite", dict(hessian=indefinite), HessianError,
         r"not positive definite even after damping"),
        ("all-zero", dict(hessian=np.zeros((16, 16))), HessianError, r"all zero"),
        ("int", dict(hessian=np.eye(16, dtype=np.int64)), InvalidDTypeError, r"float32 or float64"),
        ("percdamp-zero", dict(percdamp=0.0), InvalidArgumentError, r"percdamp must be"),
        ("percdamp-nan", dict(percdamp=float("nan")), InvalidArgumentError, r"percdamp must be"),
        ("block-nm", dict(pattern="2:4", sparsity=None, block_size=6), InvalidArgumentError,
         r"block_size 6 must be a multiple of M=4"),
        ("block-zero", dict(block_size=0), InvalidArgumentError, r"block_size must be >= 1"),
        ("pattern", dict(pattern="block:4x4"), InvalidPatternError, r"SparseGPT supports"),
        ("weights-3d", dict(weights=np.zeros((2, 8, 16), np.float32)), InvalidShapeError,
         r"2-D weight"),
        ("weights-nan", dict(weights=np.full((8, 16), np.nan, np.float32)),
         NumericalInstabilityError, r"NaN"),
        ("no-hessian-stats", dict(hessian=ActivationStats(16).update(np.ones((2, 16)))),
         CalibrationError, r"no Hessian"),
    ]


_W, _H, BAD = _bad_cases()


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_a_typed_error(case):
    import re

    _, over, exc, pattern = case
    args = dict(weights=_W, hessian=_H, sparsity=0.5, pattern="unstructured", layer="L")
    args.update(over)
    with pytest.raises(exc) as info:
        sparsegpt(args.pop("weights"), args.pop("hessian"), args.pop("sparsity"), **args)
    assert re.search(pattern, str(info.value)), str(info.value)


def test_nm_needs_divisible_columns():
    w, _, h = layer(4, 18, seed=0)
    with pytest.raises(InvalidPatternError, match="not divisible by M=4"):
        sparsegpt(w, h, pattern="2:4")


# ----------------------------------------------------------------------------------------------
# importance scores
# ----------------------------------------------------------------------------------------------

def test_sparsegpt_importance_scores():
    w, x, _ = layer(12, 40, seed=8)
    st = ActivationStats(40, hessian=True).update(x)
    ctx = CalibrationContext({"enc.fc": st})
    scores = SparseGPTImportance("enc.fc").compute(w, ctx)
    h = st.hessian + 0.01 * np.mean(np.diag(st.hessian)) * np.eye(40)
    h /= np.mean(np.diag(st.hessian))  # the scores are those of H at a mean diagonal of 1
    d = np.diag(np.linalg.cholesky(np.linalg.inv(h)).T)
    want = f64(w) ** 2 / d ** 2
    np.testing.assert_allclose(scores.values, want, rtol=1e-4)
    assert scores.method == "sparsegpt" and scores.stats.count == w.size
    assert scores.stats.max == pytest.approx(float(scores.values.max()))
    assert np.allclose(SparseGPTImportance().compute(w, st).values, scores.values)
    with pytest.raises(CalibrationError, match="no activation statistics for layer 'enc.fc2'"):
        SparseGPTImportance("enc.fc2").compute(w, ctx)
    with pytest.raises(CalibrationError, match="no Hessian"):
        SparseGPTImportance().compute(w, ActivationStats(40).update(x))


# ----------------------------------------------------------------------------------------------
# shared Hessians in calibration contexts and files
# ----------------------------------------------------------------------------------------------

def _shared_context():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 8)), rng.standard_normal((20, 12))
    q = ActivationStats(8, hessian=True).update(x)
    k = ActivationStats(8).update(x)
    k._share_hessian_of(q)
    o = ActivationStats(12, hessian=True).update(y)
    return CalibrationContext({"a.q": q, "a.k": k, "a.o": o}, num_samples=2), x


def _metadata(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def test_shared_hessians_are_stored_once_in_float32(tmp_path):
    ctx, x = _shared_context()
    path = tmp_path / "c.safetensors"
    ctx.save(path)
    header = _metadata(path)
    assert json.loads(header["__metadata__"]["hessian_of"]) == {"a.k": "a.q"}
    assert "a.k.hessian" not in header and header["a.q.hessian"]["dtype"] == "F32"
    back = CalibrationContext.load(path)
    assert back["a.k"].shares_hessian_with(back["a.q"])
    assert not back["a.o"].shares_hessian_with(back["a.q"])
    np.testing.assert_array_equal(back["a.q"].hessian,
                                  ctx["a.q"].hessian.astype(np.float32).astype(np.float64))
    hf = HessianFile(path)
    assert hf.source("a.k") == "a.q" and hf.get("a.k").dtype == np.float32
    assert hf.get("missing") is None
    lazy = CalibrationContext.load(path, hessians=False)
    assert not lazy["a.q"].has_hessian and lazy["a.q"].count == 20


def test_shared_hessians_are_copied_on_write():
    ctx, x = _shared_context()
    before = ctx["a.q"].hessian.copy()
    ctx["a.k"].update(x[:3])  # k alone changes: its Hessian must stop being q's
    assert not ctx["a.k"].shares_hessian_with(ctx["a.q"])
    np.testing.assert_array_equal(ctx["a.q"].hessian, before)
    assert not np.array_equal(ctx["a.k"].hessian, before)


def test_merging_keeps_sharing_where_both_sides_share():
    a, _ = _shared_context()
    b, _ = _shared_context()
    m = a.merge(b)
    assert m["a.k"].shares_hessian_with(m["a.q"])
    np.testing.assert_array_equal(m["a.q"].hessian, 2 * a["a.q"].hessian)
    c = CalibrationContext({n: a[n].copy() for n in a}, num_samples=1)  # copies: not shared
    m2 = a.merge(c)
    assert not m2["a.k"].shares_hessian_with(m2["a.q"])
    np.testing.assert_array_equal(m2["a.k"].hessian, m2["a.q"].hessian)


def test_activations_too_large_for_a_float32_hessian_are_refused_first():
    st = ActivationStats(4, hessian=True).update(np.ones((2, 4), np.float32))
    before = st.hessian.copy(), st.sum_squares.copy(), st.count
    with pytest.raises(NumericalInstabilityError, match="input feature 0 .* beyond float32"):
        st.update(np.full((3, 4), 3e19, np.float32))
    assert np.array_equal(st.hessian, before[0]) and st.count == before[2]
    st.update(np.full((3, 4), 3e19, np.float64))  # float64 activations: a float64 product
    assert np.isfinite(st.hessian).all()


def _rewrite(tmp_path, ctx, edit):
    """ctx saved, then its tensors and metadata passed through ``edit`` into a new file."""
    from aprender.io.safetensors import SafetensorsFile, write_safetensors

    good = tmp_path / "good.safetensors"
    ctx.save(good)
    sf = SafetensorsFile(good)
    tensors = {i.name: np.array(sf.array(i.name)) for i in sf.infos}
    meta = dict(sf.metadata)
    edit(tensors, meta)
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, tensors, meta)
    return bad


@pytest.mark.parametrize("edit,pattern", [
    (lambda t, m: t.update({"a.k.count": np.array(0, np.int64),
                            "a.k.sum_squares": np.zeros(8)}),
     r"'a.k' shares the Hessian of 'a.q' but its tokens or sums of squares differ"),
    (lambda t, m: t.update({"a.k.sum_squares": t["a.k.sum_squares"] * 2}),
     r"tokens or sums of squares differ"),
    (lambda t, m: t.update({"a.q.hessian": t["a.q.hessian"].astype(np.float16)}),
     r"hessian must be F32 or F64 of shape \[8, 8\], got F16"),
    (lambda t, m: t.pop("a.k.sum_squares"), r"a.k.sum_squares' is missing"),
])
def test_inconsistent_shared_hessians_are_refused(tmp_path, edit, pattern):
    ctx, _ = _shared_context()
    bad = _rewrite(tmp_path, ctx, edit)
    with pytest.raises(CalibrationFileError, match=pattern):
        CalibrationContext.load(bad)
    if "differ" not in pattern:  # the header checks are HessianFile's too
        with pytest.raises(CalibrationFileError, match=pattern):
            HessianFile(bad)


def test_layers_new_to_a_context_keep_sharing_among_themselves():
    a, _ = _shared_context()
    only_k = CalibrationContext({"a.k": a["a.k"].copy()}, num_samples=1)
    only_k.merge_(a)
    assert not only_k["a.q"].shares_hessian_with(only_k["a.k"])  # k has more data now
    np.testing.assert_array_equal(only_k["a.k"].hessian, 2 * a["a.q"].hessian)
    only_o = CalibrationContext({"a.o": a["a.o"].copy()}, num_samples=1)
    only_o.merge_(a)
    assert only_o["a.k"].shares_hessian_with(only_o["a.q"])  # both new: still one Hessian
    np.testing.assert_array_equal(only_o["a.q"].hessian, a["a.q"].hessian)


@pytest.mark.parametrize("meta,pattern", [
    ('{"a.k": "a.x"}', r"names 'a.x', which has no hessian tensor"),
    ('{"a.o": "a.q"}', r"has a hessian tensor of its own"),
    ('["a.q"]', r"must be a JSON object"),
    ('{"a.k": "a.q", "a.k": "a.q"}', r"duplicate"),
    ('{"zz": "a.q"}', r"names layer 'zz', which has no statistics"),
])
def test_hostile_hessian_of_metadata(tmp_path, meta, pattern):
    from aprender.io.safetensors import SafetensorsFile, write_safetensors

    ctx, _ = _shared_context()
    good = tmp_path / "good.safetensors"
    ctx.save(good)
    sf = SafetensorsFile(good)
    tensors = {i.name: np.array(sf.array(i.name)) for i in sf.infos}
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, tensors, {**sf.metadata, "hessian_of": meta})
    with pytest.raises(CalibrationFileError, match=pattern):
        CalibrationContext.load(bad)


def _traced_peak(fn):
    """Peak bytes of numpy (Python-heap) allocations while fn runs."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

def test_memory_beyond_the_output_is_one_error_matrix_and_blocks():
    """numpy allocations (tracemalloc sees them; U lives in an anonymous map of 8 n² bytes,
    half of it released before the weights are touched): the output, the error matrix and
    block-sized scratch — never a temporary the size of the weights on top."""
    w, _, h = layer(256, 512, seed=0)
    sparsegpt(w[:8, :16], h[:16, :16], 0.5)  # imports and first-call allocations
    peak = _traced_peak(lambda: sparsegpt(w, h, 0.5, block_size=128))
    out = w.nbytes + w.size  # float32 weights and the bool mask
    block = 256 * 128
    # scratch: the lazy update's and the saliencies' blocks, the block mask, and the selection
    # engine's keys of one block (all of them below its sampling threshold)
    bound = out + w.nbytes + block * (4 + 4 + 1) + 2 * block * 4 + (64 << 10)
    assert peak <= bound, (peak, bound)


@pytest.mark.parametrize("scale", [1e-60, 1e-30, 1e30, 1e40])
def test_the_scale_of_the_hessian_does_not_matter(scale):
    """SparseGPT is invariant to scaling H; U is computed for H at a mean diagonal of 1, so
    Hessians in any units stay inside float32's range."""
    w, _, h = layer(16, 64, seed=9)
    a, ma = sparsegpt(w, h, 0.5)
    b, mb = sparsegpt(w, h * scale, 0.5)
    assert np.array_equal(ma.keep, mb.keep)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    n, mn = sparsegpt(w, h * scale, pattern="2:4")
    assert np.array_equal(mn.keep, sparsegpt(w, h, pattern="2:4")[1].keep)


def test_byte_order_and_memory_layout_of_inputs():
    w, _, h = layer(16, 64, seed=10)
    h = (h + h.T) / 2  # exactly symmetric, so h.T holds the same values
    a, ma = sparsegpt(w, h, 0.5)
    for ww, hh in [(w.astype(">f4"), h), (w, h.astype(">f8")), (np.asfortranarray(w), h.T),
                   (w, np.asfortranarray(h)), (w, h[:, ::-1][:, ::-1])]:
        b, mb = sparsegpt(ww, hh, 0.5)
        assert np.array_equal(ma.keep, mb.keep) and np.array_equal(a, b)


def test_asymmetry_is_found_at_any_scale():
    w, _, h = layer(4, 8, seed=11)
    bad = h * 1e150
    bad[0, 7] = -bad[0, 7]
    with pytest.raises(HessianError, match=r"not symmetric: h\[0, 7\]"):
        sparsegpt(w, bad, 0.5)


@pytest.mark.parametrize("value", [1e307, 1e7, -1.0])
def test_percdamp_out_of_range(value):
    w, _, h = layer(4, 8, seed=0)
    with pytest.raises(InvalidArgumentError, match=r"percdamp must be a number in \(0, 1e\+06\]"):
        sparsegpt(w, h, 0.5, percdamp=value)


@pytest.mark.parametrize("pattern,sparsity,kw", [("unstructured", 0.5, {}),
                                                  ("per-row", 0.5, {"per_row": True}),
                                                  ("2:4", None, {"n": 2, "m": 4})])
def test_must_prune_weights_are_ranked_first_and_always_pruned(pattern, sparsity, kw):
    w, _, h = layer(24, 64, seed=12)
    must = np.random.default_rng(1).random(w.shape) < 0.3
    out, mask = sparsegpt(w, h, sparsity, pattern=pattern, block_size=32, must_prune=must)
    assert not mask.keep[must].any() and (out[must] == 0).all()
    want, keep, _ = ref.sparsegpt(w, h, sparsity, block_size=32, must_prune=must, **kw)
    np.testing.assert_array_equal(mask.keep, keep)
    np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-5 * np.abs(want).max())
    if pattern == "unstructured":  # fewer forced than the share: the count stays exact
        assert mask.num_zeros() == ref.prune_count(0.5, w.size)
    with pytest.raises(ShapeMismatchError, match="must_prune has shape"):
        sparsegpt(w, h, sparsity, pattern=pattern, must_prune=must[:, :8])


def test_memory_of_fortran_and_big_endian_weights_is_one_copy():
    w, _, h = layer(256, 512, seed=0)
    sparsegpt(w[:8, :16], h[:16, :16], 0.5)
    for ww in (w, np.asfortranarray(w), w.astype(">f4")):
        peak = _traced_peak(lambda: sparsegpt(ww, h, 0.5, block_size=128))
        block = 256 * 128
        bound = w.nbytes + w.size + w.nbytes + block * 9 + 2 * block * 4 + (64 << 10)
        assert peak <= bound, (ww.flags.c_contiguous, ww.dtype, peak, bound)
