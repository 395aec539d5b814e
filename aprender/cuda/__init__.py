"""Optional GPU path: 2:4 compression of CuPy arrays with the CUDA kernel in ``sparse24.cu``.

It compiles (NVRTC, through ``cupy.RawModule``) the same per-group code the CPU kernel uses
(``aprender/_kernels/apr_sparse24.h``), follows the same layout rules
(``aprender/_sparse24_plan.py``, shared with the CPU path; this package does not import
``aprender.sparse24``) and writes exactly the CPU bytes.  Imported on first use by
``aprender.sparse24`` when a CuPy array arrives; it returns and takes the parts of a
``Sparse24Tensor``, which ``aprender.sparse24`` wraps.
"""
import functools
import os

try:
    import cupy as cp
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("aprender.cuda needs CuPy; install it with: pip install aprender[cuda]") from exc

import numpy as np

from .. import _sparse24_plan as _p
from ..errors import InvalidDTypeError, ShapeMismatchError

__all__ = ["compress24", "decompress24", "module"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_KERNELS = os.path.join(os.path.dirname(_HERE), "_kernels")
# kernel suffix per dtype name; "bfloat16" only for tensors built from raw uint16 bits (CuPy
# has no bfloat16 dtype, so compress24 never sees one)
_SUFFIX = {"float16": "u16", "bfloat16": "u16", "int8": "i8", "float32": "u32"}
_BITS = {"u16": np.uint16, "i8": np.int8, "u32": np.uint32}
_NAMES = {np.dtype(np.float16): "float16", np.dtype(np.int8): "int8",
          np.dtype(np.float32): "float32"}
_NO_ERROR = np.uint64(0xFFFFFFFFFFFFFFFF)
_THREADS = 256


@functools.lru_cache(maxsize=None)
def module():
    """The compiled RawModule (cached per process)."""
    with open(os.path.join(_HERE, "sparse24.cu")) as fh:
        src = fh.read()
    return cp.RawModule(code=src, options=("-I" + _KERNELS, "--std=c++14"))


def _dtype_name(dt):
    dt = np.dtype(dt)
    if dt not in _NAMES:
        raise InvalidDTypeError(f"weight: 2:4 layouts on the GPU take float16, int8 or float32 "
                                f"CuPy arrays, got dtype {dt}")
    return _NAMES[dt]


def _statuses(status):
    st = status.get().astype(np.uint64)
    out = np.where(st == _NO_ERROR, -1, st.astype(np.int64))
    return out.astype(np.int64)


def _launch(name, n, args):
    blocks = max(1, (n + _THREADS - 1) // _THREADS)
    module().get_function(name)((blocks,), (_THREADS,), args)


def compress24(weight, *, layout="cutlass", keep=None, select=False, pad=False):
    """GPU twin of the CPU compression for a CuPy array (same validation, same bytes).  keep:
    None, or a CuPy or numpy array of the weight's shape whose non-zeros are kept.  Returns the
    parts of a Sparse24Tensor as a dict (layout, shape, dtype, values, metadata, bitmask,
    padded_shape)."""
    name = _dtype_name(weight.dtype)
    shape = tuple(weight.shape)
    _p.refuse_gpu_pairs(layout, name)
    rows, cols, prow, pcol = _p.plan(shape, name, layout, pad)
    sfx = _SUFFIX[name]
    bits_dtype = _BITS[sfx]
    x = cp.ascontiguousarray(weight).view(bits_dtype).reshape(rows, cols)
    if (prow, pcol) != (rows, cols):
        xp = cp.zeros((prow, pcol), dtype=bits_dtype)
        xp[:rows, :cols] = x
        x = xp
    mode, kp = _p.MODE_NONZERO, None
    if keep is not None:
        mode = _p.MODE_MASK
        if tuple(keep.shape) != shape:
            raise ShapeMismatchError(f"mask shape {tuple(keep.shape)} does not match weight "
                                     f"shape {shape}")
        k = (cp.asarray(keep) != 0).astype(cp.uint8).reshape(rows, cols)
        kp = cp.zeros((prow, pcol), dtype=cp.uint8)
        kp[:rows, :cols] = k
    elif select:
        mode = _p.MODE_SELECT
    code = _p.LAYOUT_CODE[layout]
    wide = int(name == "int8")
    ngroups = pcol // 4
    nbytes = (ngroups + 1) // 2
    vals = cp.empty((prow, pcol // 2), dtype=bits_dtype)
    codes = bits = meta = None
    if code == 2:
        codes = meta = cp.empty((prow, nbytes), dtype=cp.uint8)
    elif code == 1:
        bits = cp.empty((prow, nbytes), dtype=cp.uint8)
    else:
        meta = cp.empty((prow, ngroups // (8 if wide else 4)), dtype=cp.int32 if wide else cp.int16)
    gpt = (8 if wide else 4) if code == 0 else 2
    chunks = -(-ngroups // gpt)
    status = cp.full(prow, _NO_ERROR, dtype=cp.uint64)
    kinf = _p.FORMATS[name][1] if mode == _p.MODE_SELECT else 0
    null = cp.zeros(1, dtype=cp.uint8)
    _launch(f"apr24_compress_{sfx}", prow * chunks,
            (x, kp if kp is not None else np.uint64(0), np.int64(prow), np.int64(pcol),
             np.int32(mode), np.uint32(kinf), np.int32(code), np.int32(wide), vals,
             codes if codes is not None else null, bits if bits is not None else null,
             meta if code == 0 else null, status))
    _p.raise_status(_statuses(status), shape if len(shape) > 1 else (1,) + shape, pcol, mode,
                    x, kp)
    return {"layout": layout, "shape": shape, "dtype": name, "values": vals.view(weight.dtype),
            "metadata": meta, "bitmask": bits, "padded_shape": (prow, pcol)}


def decompress24(layout, shape, dtype, values, metadata, bitmask, padded_shape):
    """Dense CuPy array of the parts of a 2:4 tensor whose arrays live on the GPU (checked as
    the Sparse24Tensor constructor checks them)."""
    _p.refuse_gpu_pairs(layout, dtype)
    shape, (prow, pcol) = _p.check_parts(layout, shape, dtype, values, metadata, bitmask,
                                         padded_shape)
    sfx = _SUFFIX[dtype]
    bits_dtype = _BITS[sfx]
    code = _p.LAYOUT_CODE[layout]
    wide = int(dtype == "int8")
    ngroups = pcol // 4
    gpt = (8 if wide else 4) if code == 0 else 2
    chunks = -(-ngroups // gpt)
    vals = cp.ascontiguousarray(values).view(bits_dtype)
    out = cp.empty((prow, pcol), dtype=bits_dtype)
    status = cp.full(prow, _NO_ERROR, dtype=cp.uint64)
    null = cp.zeros(1, dtype=cp.uint8)
    src = cp.ascontiguousarray(bitmask if code == 1 else metadata)
    _launch(f"apr24_decompress_{sfx}", prow * chunks,
            (vals, src if code != 0 else null, src if code == 0 else null, np.int64(prow),
             np.int64(pcol), np.int32(code), np.int32(wide), out, status))
    _p.raise_status(_statuses(status), (prow, pcol), pcol, _p.MODE_NONZERO, out, None)
    rows = _p.rows_of(shape)
    out = out[:rows, :shape[-1]]
    return cp.ascontiguousarray(out).reshape(shape).view(values.dtype)
