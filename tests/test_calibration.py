"""Calibration statistics: ActivationStats (the sum-of-squares kernel against the slow reference),
CalibrationContext (mapping, merge, the safetensors file and hostile files)."""
import json
import os
import struct
import tracemalloc

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

from aprender import Bits16  # noqa: E402
from aprender import _reference as ref  # noqa: E402
from aprender._kernels import calib  # noqa: E402
from aprender.errors import UnsafePathError  # noqa: E402
from aprender.io.safetensors import encode_header  # noqa: E402
from aprender.pruning import (ActivationStats, CalibrationContext,  # noqa: E402
                              CalibrationError, CalibrationFileError, CheckpointError,
                              InvalidArgumentError, InvalidDTypeError, InvalidShapeError,
                              MissingActivationStatsError, NumericalInstabilityError,
                              PruningError, ShapeMismatchError, wanda_scale)

DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
          "bfloat16": ml_dtypes.bfloat16}


def acts(shape, dtype="float32", seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * scale
    return x.astype(DTYPES[dtype])


# ----------------------------------------------------------------------------------------------
# ActivationStats against the reference
# ----------------------------------------------------------------------------------------------

SHAPES = [(1, 1), (7,), (3, 5), (4, 3, 9), (37, 129), (2, 0, 4), (0, 6), (5000, 3),
          (1100, 2100), (2, 700, 33)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sum_squares_equals_reference(dtype, shape):
    x = acts(shape, dtype, seed=len(shape) + shape[-1])
    st = ActivationStats(shape[-1]).update(x)
    np.testing.assert_array_equal(st.sum_squares, ref.sum_squares(x))
    assert st.count == int(np.prod(shape[:-1]))
    assert st.sum_squares.dtype == np.float64


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sum_squares_close_to_numpy(dtype):
    x = acts((3000, 40), dtype, seed=3)
    st = ActivationStats(40).update(x)
    expect = (ref.to_float64(x) ** 2).sum(0)
    np.testing.assert_allclose(st.sum_squares, expect, rtol=1e-13)
    np.testing.assert_allclose(st.input_norms, np.sqrt(expect), rtol=1e-13)
    np.testing.assert_allclose(st.squared_mean, expect / 3000, rtol=1e-13)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sum_squares_independent_of_threads(dtype):
    x = acts((4100, 700), dtype, seed=5)  # several row chunks and column blocks
    results = [ActivationStats(700).update(x, n_threads=nt).sum_squares.copy()
               for nt in (1, 2, 4, 64)]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    np.testing.assert_array_equal(results[0], ref.sum_squares(x))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_layouts_and_adapters(dtype):
    x = acts((60, 24), dtype, seed=7)
    expect = ActivationStats(24).update(x)
    variants = [np.asfortranarray(x), x.T.copy().T, np.ascontiguousarray(x[::-1])[::-1]]
    for v in variants:
        assert ActivationStats(24).update(v) == expect
    if dtype != "bfloat16":
        assert ActivationStats(24).update(x.astype(x.dtype.newbyteorder(">"))) == expect
    else:
        assert ActivationStats(24).update(Bits16(x.view(np.uint16), "bfloat16")) == expect
    if dtype == "float16":
        assert ActivationStats(24).update(Bits16(x.view(np.uint16), "float16")) == expect
    # a row-strided view is read in place, and equals its contiguous copy
    big = acts((120, 24), dtype, seed=8)
    assert ActivationStats(24).update(big[::2]) == ActivationStats(24).update(big[::2].copy())
    # a column-strided view is copied once
    wide = acts((60, 48), dtype, seed=9)
    assert ActivationStats(24).update(wide[:, ::2]) == \
        ActivationStats(24).update(np.ascontiguousarray(wide[:, ::2]))


def test_torch_tensors():
    torch = pytest.importorskip("torch")
    x = acts((6, 10, 16), "float32", seed=2)
    t = torch.from_numpy(x)
    assert ActivationStats(16).update(t) == ActivationStats(16).update(x)
    for tdt, ndt in ((torch.float16, np.float16), (torch.bfloat16, ml_dtypes.bfloat16),
                     (torch.float64, np.float64)):
        a = ActivationStats(16).update(t.to(tdt))
        b = ActivationStats(16).update(x.astype(ndt))
        assert a == b
    # a non-contiguous tensor (transposed) and one that requires grad
    assert ActivationStats(16).update(t.transpose(0, 1)) == \
        ActivationStats(16).update(np.ascontiguousarray(x.transpose(1, 0, 2)))
    g = t.clone().requires_grad_(True)
    assert ActivationStats(16).update(g) == ActivationStats(16).update(x)


def test_no_float64_copy_of_the_activations():
    x = acts((4096, 1024), "bfloat16", seed=1)
    st = ActivationStats(1024)
    st.update(x[:16])  # warm up
    tracemalloc.start()
    try:
        st.update(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes // 4, peak  # a float64 copy would take 4 * x.nbytes


def test_where_equals_selected_rows():
    x = acts((4, 900, 12), "bfloat16", seed=4)
    m = np.random.default_rng(0).random((4, 900)) < 0.7
    a = ActivationStats(12).update(x, where=m)
    assert a == ActivationStats(12).update(x[m])
    assert a.count == int(m.sum())
    assert ActivationStats(12).update(x, where=m.astype(np.int64)) == a
    assert ActivationStats(12).update(x, where=np.zeros((4, 900), bool)).count == 0
    np.testing.assert_array_equal(a.sum_squares, ref.sum_squares(x, where=m))
    torch = pytest.importorskip("torch")
    assert ActivationStats(12).update(x, where=torch.from_numpy(m)) == a


def test_where_errors():
    x = acts((4, 5, 3))
    with pytest.raises(ShapeMismatchError, match=r"\(4, 6\).*\(4, 5\)"):
        ActivationStats(3).update(x, where=np.ones((4, 6), bool))
    with pytest.raises(InvalidArgumentError, match="0 and 1"):
        ActivationStats(3).update(x, where=np.full((4, 5), 2))
    with pytest.raises(InvalidDTypeError):
        ActivationStats(3).update(x, where=np.ones((4, 5), np.float32))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_activations(dtype, bad):
    x = acts((40, 9), dtype, seed=1)
    x[17, 4] = bad
    st = ActivationStats(9).update(acts((3, 9), dtype))
    before = st.copy()
    with pytest.raises(NumericalInstabilityError) as info:
        st.update(x.reshape(2, 20, 9))
    assert info.value.index == (0, 17, 4)
    assert st == before  # unchanged
    m = np.ones(40, bool)
    m[17] = False  # the bad token is excluded: fine
    st.update(x, where=m)
    assert st.count == before.count + 39


def test_float64_overflow():
    x = np.full((3, 2), 1e200)
    with pytest.raises(NumericalInstabilityError, match="overflows float64"):
        ActivationStats(2).update(x)


def test_bad_inputs():
    st = ActivationStats(4)
    with pytest.raises(ShapeMismatchError, match=r"\(3, 5\).*4 input features"):
        st.update(np.ones((3, 5), np.float32))
    with pytest.raises(InvalidShapeError):
        st.update(np.float32(1.0))
    with pytest.raises(InvalidDTypeError, match="int64"):
        st.update(np.ones((2, 4), np.int64))
    with pytest.raises(InvalidDTypeError, match="Bits16"):
        st.update(np.ones((2, 4), np.uint16))
    with pytest.raises(InvalidDTypeError):
        st.update([["a", "b", "c", "d"]])
    for bad in (0, -1, 2.5, True, None, "4"):
        with pytest.raises(InvalidArgumentError):
            ActivationStats(bad)
    with pytest.raises(InvalidArgumentError):
        ActivationStats(3, hessian="yes")
    with pytest.raises(CalibrationError, match="count is 0"):
        ActivationStats(3).squared_mean
    assert st.count == 0 and not st.sum_squares.any()


def test_read_only_views():
    st = ActivationStats(3, hessian=True).update(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError):
        st.sum_squares[0] = 5
    with pytest.raises(ValueError):
        st.hessian[0, 0] = 5
    assert ActivationStats(3).hessian is None


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_hessian(dtype):
    x = acts((3, 700, 20), dtype, seed=6)
    st = ActivationStats(20, hessian=True).update(x)
    h = ref.hessian(x)
    rtol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(st.hessian, h, rtol=rtol, atol=rtol * np.abs(h).max())
    assert st.hessian.dtype == np.float64
    np.testing.assert_array_equal(st.hessian, st.hessian.T)
    m = np.random.default_rng(1).random((3, 700)) < 0.5
    hm = ActivationStats(20, hessian=True).update(x, where=m).hessian
    np.testing.assert_allclose(hm, ref.hessian(x, m), rtol=rtol,
                               atol=rtol * np.abs(h).max())


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_merge_of_two_halves_equals_one_pass(dtype):
    """Not bit for bit (the float64 sums round in another order): within 1e-14 relative, and
    the float32 Wanda scale they give is the same."""
    x = acts((3000, 64), dtype, seed=11)
    one = ActivationStats(64, hessian=True).update(x)
    a = ActivationStats(64, hessian=True).update(x[:1234])
    b = ActivationStats(64, hessian=True).update(x[1234:])
    merged = a.merge(b)
    assert merged.count == one.count == 3000
    np.testing.assert_allclose(merged.sum_squares, one.sum_squares, rtol=1e-14)
    np.testing.assert_allclose(merged.hessian, one.hessian, rtol=1e-5,
                               atol=1e-5 * np.abs(one.hessian).max())
    np.testing.assert_array_equal(wanda_scale(merged), wanda_scale(one))
    # merge is pure; merge_ is in place
    assert a.count == 1234 and b.count == 1766
    assert a.merge_(b) is a and a == merged
    # many small updates (the hook's case) agree as well
    many = ActivationStats(64)
    for s in range(0, 3000, 100):
        many.update(x[s:s + 100])
    np.testing.assert_allclose(many.sum_squares, one.sum_squares, rtol=1e-14)


def test_merge_errors():
    with pytest.raises(ShapeMismatchError, match="4 input features.*3"):
        ActivationStats(3).merge(ActivationStats(4))
    with pytest.raises(CalibrationError, match="Hessian"):
        ActivationStats(3, hessian=True).merge(ActivationStats(3))
    with pytest.raises(InvalidArgumentError):
        ActivationStats(3).merge(np.ones(3))


def test_from_arrays_validates():
    ok = ActivationStats.from_arrays(np.array([1.0, 2.0]), 3, np.eye(2))
    assert ok.count == 3 and ok.has_hessian
    bad = [
        (np.array([1.0, -2.0]), 3, None, "negative"),
        (np.array([1.0, np.nan]), 3, None, "NaN"),
        (np.array([1.0, 2.0], np.float32), 3, None, "float64"),
        (np.ones((2, 2)), 3, None, "1-D"),
        (np.array([1.0, 2.0]), -1, None, r"\[0, 2\*\*63\)"),
        (np.array([1.0, 2.0]), 2.0, None, "integer"),
        (np.array([1.0, 2.0]), 0, None, "count is 0"),
        (np.array([1.0, 2.0]), 3, np.eye(3), r"\(2, 2\)"),
        (np.array([1.0, 2.0]), 3, -np.eye(2), "diagonal"),
        (np.array([1.0, 2.0]), 3, np.full((2, 2), np.inf), "NaN or infinity"),
    ]
    for ss, count, h, msg in bad:
        with pytest.raises(CalibrationError, match=msg):
            ActivationStats.from_arrays(ss, count, h)


# ----------------------------------------------------------------------------------------------
# the kernel's own checks (reachable from Python)
# ----------------------------------------------------------------------------------------------

def test_kernel_checks_buffers():
    x = np.ones((4, 3), np.float32)
    e = np.empty(0, np.intp)
    with pytest.raises(ShapeMismatchError):
        calib.sum_squares(x, 0, e, True, np.zeros(2), 1)
    with pytest.raises(ShapeMismatchError):
        calib.sum_squares(x, 0, np.array([0, 4], np.intp), False, np.zeros(3), 1)
    with pytest.raises(ShapeMismatchError):
        calib.sum_squares(x, 0, np.array([-1], np.intp), False, np.zeros(3), 1)
    with pytest.raises(InvalidArgumentError):
        calib.sum_squares(x, 0, np.array([1], np.intp), True, np.zeros(3), 1)
    with pytest.raises(InvalidArgumentError):
        calib.sum_squares(x, 2, e, True, np.zeros(3), 1)
    with pytest.raises(InvalidArgumentError):
        calib.sum_squares(x.view(np.uint16)[:, :3], 0, e, True, np.zeros(3), 1)
    with pytest.raises(PruningError):
        calib.sum_squares(np.ones((4, 3), np.int32), 0, e, True, np.zeros(3), 1)
    with pytest.raises(PruningError):
        calib.sum_squares(x, 0, e, True, None, 1)
    w = np.ones((2, 3), np.float32)
    bad = np.zeros(2, np.uint8)
    f32 = np.ones(3, np.float32)
    with pytest.raises(ShapeMismatchError):
        calib.wanda_scores32(w, 0, f32[:2], np.empty((2, 3), np.float32), bad, False, 1)
    with pytest.raises(ShapeMismatchError):
        calib.wanda_scores32(w, 0, f32, np.empty((3, 3), np.float32), bad, False, 1)
    with pytest.raises(ShapeMismatchError):
        calib.wanda_scores32(w, 0, np.ones(3, np.float32), np.empty((2, 3), np.float32),
                             np.zeros(1, np.uint8), False, 1)
    with pytest.raises(InvalidDTypeError):
        calib.wanda_scores32(w.astype(np.float64), 0, np.ones(3, np.float32),
                             np.empty((2, 3), np.float32), bad, False, 1)
    with pytest.raises(ShapeMismatchError):
        calib.wanda_scores64(w.astype(np.float64), np.ones(4), np.empty((2, 3)), bad, False, 1)
    with pytest.raises(InvalidArgumentError):
        calib.score_sum(np.ones(3, np.uint16), 0, 1)
    with pytest.raises(InvalidArgumentError):
        calib.count_above(np.ones(3, np.float32), 1, 0.0, 1)


# ----------------------------------------------------------------------------------------------
# CalibrationContext
# ----------------------------------------------------------------------------------------------

def make_context(hessian=False, seed=0):
    ctx = CalibrationContext(num_samples=7)
    ctx.add_layer_stats("model.layers.0.self_attn.q_proj",
                        ActivationStats(16, hessian=hessian).update(acts((5, 16), seed=seed)))
    ctx.add_layer_stats("model.layers.0.mlp.down_proj",
                        ActivationStats(24, hessian=hessian).update(
                            acts((3, 4, 24), "bfloat16", seed=seed + 1)))
    ctx.add_layer_stats("lm_head", ActivationStats(8, hessian=hessian))  # no tokens yet
    return ctx


def test_context_mapping():
    ctx = make_context()
    assert ctx.layer_names == ["model.layers.0.self_attn.q_proj",
                               "model.layers.0.mlp.down_proj", "lm_head"]
    assert len(ctx) == 3 and "lm_head" in ctx and "nope" not in ctx and 3 not in ctx
    assert list(ctx) == ctx.layer_names
    assert ctx.get_stats("nope") is None and ctx.get_stats(3) is None
    assert ctx["lm_head"] is ctx.require_stats("lm_head") is ctx.get_stats("lm_head")
    with pytest.raises(MissingActivationStatsError) as info:
        ctx.require_stats("model.layers.0.self_attn.k_proj")
    assert info.value.layer == "model.layers.0.self_attn.k_proj"
    assert "k_proj" in str(info.value) and "did you mean" in str(info.value)
    assert isinstance(info.value, KeyError) and isinstance(info.value, CalibrationError)
    with pytest.raises(KeyError):
        ctx["nope"]
    assert ctx.get("nope") is None
    assert ctx.num_samples == 7
    with pytest.raises(CalibrationError, match="already"):
        ctx.add_layer_stats("lm_head", ActivationStats(8))
    new = ActivationStats(8)
    ctx.add_layer_stats("lm_head", new, replace=True)
    assert ctx["lm_head"] is new
    with pytest.raises(InvalidArgumentError):
        ctx.add_layer_stats(3, ActivationStats(8))
    with pytest.raises(InvalidArgumentError, match="surrogate"):
        ctx.add_layer_stats("\ud800", ActivationStats(8))
    with pytest.raises(InvalidArgumentError):
        ctx.add_layer_stats("x", np.ones(3))
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(InvalidArgumentError):
            ctx.num_samples = bad
    with pytest.raises(InvalidArgumentError):
        CalibrationContext([("a", ActivationStats(3))])
    assert "3 layers" in repr(ctx)


@pytest.mark.parametrize("hessian", [False, True])
def test_save_load_round_trip_is_bit_exact(tmp_path, hessian):
    ctx = make_context(hessian)
    ctx.add_layer_stats("", ActivationStats(2).update(np.array([[1e-160, 1e150]])))  # root module
    ctx.add_layer_stats("ünïcode.名前", ActivationStats(1).update(np.array([[5e-324]])))
    ctx.add_layer_stats("a\nb\x1b[31m", ActivationStats(1))  # control characters survive
    path = tmp_path / "calib.safetensors"
    ctx.save(path)
    back = CalibrationContext.load(path)
    assert back == ctx
    assert back.layer_names == ctx.layer_names
    for name in ctx:
        assert back[name].sum_squares.tobytes() == ctx[name].sum_squares.tobytes()
        if hessian and ctx[name].has_hessian:
            assert back[name].hessian.tobytes() == ctx[name].hessian.tobytes()
    # the file is plain safetensors with the documented names, dtypes and metadata
    st = pytest.importorskip("safetensors.numpy")
    raw = st.load_file(str(path))
    assert raw["model.layers.0.self_attn.q_proj.count"].shape == ()
    assert raw["model.layers.0.self_attn.q_proj.count"].dtype == np.int64
    assert raw["lm_head.sum_squares"].dtype == np.float64
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n))["__metadata__"]
    assert meta == {"format": "aprender.calibration/2", "num_samples": "7"}
    # saving again replaces the file and leaves no temporary behind
    ctx.num_samples = 9
    ctx.save(str(path))
    assert CalibrationContext.load(path).num_samples == 9
    assert sorted(os.listdir(tmp_path)) == ["calib.safetensors"]


def test_save_refuses_folders_and_missing_parents(tmp_path):
    ctx = make_context()
    d = tmp_path / "folder"
    d.mkdir()
    with pytest.raises(UnsafePathError, match="folder"):
        ctx.save(d)
    with pytest.raises(CheckpointError):
        ctx.save(tmp_path / "missing" / "c.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["folder"]


def test_contexts_from_two_machines_add_up(tmp_path):
    x = acts((2, 600, 16), "bfloat16", seed=3)
    one = CalibrationContext({"a": ActivationStats(16).update(x)}, num_samples=2)
    m1 = CalibrationContext({"a": ActivationStats(16).update(x[:1])}, num_samples=1)
    m2 = CalibrationContext({"a": ActivationStats(16).update(x[1:]),
                             "b": ActivationStats(3).update(np.ones((1, 3)))}, num_samples=1)
    m1.save(tmp_path / "m1.safetensors")
    m2.save(tmp_path / "m2.safetensors")
    merged = CalibrationContext.load(tmp_path / "m1.safetensors").merge(
        CalibrationContext.load(tmp_path / "m2.safetensors"))
    assert merged.num_samples == 2 and merged.layer_names == ["a", "b"]
    assert merged["a"].count == 1200
    np.testing.assert_allclose(merged["a"].sum_squares, one["a"].sum_squares, rtol=1e-14)
    np.testing.assert_array_equal(wanda_scale(merged["a"]), wanda_scale(one["a"]))
    # merge is pure and copies; merge_ is in place
    assert m1["a"].count == 600 and merged["b"] is not m2["b"]
    assert m1.merge_(m2) is m1 and m1 == merged
    # a mismatch leaves the context unchanged
    other = CalibrationContext({"a": ActivationStats(5), "c": ActivationStats(2)})
    before = m1.merge(CalibrationContext())
    with pytest.raises(ShapeMismatchError, match="'a'"):
        m1.merge_(other)
    assert m1 == before
    with pytest.raises(InvalidArgumentError):
        m1.merge({"a": ActivationStats(16)})


# ----------------------------------------------------------------------------------------------
# hostile calibration files
# ----------------------------------------------------------------------------------------------

def write_raw(path, tensors, metadata=None):
    """tensors: name -> (dtype code, shape, bytes)."""
    entries, pos, blobs = {}, 0, []
    for name, (code, shape, data) in tensors.items():
        entries[name] = {"dtype": code, "shape": list(shape),
                         "data_offsets": [pos, pos + len(data)]}
        pos += len(data)
        blobs.append(data)
    meta = {"format": "aprender.calibration/1", "num_samples": "1"} if metadata is None \
        else metadata
    with open(path, "wb") as f:
        f.write(encode_header(entries, meta) + b"".join(blobs))


def f64(*v):
    return np.array(v, np.float64).tobytes()


def i64(v):
    return np.array(v, np.int64).tobytes()


GOOD = {"l.sum_squares": ("F64", [2], f64(1.0, 2.0)), "l.count": ("I64", [], i64(3))}
V2 = {"format": "aprender.calibration/2", "num_samples": "1"}

HOSTILE = [
    ("sum-squares-f32", {**GOOD, "l.sum_squares": ("F32", [2], np.ones(2, np.float32).tobytes())},
     None, "sum_squares must be F64"),
    ("sum-squares-2d", {**GOOD, "l.sum_squares": ("F64", [1, 2], f64(1.0, 2.0))}, None,
     "sum_squares must be F64 of shape"),
    ("sum-squares-empty", {**GOOD, "l.sum_squares": ("F64", [0], b"")}, None,
     "in_features >= 1"),
    ("count-missing", {"l.sum_squares": GOOD["l.sum_squares"]}, None, r"'l\.count' is missing"),
    # model-level statistics (format 2)
    ("block-stats-in-format-1", {**GOOD, "b.block_cos_sum": ("F64", [], f64(1.0)),
                                 "b.block_tokens": ("I64", [], i64(2))}, None,
     "unexpected tensor 'b.block_cos_sum'"),
    ("block-tokens-missing", {**GOOD, "b.block_cos_sum": ("F64", [], f64(1.0))}, V2,
     r"block 'b': tensor 'b\.block_tokens' is missing"),
    ("block-cos-f32", {**GOOD, "b.block_cos_sum": ("F32", [], np.float32(1).tobytes()),
                       "b.block_tokens": ("I64", [], i64(2))}, V2, "must be a F64 scalar"),
    ("block-cos-vector", {**GOOD, "b.block_cos_sum": ("F64", [1], f64(1.0)),
                          "b.block_tokens": ("I64", [], i64(2))}, V2, "must be a F64 scalar"),
    ("block-cos-beyond-tokens", {**GOOD, "b.block_cos_sum": ("F64", [], f64(3.0)),
                                 "b.block_tokens": ("I64", [], i64(2))}, V2,
     r"outside \[-tokens, tokens\]"),
    ("block-cos-nan", {**GOOD, "b.block_cos_sum": ("F64", [], f64(np.nan)),
                       "b.block_tokens": ("I64", [], i64(2))}, V2, "not finite"),
    ("block-tokens-negative", {**GOOD, "b.block_cos_sum": ("F64", [], f64(0.0)),
                               "b.block_tokens": ("I64", [], i64(-1))}, V2,
     r"in \[0, 2\*\*63\)"),
    ("expert-reap-negative", {**GOOD, "e.expert_reap_sum": ("F64", [], f64(-1.0)),
                              "e.expert_tokens": ("I64", [], i64(2))}, V2, "negative"),
    ("expert-reap-without-tokens", {**GOOD, "e.expert_reap_sum": ("F64", [], f64(1.0)),
                                    "e.expert_tokens": ("I64", [], i64(0))}, V2,
     "no token was routed"),
    ("expert-inf", {**GOOD, "e.expert_reap_sum": ("F64", [], f64(np.inf)),
                    "e.expert_tokens": ("I64", [], i64(1))}, V2, "not finite"),
    ("sum-missing", {"l.count": GOOD["l.count"]}, None, r"'l\.sum_squares' is missing"),
    ("count-negative", {**GOOD, "l.count": ("I64", [], i64(-1))}, None, "count must be in"),
    ("count-f64", {**GOOD, "l.count": ("F64", [], f64(3.0))}, None, "count must be an I64"),
    ("count-shape", {**GOOD, "l.count": ("I64", [1], i64([3]))}, None, "count must be an I64"),
    ("count-zero-with-sums", {**GOOD, "l.count": ("I64", [], i64(0))}, None, "count is 0"),
    ("nan", {**GOOD, "l.sum_squares": ("F64", [2], f64(1.0, np.nan))}, None, "NaN"),
    ("inf", {**GOOD, "l.sum_squares": ("F64", [2], f64(np.inf, 1.0))}, None, "NaN or infinity"),
    ("negative-sum", {**GOOD, "l.sum_squares": ("F64", [2], f64(-1.0, 1.0))}, None, "negative"),
    ("hessian-size", {**GOOD, "l.hessian": ("F64", [3, 3], f64(*np.eye(3).ravel()))}, None,
     r"hessian must be F32 or F64 of shape \[2, 2\]"),
    ("hessian-not-square", {**GOOD, "l.hessian": ("F64", [2, 1], f64(1.0, 1.0))}, None,
     "hessian must be"),
    ("hessian-int", {**GOOD, "l.hessian": ("I64", [2, 2], i64([1, 0, 0, 1]))}, None,
     "hessian must be F32 or F64"),
    ("hessian-nan", {**GOOD, "l.hessian": ("F64", [2, 2], f64(1.0, np.nan, 0.0, 1.0))}, None,
     "NaN"),
    ("unknown-tensor", {**GOOD, "l.weight": ("F64", [2], f64(1.0, 2.0))}, None,
     "unexpected tensor 'l.weight'"),
    ("no-dot", {**GOOD, "count": ("I64", [], i64(1))}, None, "unexpected tensor 'count'"),
    ("no-metadata", GOOD, {}, "not an aprender calibration file"),
    ("other-format", GOOD, {"format": "pt"}, "not an aprender calibration file"),
    ("newer-format", GOOD, {"format": "aprender.calibration/3", "num_samples": "1"},
     "not supported"),
    ("num-samples-missing", GOOD, {"format": "aprender.calibration/1"}, "num_samples"),
    ("num-samples-negative", GOOD, {"format": "aprender.calibration/1", "num_samples": "-1"},
     "num_samples"),
    ("num-samples-huge", GOOD, {"format": "aprender.calibration/1",
                                "num_samples": "99999999999999999999"}, "num_samples"),
    ("num-samples-text", GOOD, {"format": "aprender.calibration/1", "num_samples": "1e3"},
     "num_samples"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_files(tmp_path, case):
    _, tensors, meta, msg = case
    path = tmp_path / "c.safetensors"
    write_raw(path, tensors, meta)
    with pytest.raises(CalibrationFileError, match=msg) as info:
        CalibrationContext.load(path)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, CalibrationError)
    assert str(path) in str(info.value)


def test_structurally_broken_files(tmp_path):
    path = tmp_path / "c.safetensors"
    write_raw(path, GOOD)
    data = path.read_bytes()
    path.write_bytes(data[:-4])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        CalibrationContext.load(path)
    path.write_bytes(b"{}")
    with pytest.raises(CheckpointError):
        CalibrationContext.load(path)
    with pytest.raises(CheckpointError, match="no such file"):
        CalibrationContext.load(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="folder"):
        CalibrationContext.load(tmp_path)
    write_raw(path, GOOD)
    ctx = CalibrationContext.load(path)
    assert ctx["l"].count == 3 and list(ctx["l"].sum_squares) == [1.0, 2.0]
    h32 = {**GOOD, "l.hessian": ("F32", [2, 2], np.eye(2, dtype=np.float32).tobytes())}
    write_raw(path, h32)
    assert CalibrationContext.load(path)["l"].hessian.dtype == np.float64


def test_fuzzed_files_raise_only_checkpoint_errors(tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    src = tmp_path / "good.safetensors"
    make_context(hessian=True).save(src)
    good = src.read_bytes()
    path = tmp_path / "fuzz.safetensors"

    @settings(max_examples=200, deadline=None, database=None)
    @given(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), max_size=6),
           st.integers(0, len(good)))
    def check(flips, cut):
        data = bytearray(good)
        for pos, val in flips:
            data[pos] = val
        path.write_bytes(bytes(data[:cut]) if cut < 40 else bytes(data))
        try:
            ctx = CalibrationContext.load(path)
        except CheckpointError:
            return
        for name in ctx:  # what loads is valid statistics
            s = ctx[name]
            assert np.isfinite(s.sum_squares).all() and (s.sum_squares >= 0).all()
            assert s.count >= 0

    del hypothesis
    check()


# ----------------------------------------------------------------------------------------------
# model-level statistics (format 2): block influence and REAP expert saliency
# ----------------------------------------------------------------------------------------------

def test_block_and_expert_stats_accumulate_save_and_load(tmp_path):
    from aprender.pruning import BlockStats, ExpertStats

    ctx = make_context(hessian=True)
    ctx.add_block_stats("model.layers.0", 3.5, 4)
    ctx.add_block_stats("model.layers.0", 0.5, 2)  # a second batch adds to the first
    ctx.add_block_stats("model.layers.1", -1.0, 2)
    ctx.add_expert_stats("model.layers.0.mlp.experts.1", 3, 6.0)
    ctx.add_expert_stats("model.layers.0.mlp.experts.0", 0, 0.0)
    assert ctx.block_stats["model.layers.0"] == BlockStats(4.0, 6)
    assert ctx.block_stats["model.layers.0"].influence == pytest.approx(1 - 4.0 / 6)
    assert ctx.block_stats["model.layers.1"].influence == 1.5
    assert ctx.expert_stats["model.layers.0.mlp.experts.1"].reap == 2.0
    assert ctx.expert_stats["model.layers.0.mlp.experts.0"].reap == 0.0
    assert list(ctx.expert_stats) == ["model.layers.0.mlp.experts.1",
                                      "model.layers.0.mlp.experts.0"]
    path = tmp_path / "c.safetensors"
    ctx.save(path)
    back = CalibrationContext.load(path)
    assert back == ctx
    assert back.block_stats == ctx.block_stats and back.expert_stats == ctx.expert_stats
    assert isinstance(back.expert_stats["model.layers.0.mlp.experts.1"], ExpertStats)
    # the returned mappings are copies: changing them changes nothing held
    back.block_stats.clear()
    assert back == ctx
    # merging adds both kinds
    both = ctx.merge(back)
    assert both.block_stats["model.layers.0"] == BlockStats(8.0, 12)
    assert both.expert_stats["model.layers.0.mlp.experts.1"] == ExpertStats(6, 12.0)
    assert ctx.block_stats["model.layers.0"] == BlockStats(4.0, 6)  # merge left ctx alone


def test_format_1_files_still_read(tmp_path):
    path = tmp_path / "old.safetensors"
    write_raw(path, GOOD, {"format": "aprender.calibration/1", "num_samples": "1"})
    ctx = CalibrationContext.load(path)
    assert ctx["l"].count == 3 and ctx.block_stats == {} and ctx.expert_stats == {}


@pytest.mark.parametrize("bad,msg", [
    (dict(cos_sum=5.0, tokens=2), r"outside \[-tokens, tokens\]"),
    (dict(cos_sum=float("nan"), tokens=2), "not finite"),
    (dict(cos_sum=1.0, tokens=-1), "token count"),
    (dict(cos_sum=1.0, tokens=1.5), "must be an integer"),
    (dict(cos_sum="1", tokens=2), "must be a real number"),
])
def test_block_stats_bad_values(bad, msg):
    ctx = CalibrationContext()
    with pytest.raises(CalibrationError, match=msg):
        ctx.add_block_stats("b", **bad)
    assert ctx.block_stats == {}
    with pytest.raises(InvalidArgumentError):
        ctx.add_block_stats(3, 1.0, 2)


def test_expert_stats_bad_values():
    ctx = CalibrationContext()
    with pytest.raises(CalibrationError, match="negative"):
        ctx.add_expert_stats("e", 2, -0.5)
    with pytest.raises(CalibrationError, match="no token was routed"):
        ctx.add_expert_stats("e", 0, 0.5)
    ctx.add_expert_stats("e", 1, 0.5)
    with pytest.raises(CalibrationError, match="2\\*\\*63"):
        ctx.add_expert_stats("e", 2 ** 63 - 1, 0.5)
    assert ctx.expert_stats["e"].tokens == 1  # a failed add changes nothing


@pytest.mark.parametrize("content,looks", [(b"hello, calibration text\n", "text"),
                                           (b'{"format": "aprender.calibration/2"}', "JSON")])
def test_a_text_or_json_file_is_named_for_what_it_is(tmp_path, content, looks):
    path = tmp_path / "calib.txt"
    path.write_bytes(content)
    with pytest.raises(CalibrationFileError) as info:
        CalibrationContext.load(path)
    msg = str(info.value)
    assert f"not a safetensors file (it looks like {looks})" in msg
    assert "header length" not in msg and "'aprender calibrate' writes" in msg
