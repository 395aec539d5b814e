"""2:4 compressed layouts: PyTorch CUTLASS oracle, numpy references, round trips, errors, CUDA."""
import os
import shutil
import subprocess

import numpy as np
import pytest

from aprender import Bits16, magnitude_nm_mask, sparse24
from aprender._reference import (sparse24_pair_select as _pair_select_ref,
                                 sparse24_pair_stored as _pair_stored_ref,
                                 sparse24_select as _select_ref, sparse24_stored as _stored_ref)
from aprender.pruning import SparsityMask, SparsityPattern
from aprender.errors import (InvalidArgumentError, InvalidDTypeError, InvalidShapeError,
                                     LayoutError, NumericalInstabilityError, ShapeMismatchError)

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _weight(rng, shape, dtype, kind="random"):
    if kind == "ties":
        w = rng.choice(np.array([-2.0, -1.0, 0.0, 1.0, 2.0]), size=shape)
    elif kind == "sparse":
        w = rng.standard_normal(shape) * (rng.random(shape) < 0.25)
    else:
        w = rng.standard_normal(shape) * 3
    if np.dtype(dtype) == np.int8:
        return np.clip(np.round(w * 20), -128, 127).astype(np.int8)
    return (w + 0.0).astype(np.float32).astype(dtype)  # no -0.0 (see the negative-zero test)


def _as_f32(w):
    return w.astype(np.float32)


def _bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


# --- the PyTorch CUTLASS oracle -----------------------------------------------------------------

CUTLASS_CASES = [
    ("float16", (32, 32)), ("float16", (64, 96)), ("float16", (96, 256)),
    ("bfloat16", (32, 64)), ("bfloat16", (128, 160)),
    ("int8", (16, 64)), ("int8", (48, 128)), ("int8", (32, 192)),
]


def _torch_of(a, name):
    torch = pytest.importorskip("torch")
    if name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _np_of(t):
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return _bits(t.numpy())


@pytest.mark.oracle
@pytest.mark.parametrize("name,shape", CUTLASS_CASES)
@pytest.mark.parametrize("kind", ["random", "ties", "sparse"])
def test_cutlass_matches_torch(name, shape, kind):
    pytest.importorskip("torch")
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass as from_dense,
        sparse_semi_structured_to_dense_cutlass as to_dense)

    dtype = BF16 if name == "bfloat16" else np.dtype(name)
    rng = np.random.default_rng(hash((name, shape, kind)) % 2**32)
    w = _weight(rng, shape, dtype, kind)
    dense = _select_ref(w)
    tv, tm = from_dense(_torch_of(dense, name))
    for s in (sparse24.compress(dense), sparse24.compress(w, select=True),
              sparse24.compress(w, mask=magnitude_nm_mask(_as_f32(w), 2, 4))):
        assert s.values.dtype == dtype
        assert s.metadata.dtype == (np.int32 if name == "int8" else np.int16)
        np.testing.assert_array_equal(_bits(s.values), _np_of(tv))
        np.testing.assert_array_equal(s.metadata, tm.numpy())
        np.testing.assert_array_equal(_bits(s.to_dense()), _bits(dense))
    # torch decompresses our bytes into the same dense weight
    back = to_dense(_torch_of(s.values, name), __import__("torch").from_numpy(s.metadata))
    np.testing.assert_array_equal(_np_of(back), _bits(dense))


@pytest.mark.oracle
def test_cutlass_matches_torch_every_group_pattern():
    """All 11 flag patterns with at most two non-zeros, in every metadata position."""
    pytest.importorskip("torch")
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass as from_dense)

    pats = [p for p in range(16) if bin(p).count("1") <= 2]
    rng = np.random.default_rng(7)
    groups = rng.choice(pats, size=(64, 16))
    flags = ((groups[..., None] >> np.arange(4)) & 1).reshape(64, 64).astype(bool)
    w = (rng.random((64, 64)) + 0.5).astype(np.float16) * flags
    tv, tm = from_dense(_torch_of(w, "float16"))
    s = sparse24.compress(w)
    np.testing.assert_array_equal(_bits(s.values), _np_of(tv))
    np.testing.assert_array_equal(s.metadata, tm.numpy())


# --- bitmask and raw layouts vs slow references ---------------------------------------------------

@pytest.mark.parametrize("name", ["float16", "bfloat16", "int8", "float32"])
@pytest.mark.parametrize("shape", [(8, 16), (5, 12), (3, 4, 24), (20,)])
@pytest.mark.parametrize("kind", ["random", "ties", "sparse"])
def test_bitmask_and_raw_vs_reference(name, shape, kind):
    dtype = BF16 if name == "bfloat16" else np.dtype(name)
    rng = np.random.default_rng(abs(hash((name, shape, kind))) % 2**32)
    dense = _select_ref(_weight(rng, shape, dtype, kind))
    d2 = dense.reshape(-1, shape[-1])
    stored = _stored_ref(d2)
    s = sparse24.compress(dense, layout="bitmask")
    np.testing.assert_array_equal(s.bitmask, np.packbits(stored, axis=-1, bitorder="little"))
    np.testing.assert_array_equal(_bits(s.values),
                                  _bits(d2[stored].reshape(d2.shape[0], -1)))
    assert s.values.dtype == dtype and s.dtype == name
    np.testing.assert_array_equal(_bits(s.to_dense()), _bits(dense))
    r = sparse24.compress(dense, layout="raw")
    np.testing.assert_array_equal(_bits(r.values), _bits(s.values))
    # raw codes: idx0 | idx1 << 2 per group, two groups per byte, low nibble first
    idx = np.flatnonzero(stored.reshape(-1)).reshape(-1, 2) % 4
    codes = (idx[:, 0] | (idx[:, 1] << 2)).reshape(d2.shape[0], -1)
    if codes.shape[1] % 2:
        codes = np.concatenate([codes, np.zeros((codes.shape[0], 1), codes.dtype)], axis=1)
    np.testing.assert_array_equal(r.metadata, (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8))
    np.testing.assert_array_equal(_bits(r.to_dense()), _bits(dense))


@pytest.mark.parametrize("layout", sparse24.LAYOUTS)
def test_select_equals_magnitude_nm_mask_and_thread_independence(layout):
    rng = np.random.default_rng(3)
    w = _weight(rng, (256, 512), np.float16, "ties")
    dense = _select_ref(w)
    a = sparse24.compress(w, layout=layout, select=True, n_threads=1)
    b = sparse24.compress(w, layout=layout, select=True, n_threads=2)
    c = sparse24.compress(dense, layout=layout, n_threads=2)
    for t in (b, c):
        np.testing.assert_array_equal(_bits(a.values), _bits(t.values))
        extra = "bitmask" if layout == "bitmask" else "metadata"
        np.testing.assert_array_equal(getattr(a, extra), getattr(t, extra))
    np.testing.assert_array_equal(_bits(a.to_dense(n_threads=2)), _bits(dense))


def test_bitmask_tensors_round_trip():
    rng = np.random.default_rng(5)
    w = _weight(rng, (16, 40), BF16)
    s = sparse24.compress(w, layout="bitmask", select=True)
    t = s.to_tensors("model.layers.0.mlp.up_proj.weight")
    assert set(t) == {"model.layers.0.mlp.up_proj.shape", "model.layers.0.mlp.up_proj.compressed",
                      "model.layers.0.mlp.up_proj.bitmask"}
    shp = t["model.layers.0.mlp.up_proj.shape"]
    assert shp.dtype == np.int64 and shp.shape == (2, 1) and shp.ravel().tolist() == [16, 40]
    assert t["model.layers.0.mlp.up_proj.compressed"].shape == (16, 20)
    assert t["model.layers.0.mlp.up_proj.bitmask"].shape == (16, 5)
    back = sparse24.Sparse24Tensor.from_tensors(t, "model.layers.0.mlp.up_proj")
    np.testing.assert_array_equal(_bits(back.to_dense()), _bits(s.to_dense()))
    assert back.dtype == "bfloat16"
    # safetensors round trip (raw bf16 bits through Bits16)
    st = pytest.importorskip("safetensors.numpy")
    raw = {k: (v.view(np.uint16) if v.dtype == BF16 else v) for k, v in t.items()}
    loaded = st.load(st.save(raw))
    back2 = sparse24.Sparse24Tensor.from_tensors(loaded, "model.layers.0.mlp.up_proj")
    d = back2.to_dense()
    assert isinstance(d, Bits16)
    np.testing.assert_array_equal(d.bits, _bits(s.to_dense()))


@pytest.mark.parametrize("layout", sparse24.LAYOUTS)
def test_inputs_bits16_torch_noncontiguous_and_padding(layout):
    rng = np.random.default_rng(11)
    w = _select_ref(_weight(rng, (40, 72), BF16))
    ref = sparse24.compress(w, layout=layout, pad=True)
    assert ref.shape == (40, 72) and ref.is_padded == (layout == "cutlass")
    np.testing.assert_array_equal(_bits(ref.to_dense()), _bits(w))
    b = sparse24.compress(Bits16(w.view(np.uint16)), layout=layout, pad=True)
    assert isinstance(b.to_dense(), Bits16)
    np.testing.assert_array_equal(b.to_dense().bits, _bits(w))
    np.testing.assert_array_equal(b.values, _bits(ref.values))
    f = np.asfortranarray(w)
    np.testing.assert_array_equal(_bits(sparse24.compress(f, layout=layout, pad=True).values),
                                  _bits(ref.values))
    torch = pytest.importorskip("torch")
    tw = torch.from_numpy(w.view(np.int16).copy()).view(torch.bfloat16)
    np.testing.assert_array_equal(_bits(sparse24.compress(tw, layout=layout, pad=True).values),
                                  _bits(ref.values))


def test_int8_padding_and_negative_zero():
    rng = np.random.default_rng(2)
    w4 = _select_ref(_weight(rng, (20, 68), np.int8))
    with pytest.raises(InvalidShapeError, match="multiple of 16"):
        sparse24.compress(w4)
    s = sparse24.compress(w4, pad=True)
    assert s.padded_shape == (32, 128)
    np.testing.assert_array_equal(s.to_dense(), w4)
    # -0.0 at a stored position survives; elsewhere it comes back as +0.0 (documented)
    z = np.array([[-0.0, 1.0, -0.0, 0.0]], dtype=np.float16)
    d = sparse24.compress(z, layout="raw").to_dense()
    assert _bits(d).tolist() == [[0, _bits(z)[0, 1], 0x8000, 0]]


# --- errors ---------------------------------------------------------------------------------------

def test_errors():
    w = np.zeros((32, 32), np.float16)
    w[5, 8:11] = 1  # row 5, group 2: three non-zeros
    with pytest.raises(LayoutError, match=r"row 5 group 2 \(columns 8..11\) has 3 non-zeros"):
        sparse24.compress(w)
    for layout in ("bitmask", "raw"):
        with pytest.raises(LayoutError, match="row 5 group 2"):
            sparse24.compress(w, layout=layout)
    keep = np.zeros(w.shape, bool)
    keep[5, 8:11] = True
    with pytest.raises(LayoutError, match="mask keeps more than two"):
        sparse24.compress(w, mask=keep)
    with pytest.raises(ShapeMismatchError):
        sparse24.compress(w, mask=np.ones((32, 16), bool))
    with pytest.raises(InvalidArgumentError):
        sparse24.compress(w, mask=keep, select=True)
    with pytest.raises(InvalidArgumentError, match="layout"):
        sparse24.compress(w, layout="csr")
    with pytest.raises(InvalidShapeError, match="multiple of 32"):
        sparse24.compress(np.zeros((16, 32), np.float16))
    with pytest.raises(InvalidShapeError, match="multiple of 64"):
        sparse24.compress(np.zeros((16, 32), np.int8))
    with pytest.raises(InvalidShapeError, match="2-D"):
        sparse24.compress(np.zeros((2, 32, 32), np.float16))
    with pytest.raises(InvalidShapeError, match="multiple of 4"):
        sparse24.compress(np.zeros((3, 6), np.float16), layout="bitmask")
    with pytest.raises(InvalidShapeError):
        sparse24.compress(np.zeros((), np.float16), layout="raw")
    with pytest.raises(InvalidShapeError, match="empty"):
        sparse24.compress(np.zeros((0, 8), np.float16), layout="raw")
    with pytest.raises(InvalidDTypeError, match="float64"):
        sparse24.compress(np.zeros((32, 32)))
    with pytest.raises(InvalidDTypeError, match="Bits16"):
        sparse24.compress(np.zeros((32, 32), np.uint16))
    with pytest.raises(LayoutError, match="row 0 pair 1 .columns 2..3. has 2 non-zeros"):
        sparse24.compress(np.ones((32, 32), np.float32) * (np.arange(32) % 4 != 0))
    with pytest.raises(LayoutError, match="pair 0 .* the mask keeps both"):
        sparse24.compress(np.ones((32, 32), np.float32), mask=np.ones((32, 32), bool))
    with pytest.raises(InvalidShapeError, match="float32 needs rows a multiple of 32 and columns "
                                                "a multiple of 16"):
        sparse24.compress(np.zeros((32, 24), np.float32))
    n = np.ones((32, 32), np.float16)
    n[3, 5] = np.nan
    with pytest.raises(NumericalInstabilityError, match="row 3 group 1"):
        sparse24.compress(n, select=True)
    assert issubclass(LayoutError, ValueError) and issubclass(InvalidDTypeError, TypeError)


def test_from_tensors_errors():
    s = sparse24.compress(np.zeros((4, 16), np.float16), layout="bitmask")
    t = s.to_tensors("p")
    with pytest.raises(LayoutError, match="missing"):
        sparse24.Sparse24Tensor.from_tensors({"p.shape": t["p.shape"]}, "p")
    bad = dict(t)
    bad["p.bitmask"] = t["p.bitmask"].copy()
    bad["p.bitmask"][2, 1] = 0b00010111  # low group has three bits
    with pytest.raises(LayoutError, match="row 2 group 2"):
        sparse24.Sparse24Tensor.from_tensors(bad, "p").to_dense()
    bad["p.bitmask"] = t["p.bitmask"][:, :1]
    with pytest.raises(InvalidShapeError):
        sparse24.Sparse24Tensor.from_tensors(bad, "p")
    with pytest.raises(LayoutError, match="bitmask layout"):
        sparse24.compress(np.zeros((32, 32), np.float16)).to_tensors("p")


def test_sparsity_mask_input():
    rng = np.random.default_rng(1)
    w = _weight(rng, (32, 64), np.float16)
    m = magnitude_nm_mask(w, 2, 4)
    assert isinstance(m, SparsityMask) and m.pattern == SparsityPattern.nm(2, 4)
    a = sparse24.compress(w, mask=m, layout="raw")
    b = sparse24.compress(w, select=True, layout="raw")
    np.testing.assert_array_equal(a.metadata, b.metadata)
    np.testing.assert_array_equal(_bits(a.values), _bits(b.values))


def test_hypothesis_round_trip():
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hyp.settings(max_examples=60, deadline=None)
    @hyp.given(rows=st.integers(1, 9), groups=st.integers(1, 9), seed=st.integers(0, 2**31),
               layout=st.sampled_from(["bitmask", "raw"]),
               name=st.sampled_from(["float16", "bfloat16", "int8", "float32"]))
    def check(rows, groups, seed, layout, name):
        dtype = BF16 if name == "bfloat16" else np.dtype(name)
        w = _weight(np.random.default_rng(seed), (rows, 4 * groups), dtype, "ties")
        s = sparse24.compress(w, layout=layout, select=True)
        np.testing.assert_array_equal(_bits(s.to_dense()), _bits(_select_ref(w)))

    check()


@pytest.mark.parametrize("layout, swapped", [(layout, swapped) for layout in sparse24.LAYOUTS
                                              for swapped in (">f2", ">f4")
                                              if (layout, swapped) != ("cutlass", ">f4")])
def test_byte_swapped_input_matches_native(layout, swapped):
    """Big-endian (byte-swapped) float16/float32, which every other entry point accepts, is
    converted to native order once: same bytes as the native weight, values in native order.
    (float32 cutlass is the 1:2 pair layout, whose 2:4 inputs are refused; see its own tests.)"""
    native = np.dtype(swapped).newbyteorder("=")
    rng = np.random.default_rng(4)
    w = _weight(rng, (64, 64), native, "ties")
    ws = w.astype(swapped)
    assert not ws.dtype.isnative and np.array_equal(ws, w)
    mask = magnitude_nm_mask(_as_f32(w), 2, 4)
    for kw in ({"select": True}, {"mask": mask}, {}):
        dense = w if kw else _select_ref(w)
        a = sparse24.compress(dense.astype(swapped), layout=layout, **kw)
        b = sparse24.compress(dense, layout=layout, **kw)
        assert a.values.dtype == native and a.values.dtype.isnative
        np.testing.assert_array_equal(_bits(a.values), _bits(b.values))
        extra = "bitmask" if layout == "bitmask" else "metadata"
        np.testing.assert_array_equal(getattr(a, extra), getattr(b, extra))
        np.testing.assert_array_equal(_bits(a.to_dense()), _bits(b.to_dense()))


def test_constructor_takes_the_parts_compress_makes_and_defaults_the_padding():
    rng = np.random.default_rng(6)
    w = _select_ref(_weight(rng, (3, 5, 20), np.float16))
    for layout in ("bitmask", "raw"):
        s = sparse24.compress(w, layout=layout, pad=True)
        again = sparse24.Sparse24Tensor(s.layout, s.shape, s.dtype, s.values, metadata=s.metadata,
                                        bitmask=s.bitmask)  # padded_shape from the layout
        assert again.padded_shape == s.padded_shape == (15, 20)
        np.testing.assert_array_equal(_bits(again.to_dense()), _bits(w))
    raw = Bits16(np.zeros((64, 32), np.uint16), "bfloat16")
    t = sparse24.Sparse24Tensor("cutlass", (64, 64), "bfloat16", raw,
                                metadata=np.full((64, 4), 0x4444, np.int16))
    assert isinstance(t.to_dense(), Bits16)
    with pytest.raises(InvalidDTypeError, match="float16 bits, dtype says 'bfloat16'"):
        sparse24.Sparse24Tensor("raw", (4, 8), "bfloat16", Bits16(np.zeros((4, 4), np.uint16),
                                                                  "float16"),
                                metadata=np.zeros((4, 1), np.uint8))


def _imports(path):
    """(module-level imports, imports inside functions) of a Python file, as dotted names."""
    import ast

    tree = ast.parse(open(path).read())
    top, inner = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [("." * node.level) + (node.module or "") + ":" + a.name for a in node.names]
            (top if node in tree.body else inner).update(names)
    return top, inner


def test_cpu_and_gpu_paths_share_the_plan_module_and_never_import_each_other():
    cuda_top, cuda_inner = _imports(os.path.join(ROOT, "aprender", "cuda", "__init__.py"))
    s24_top, s24_inner = _imports(os.path.join(ROOT, "aprender", "sparse24.py"))
    plan_top, plan_inner = _imports(os.path.join(ROOT, "aprender", "_sparse24_plan.py"))
    assert not any("sparse24" in n and "_sparse24_plan" not in n for n in cuda_top | cuda_inner)
    assert "..:_sparse24_plan" in cuda_top and ".:_sparse24_plan" in s24_top
    assert not any("cuda" in n for n in s24_top)  # only imported when a CuPy array arrives
    assert any("cuda" in n for n in s24_inner)
    assert not any("sparse24:" in n or "cuda" in n for n in plan_top | plan_inner)


def test_cuda_package_imports_without_the_cpu_2to4_module(tmp_path):
    """With a stand-in CuPy, importing aprender.cuda loads the plan module, not sparse24.py."""
    stub = tmp_path / "cupy"
    stub.mkdir()
    (stub / "__init__.py").write_text("class ndarray:\n    pass\n")
    code = ("import sys, aprender.cuda\n"
            "assert 'aprender._sparse24_plan' in sys.modules\n"
            "assert 'aprender.sparse24' not in sys.modules, 'cuda imported sparse24'\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    import sys

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


# --- CUDA -----------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_source_compiles(tmp_path):
    src = os.path.join(ROOT, "aprender", "cuda", "sparse24.cu")
    inc = os.path.join(ROOT, "aprender", "_kernels")
    # nvcc is not ours: keep a sanitizer preload (the ASan test run) out of its process
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    res = subprocess.run(["nvcc", "-arch=sm_80", "-I", inc, "-c", src, "-o",
                          str(tmp_path / "sparse24.o")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr


def _cupy_device():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as exc:  # noqa: BLE001 - no driver, no device
        pytest.skip(f"no CUDA device ({exc})")
    return cp


@pytest.mark.gpu
@pytest.mark.parametrize("layout", sparse24.LAYOUTS)
@pytest.mark.parametrize("name", ["float16", "int8"])
def test_gpu_matches_cpu(layout, name):
    cp = _cupy_device()
    rng = np.random.default_rng(9)
    w = _weight(rng, (64, 128), np.dtype(name), "ties")
    cpu = sparse24.compress(w, layout=layout, select=True)
    gpu = sparse24.compress(cp.asarray(w), layout=layout, select=True)
    np.testing.assert_array_equal(_bits(cp.asnumpy(gpu.values)), _bits(cpu.values))
    extra = "bitmask" if layout == "bitmask" else "metadata"
    np.testing.assert_array_equal(cp.asnumpy(getattr(gpu, extra)), getattr(cpu, extra))
    np.testing.assert_array_equal(_bits(cp.asnumpy(gpu.to_dense())), _bits(cpu.to_dense()))
    bad = np.zeros((32, 32), np.float16)
    bad[1, 4:7] = 1
    with pytest.raises(LayoutError, match="row 1 group 1"):
        sparse24.compress(cp.asarray(bad), layout=layout)


def test_cuda_import_error_names_extra():
    import importlib.util
    import sys

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed")
    sys.modules.pop("aprender.cuda", None)
    with pytest.raises(ImportError, match=r"pip install aprender\[cuda\]"):
        import aprender.cuda  # noqa: F401


def test_non_cpu_torch_tensors_are_refused_not_copied():
    torch = pytest.importorskip("torch")
    from aprender.errors import DeviceError

    w = torch.empty((8, 16), dtype=torch.float16, device="meta")
    with pytest.raises(DeviceError, match="meta"):
        sparse24.compress(w, select=True)


# --- the SIMD group encoder against the scalar one and the references ---------------------------

def _all_parts(dense, **kw):
    out = []
    for layout in ("cutlass", "bitmask", "raw"):
        try:
            s = sparse24.compress(dense, layout=layout, pad=True, **kw)
            out.append([None if a is None else np.ascontiguousarray(a).tobytes()
                        for a in (s.values, s.metadata, s.bitmask)])
        except (LayoutError, NumericalInstabilityError, InvalidShapeError) as exc:
            out.append(str(exc))
    return out


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(64, 64), (32, 136), (40, 1024), (3, 4, 200)])
@pytest.mark.parametrize("kind", ["random", "ties", "sparse"])
def test_simd_encoder_equals_scalar_and_reference(name, shape, kind):
    # rows of 16 and more groups go through the SIMD encoder (16 groups a step, scalar tail)
    from aprender._kernels import sparse24 as k

    dtype = BF16 if name == "bfloat16" else np.dtype(name)
    rng = np.random.default_rng(abs(hash((name, shape, kind))) % 2**32)
    w = _weight(rng, shape, dtype, kind)
    dense = _select_ref(w)
    d2 = dense.reshape(-1, shape[-1])
    stored = _stored_ref(d2)
    keep = rng.random(shape) < 0.5
    bad = dense.copy()
    bad.reshape(-1, shape[-1])[1, 4 * 21:4 * 21 + 4] = 1  # a group with four non-zeros: row 1, group 21
    cases = [dict(), dict(mask=keep), dict(mask=np.ones(shape, bool)), dict(select=True)]
    fast = [_all_parts(d, **kw) for d in (dense, bad) for kw in cases]
    was = k.simd(False)
    try:
        slow = [_all_parts(d, **kw) for d in (dense, bad) for kw in cases]
    finally:
        k.simd(was)
    assert fast == slow
    s = sparse24.compress(dense, layout="bitmask", n_threads=2)
    np.testing.assert_array_equal(s.bitmask, np.packbits(stored, axis=-1, bitorder="little"))
    np.testing.assert_array_equal(_bits(s.values), _bits(d2[stored].reshape(d2.shape[0], -1)))
    if shape[-1] > 84:
        with pytest.raises(LayoutError, match="row 1.*group 21"):
            sparse24.compress(bad, layout="bitmask")


# --- float32 in the cutlass layout: PyTorch's 1:2 pairs ------------------------------------------

@pytest.mark.oracle
@pytest.mark.parametrize("shape", [(32, 16), (64, 48), (96, 208), (32, 1024)])
@pytest.mark.parametrize("kind", ["random", "ties", "sparse"])
def test_cutlass_float32_pairs_match_torch(shape, kind):
    """float32 cutlass equals PyTorch's CPU sparse_semi_structured_from_dense_cutlass bit for bit
    (to_sparse_semi_structured itself refuses CPU tensors), for a 1:2 weight, select=True and a
    mask, at 1 and 2 threads; our decompression inverts it."""
    pytest.importorskip("torch")
    import torch
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass as from_dense)

    rng = np.random.default_rng(abs(hash((shape, kind))) % 2**32)
    w = _weight(rng, shape, np.float32, kind)
    if kind == "sparse":
        w[rng.random(shape) < 0.2] = -0.0  # negative zeros count as zero, stored as they are
    dense = _pair_select_ref(w)
    keep = np.zeros(shape, bool)
    keep.reshape(shape[0], -1, 2)[np.arange(shape[0])[:, None], np.arange(shape[1] // 2),
                                  rng.integers(0, 2, (shape[0], shape[1] // 2))] = True
    keep &= rng.random(shape) < 0.8  # some pairs keep neither
    masked = np.where(keep, w, np.float32(0))
    for src, kw, ref in ((dense, {}, dense), (w, {"select": True}, dense),
                         (w, {"mask": keep}, masked)):
        tv, tm = from_dense(torch.from_numpy(ref.copy()))
        for nt in (1, 2):
            s = sparse24.compress(src, n_threads=nt, **kw)
            assert s.values.dtype == np.float32 and s.metadata.dtype == np.int16
            assert s.metadata.shape == (shape[0], shape[1] // 8)
            np.testing.assert_array_equal(_bits(s.values), _bits(tv.numpy()))
            np.testing.assert_array_equal(s.metadata, tm.numpy())
        stored = _pair_stored_ref(ref)
        np.testing.assert_array_equal(_bits(s.values), _bits(ref[stored].reshape(shape[0], -1)))
        back = s.to_dense()
        np.testing.assert_array_equal(back, ref)  # -0.0 at a position not stored comes back +0.0
        np.testing.assert_array_equal(_bits(back)[stored], _bits(ref)[stored])


def test_cutlass_float32_pairs_padding_round_trip_and_parts():
    rng = np.random.default_rng(11)
    w = rng.standard_normal((40, 20)).astype(np.float32)
    s = sparse24.compress(w, select=True, pad=True)
    assert s.padded_shape == (64, 32) and s.metadata.shape == (64, 4)
    np.testing.assert_array_equal(s.to_dense(), _pair_select_ref(w))
    again = sparse24.Sparse24Tensor("cutlass", s.shape, "float32", s.values, metadata=s.metadata,
                                    padded_shape=s.padded_shape)
    np.testing.assert_array_equal(again.to_dense(), s.to_dense())
    with pytest.raises(ShapeMismatchError):
        sparse24.Sparse24Tensor("cutlass", (64, 32), "float32", s.values,
                                metadata=np.zeros((64, 2), np.int16))


@pytest.mark.parametrize("layout", ["raw", "cutlass", "bitmask"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("simd", [True, False])
def test_a_mask_keeping_fewer_than_two_stores_plus_zero(layout, dtype, simd):
    """A group whose mask keeps fewer than two elements still stores two positions: the ones the
    mask drops are stored as +0.0, never as the dropped weights (or -0.0)."""
    from aprender._kernels import sparse24 as kernel

    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    w[w == 0] = 1.0
    keep = np.zeros(w.shape, bool)
    pick = rng.integers(0, 3, (64, 32))  # 0, 1 or 2 kept per group
    for r in range(64):
        for g in range(32):
            keep[r, 4 * g + rng.choice(4, pick[r, g], replace=False)] = True
    x = w.astype(np.float16) if dtype == "float16" else \
        Bits16(((w.view(np.uint32) + 0x8000) >> 16).astype(np.uint16), "bfloat16")
    before = kernel.simd()
    try:
        kernel.simd(simd)
        st = sparse24.compress(x, layout=layout, mask=keep)
    finally:
        kernel.simd(before)
    dense = st.to_dense()
    bits = dense.bits if isinstance(dense, Bits16) else dense.view(np.uint16)
    src = x.bits if isinstance(x, Bits16) else x.view(np.uint16)
    assert (bits[~keep] == 0).all()  # +0.0 exactly
    np.testing.assert_array_equal(bits[keep], src[keep])
