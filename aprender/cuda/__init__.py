"""Optional GPU path: 2:4 compression of CuPy arrays with the CUDA kernel in ``sparse24.cu``.

It compiles (NVRTC, through ``cupy.RawModule``) the same per-group code the CPU kernel uses
(``aprender/_kernels/apr_sparse24.h``) and writes exactly the CPU bytes.  Imported on first use by
``aprender.sparse24.compress`` when a CuPy array arrives.
"""
import functools
import math
import os

try:
    import cupy as cp
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("aprender.cuda needs CuPy; install it with: pip install aprender[cuda]") from exc

import numpy as np

from ..errors import InvalidDTypeError, ShapeMismatchError
from .. import sparse24 as _s24

__all__ = ["compress24", "decompress24", "module"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_KERNELS = os.path.join(os.path.dirname(_HERE), "_kernels")
_SUFFIX = {"float16": "u16", "bfloat16": "u16", "int8": "i8", "float32": "u32"}
_BITS = {"u16": np.uint16, "i8": np.int8, "u32": np.uint32}
_NO_ERROR = np.uint64(0xFFFFFFFFFFFFFFFF)
_THREADS = 256


@functools.lru_cache(maxsize=None)
def module():
    """The compiled RawModule (cached per process)."""
    with open(os.path.join(_HERE, "sparse24.cu")) as fh:
        src = fh.read()
    return cp.RawModule(code=src, options=("-I" + _KERNELS, "--std=c++14"))


def _dtype_name(dt):
    dt = np.dtype(dt) if not str(dt) == "bfloat16" else dt
    if str(dt) == "bfloat16":
        return "bfloat16"
    names = {np.dtype(np.float16): "float16", np.dtype(np.int8): "int8",
             np.dtype(np.float32): "float32"}
    if dt not in names:
        raise InvalidDTypeError(f"weight: 2:4 layouts take float16, bfloat16, int8 or float32, "
                                f"got CuPy dtype {dt}")
    return names[dt]


def _statuses(status):
    st = status.get().astype(np.uint64)
    out = np.where(st == _NO_ERROR, -1, st.astype(np.int64))
    return out.astype(np.int64)


def _launch(name, n, args):
    blocks = max(1, (n + _THREADS - 1) // _THREADS)
    module().get_function(name)((blocks,), (_THREADS,), args)


def compress24(weight, *, layout="cutlass", mask=None, select=False, pad=False):
    """GPU twin of aprender.sparse24.compress for a CuPy array (same validation, same bytes)."""
    name = _dtype_name(weight.dtype)
    shape = tuple(weight.shape)
    rows, cols, prow, pcol = _s24._plan(shape, name, layout, pad)
    sfx = _SUFFIX[name]
    bits_dtype = _BITS[sfx]
    x = cp.ascontiguousarray(weight).view(bits_dtype).reshape(rows, cols)
    if (prow, pcol) != (rows, cols):
        xp = cp.zeros((prow, pcol), dtype=bits_dtype)
        xp[:rows, :cols] = x
        x = xp
    mode, keep = _s24._MODE_NONZERO, None
    if mask is not None:
        mode = _s24._MODE_MASK
        if isinstance(mask, cp.ndarray):
            if tuple(mask.shape) != shape:
                raise ShapeMismatchError(f"mask shape {tuple(mask.shape)} does not match weight "
                                         f"shape {shape}")
            k = (mask != 0).astype(cp.uint8).reshape(rows, cols)
        else:
            k = cp.asarray(_s24._keep_of(mask, shape).reshape(rows, cols))
        keep = cp.zeros((prow, pcol), dtype=cp.uint8)
        keep[:rows, :cols] = k
    elif select:
        mode = _s24._MODE_SELECT
    code = _s24._LAYOUT_CODE[layout]
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
    kinf = _s24._FORMATS[name][1] if mode == _s24._MODE_SELECT else 0
    null = cp.zeros(1, dtype=cp.uint8)
    _launch(f"apr24_compress_{sfx}", prow * chunks,
            (x, keep if keep is not None else np.uint64(0), np.int64(prow), np.int64(pcol),
             np.int32(mode), np.uint32(kinf), np.int32(code), np.int32(wide), vals,
             codes if codes is not None else null, bits if bits is not None else null,
             meta if code == 0 else null, status))
    _s24._raise_status(_statuses(status), shape if len(shape) > 1 else (1,) + shape, pcol, mode,
                       x, keep)
    out_dtype = weight.dtype
    return _s24.Sparse24Tensor(layout, shape, name, vals.view(out_dtype), metadata=meta,
                               bitmask=bits, padded_shape=(prow, pcol))


def decompress24(t):
    """Dense CuPy array of a Sparse24Tensor whose arrays live on the GPU."""
    sfx = _SUFFIX[t.dtype]
    bits_dtype = _BITS[sfx]
    prow, pcol = t.padded_shape
    code = _s24._LAYOUT_CODE[t.layout]
    wide = int(t.dtype == "int8")
    ngroups = pcol // 4
    gpt = (8 if wide else 4) if code == 0 else 2
    chunks = -(-ngroups // gpt)
    vals = cp.ascontiguousarray(t.values).view(bits_dtype)
    out = cp.empty((prow, pcol), dtype=bits_dtype)
    status = cp.full(prow, _NO_ERROR, dtype=cp.uint64)
    null = cp.zeros(1, dtype=cp.uint8)
    src = t.bitmask if code == 1 else t.metadata
    src = cp.ascontiguousarray(src)
    _launch(f"apr24_decompress_{sfx}", prow * chunks,
            (vals, src if code != 0 else null, src if code == 0 else null, np.int64(prow),
             np.int64(pcol), np.int32(code), np.int32(wide), out, status))
    _s24._raise_status(_statuses(status), (prow, pcol), pcol, _s24._MODE_NONZERO, out, None)
    rows = math.prod(t.shape[:-1]) if len(t.shape) > 1 else 1
    out = out[:rows, :t.shape[-1]]
    return cp.ascontiguousarray(out).reshape(t.shape).view(t.values.dtype)
