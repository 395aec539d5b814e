"""2:4 compressed layouts: CUTLASS (PyTorch / cuSPARSELt-style), sparse-24-bitmask
(compressed-tensors / vLLM) and a plain "raw" layout.

``compress(weight, layout=...)`` returns a :class:`Sparse24Tensor`.  The weight is either already
2:4 (at most two non-zeros in every group of four consecutive elements of the last axis), or is
made 2:4 by ``mask`` (a SparsityMask or a boolean keep-mask; positions it drops are dropped) or by
``select=True`` (keep the two largest |w| of every group; ties prune the lowest index first).

Supported dtypes: float16, bfloat16 (ml_dtypes.bfloat16, torch.bfloat16, or raw bits wrapped in
``aprender.Bits16``), int8 and float32 for every layout.  For float32 the "cutlass" layout is
PyTorch's 1:2 pair layout (see below); "bitmask" and "raw" stay 2:4.

Which two positions a group stores
    "Non-zero" means the value compares unequal to zero, exactly as in PyTorch's conversion, so
    -0.0 counts as zero and NaN as non-zero.  A group with two non-zeros stores them; a group with
    fewer stores the zero-valued positions PyTorch's CUTLASS encoding picks (no non-zero: positions
    2 and 3; only element 0: 0 and 2; only element 1: 1 and 2; only element 2 or 3: 2 and 3;
    two present: those two).  Every layout stores the same two positions, so every group holds
    exactly two values, and decompression writes +0.0 (0 for int8) at the two other positions.
    Round trips are therefore bit-exact, with one documented exception: a -0.0 at a position that
    is not stored comes back as +0.0 (equal in value).

Layouts (``rows`` = product of all but the last dimension, ``cols`` = the last dimension)
    "cutlass": ``values`` (rows, cols/2) in the weight dtype and ``metadata`` (rows, cols/16)
        int16 for float16/bfloat16, (rows, cols/32) int32 for int8: bit-identical to
        ``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``.
        Each group contributes the 4-bit code idx0 | idx1 << 2 (stored positions, idx0 < idx1);
        a word packs 4 (int16) or 8 (int32) consecutive groups, first group in the lowest bits;
        words are then scattered into CUTLASS's ColumnMajorInterleaved<2> order (rows permuted
        within blocks of 32 resp. 16, 2x2 blocks swizzled).  Shape rules: 2-D; float16/bfloat16
        rows and cols multiples of 32; int8 rows a multiple of 16 and cols of 64.
        float32 (CPU only): PyTorch's conversion reads float32 as 1:2 pairs (TF32 sparse
        kernels): every pair of consecutive elements stores one value, ``values`` (rows, cols/2)
        float32 and ``metadata`` (rows, cols/8) int16, a pair's code being that of the group of
        four with flags (e0, e0, e1, e1): 0b0100 stores e0, 0b1110 stores e1 (also for a pair of
        zeros).  A pair with two non-zeros is an error unless ``select=True`` (keeps the larger
        |w|, a tie keeps the second) or ``mask`` (which must keep at most one; a stored element
        the mask drops is written as +0) decides.  Bit-identical to PyTorch's
        ``sparse_semi_structured_from_dense_cutlass``; rows a multiple of 32, cols of 16.
    "bitmask": ``values`` (rows, cols/2) = the stored values in row-major order and ``bitmask``
        uint8 (rows, ceil(cols/8)) = numpy.packbits(stored, axis=-1, bitorder="little") (first
        element in the lowest bit).  Like compressed-tensors, every group has exactly two bits
        set, so every row holds cols/2 values.  ``to_tensors("P")`` gives ``P.shape`` (int64,
        (ndim, 1)), ``P.compressed`` and ``P.bitmask``.  Shape rule: cols a multiple of 4.
    "raw": ``values`` as above and ``metadata`` uint8 (rows, ceil(cols/8)): the same 4-bit group
        codes, row-major without reordering, two groups per byte (group 2j in the low nibble,
        2j+1 in the high nibble); within a nibble bits 0-1 hold idx0 and bits 2-3 idx1.  This is
        the CUTLASS metadata before reordering, read as little-endian bytes.  Shape rule: cols a
        multiple of 4.

``pad=True`` pads with zeros to the next shape the layout takes (rows and cols for "cutlass", cols
for the others) instead of raising; ``padded_shape`` records it and ``to_dense()`` returns the
original shape.

CuPy arrays are compressed on the GPU by ``aprender.cuda`` (same bytes as the CPU path); the
layout rules both paths follow live in ``aprender._sparse24_plan``.
"""
import numpy as np

from . import _sparse24_plan as _p
from ._sparse24_plan import LAYOUTS
from ._adapters import Bits16, is_cupy, is_torch, to_numpy_view
from ._validation import _is_bf16, resolve_threads
from .errors import (InvalidArgumentError, InvalidDTypeError, InvalidShapeError, LayoutError,
                     ShapeMismatchError)

__all__ = ["compress", "Sparse24Tensor", "LAYOUTS"]


def _kernels():
    from ._kernels import sparse24 as k

    return k


def _cuda():
    from . import cuda  # optional: imported only when a CuPy array arrives

    return cuda


def _torch_to_numpy(t):
    """The one torch adapter (aprender._adapters): a zero-copy view of a CPU tensor, Bits16 for
    bfloat16; CUDA tensors are refused with DeviceError rather than copied silently."""
    return to_numpy_view(t)


_NAMES = {np.dtype(np.float16): "float16", np.dtype(np.int8): "int8",
          np.dtype(np.float32): "float32"}


class _Host:
    """A host weight as bit patterns: bits (C-contiguous, native byte order), the dtype to give
    values back in.  Byte-swapped input (say ``>f2``) is converted to native order once."""

    def __init__(self, weight, name="weight"):
        self.wrap16 = False
        if isinstance(weight, Bits16):
            arr = weight.bits
            self.name = weight.format
            self.out_dtype = np.dtype(np.uint16)
            self.wrap16 = True
        else:
            if is_torch(weight):
                weight = _torch_to_numpy(weight)
                if isinstance(weight, Bits16):
                    self.__init__(weight, name)
                    return
            try:
                arr = np.asarray(weight)
            except Exception as exc:  # noqa: BLE001 - anything numpy cannot take
                raise InvalidDTypeError(f"{name}: cannot convert {type(weight).__name__} to an "
                                        f"array ({exc})")
            dt = arr.dtype
            native = dt if dt.isnative else dt.newbyteorder("=")
            if _is_bf16(dt):
                self.name = "bfloat16"
            elif native in _NAMES:
                self.name = _NAMES[native]
            else:
                hint = " (wrap raw bfloat16 bits in aprender.Bits16)" if dt == np.uint16 else ""
                raise InvalidDTypeError(f"{name}: 2:4 layouts take float16, bfloat16, int8 or "
                                        f"float32, got dtype {dt}{hint}")
            self.out_dtype = native
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        arr = np.ascontiguousarray(arr)
        self.bits_dtype = np.dtype(_p.FORMATS[self.name][0])
        self.bits = arr.view(self.bits_dtype)
        self.shape = tuple(arr.shape)


def _padded(a, rows, cols, prow, pcol):
    a = a.reshape(rows, cols)
    if (prow, pcol) == (rows, cols):
        return a
    out = np.zeros((prow, pcol), dtype=a.dtype)
    out[:rows, :cols] = a
    return out


def _keep_of(mask, shape):
    from .pruning.mask import SparsityMask

    if not isinstance(mask, SparsityMask):
        if is_cupy(mask):
            mask = mask.get()
        if is_torch(mask):
            mask = to_numpy_view(mask)
        mask = SparsityMask(mask)
    keep = mask.keep
    if tuple(keep.shape) != tuple(shape):
        raise ShapeMismatchError(f"mask shape {tuple(keep.shape)} does not match weight shape "
                                 f"{tuple(shape)}")
    return np.ascontiguousarray(keep, dtype=np.bool_).view(np.uint8)


def _host_array(a, what):
    """numpy (or CuPy, left as it is) view of a part handed to the constructor."""
    if a is None or is_cupy(a) or isinstance(a, np.ndarray):
        return a
    if is_torch(a):
        a = _torch_to_numpy(a)
        return a.bits if isinstance(a, Bits16) else a
    try:
        return np.asarray(a)
    except Exception as exc:  # noqa: BLE001 - anything numpy cannot take
        raise InvalidDTypeError(f"{what}: cannot convert {type(a).__name__} to an array "
                                f"({exc})") from None


class Sparse24Tensor:
    """A 2:4-compressed weight.  See the module docstring for the layouts.

    Attributes: ``layout``, ``shape`` (dense, original), ``dtype`` (name: "float16", "bfloat16",
    "int8", "float32"), ``values``, ``metadata`` (cutlass, raw) or ``bitmask`` (bitmask layout),
    ``padded_shape`` (the 2-D shape actually compressed).  The constructor checks that every
    part has exactly the shape and element size its layout needs (``padded_shape`` defaults to
    the layout's padding of ``shape``); raw 16-bit bits may come as an ``aprender.Bits16``."""

    __slots__ = ("layout", "shape", "dtype", "values", "metadata", "bitmask", "padded_shape",
                 "_wrap16")

    def __init__(self, layout, shape, dtype, values, metadata=None, bitmask=None,
                 padded_shape=None, _wrap16=False):
        if isinstance(values, Bits16):
            if dtype != values.format:
                raise InvalidDTypeError(f"values are {values.format} bits, dtype says {dtype!r}")
            values, _wrap16 = values.bits, True
        values = _host_array(values, "values")
        if isinstance(values, np.ndarray) and not values.dtype.isnative:
            values = values.astype(values.dtype.newbyteorder("="))  # decoded as native bits
        metadata = _host_array(metadata, "metadata")
        bitmask = _host_array(bitmask, "bitmask")
        shape, padded_shape = _p.check_parts(layout, shape, dtype, values, metadata, bitmask,
                                             padded_shape)
        self.layout = layout
        self.shape = shape
        self.dtype = dtype
        self.values = values
        self.metadata = metadata
        self.bitmask = bitmask
        self.padded_shape = padded_shape
        self._wrap16 = bool(_wrap16)

    def __repr__(self):
        pad = f", padded_shape={self.padded_shape}" if self.is_padded else ""
        return f"Sparse24Tensor(layout={self.layout!r}, shape={self.shape}, dtype={self.dtype!r}{pad})"

    @property
    def is_padded(self):
        return self.padded_shape != (_p.rows_of(self.shape), self.shape[-1])

    def to_dense(self, *, n_threads=None):
        """The dense weight, in the original shape and dtype (Bits16 in, Bits16 out)."""
        if is_cupy(self.values):
            return _cuda().decompress24(self.layout, self.shape, self.dtype, self.values,
                                        self.metadata, self.bitmask, self.padded_shape)
        nt = resolve_threads(n_threads)
        k = _kernels()
        prow, pcol = self.padded_shape
        vals = np.ascontiguousarray(self.values)
        bits_dtype = np.dtype(_p.FORMATS[self.dtype][0])
        vbits = vals.view(bits_dtype).reshape(prow, pcol // 2)
        out = np.empty((prow, pcol), dtype=bits_dtype)
        code = _p.LAYOUT_CODE[self.layout]
        wide = _p.wide_code(self.layout, self.dtype)
        if code == 0:
            status = k.decompress(vbits, None, np.ascontiguousarray(self.metadata).reshape(-1)
                                  .view(np.uint8), code, wide, out, nt)
        else:
            src = self.bitmask if code == 1 else self.metadata
            status = k.decompress(vbits, np.ascontiguousarray(src).view(np.uint8), None, code,
                                  wide, out, nt)
        _p.raise_status(status, (prow, pcol), pcol, _p.MODE_NONZERO, out, None, pairs=wide == 2)
        rows = _p.rows_of(self.shape)
        if (prow, pcol) != (rows, self.shape[-1]):
            out = np.ascontiguousarray(out[:rows, :self.shape[-1]])
        out = out.reshape(self.shape)
        if self._wrap16:
            return Bits16(out, self.dtype)
        return out.view(vals.dtype)

    # --- compressed-tensors / vLLM sparse-24-bitmask tensors ---------------------------------

    @staticmethod
    def _prefix(prefix):
        prefix = str(prefix)
        return prefix[:-len(".weight")] if prefix.endswith(".weight") else prefix

    def to_tensors(self, prefix):
        """``{P.shape, P.compressed, P.bitmask}`` numpy arrays for the bitmask layout (P: the
        module name; a trailing ".weight" is dropped).  ``P.shape`` is the original dense shape;
        a padded tensor stores its padded values and bitmask (readers other than aprender expect
        unpadded ones)."""
        if self.layout != "bitmask":
            raise LayoutError(f"to_tensors needs the bitmask layout, this tensor is {self.layout!r}")
        p = self._prefix(prefix)
        vals, bm = self.values, self.bitmask
        if is_cupy(vals):
            vals, bm = vals.get(), bm.get()
        return {
            f"{p}.shape": np.asarray(self.shape, dtype=np.int64).reshape(-1, 1),
            f"{p}.compressed": np.ascontiguousarray(vals),
            f"{p}.bitmask": np.ascontiguousarray(bm),
        }

    @classmethod
    def from_tensors(cls, tensors, prefix):
        """Inverse of :meth:`to_tensors`.  ``tensors``: a mapping name -> array (numpy, torch, or
        Bits16 for raw bfloat16 bits; a plain uint16 ``compressed`` is read as bfloat16 bits)."""
        p = cls._prefix(prefix)
        names = [f"{p}.shape", f"{p}.compressed", f"{p}.bitmask"]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise LayoutError(f"sparse-24-bitmask tensors missing: {', '.join(missing)}")
        shape = tensors[names[0]]
        if is_torch(shape):
            shape = to_numpy_view(shape)
        shape = np.asarray(shape)
        if shape.dtype.kind not in "iu" or shape.size == 0:
            raise InvalidDTypeError(f"{names[0]} must hold integer dimensions, got {shape!r}")
        shape = tuple(int(s) for s in shape.reshape(-1))
        comp = tensors[names[1]]
        if isinstance(comp, np.ndarray) and comp.dtype == np.uint16:
            comp = Bits16(comp, "bfloat16")
        host = _Host(comp, names[1])
        bm = tensors[names[2]]
        if is_torch(bm):
            bm = to_numpy_view(bm)
        bm = np.asarray(bm)
        if bm.dtype != np.uint8 or bm.ndim != 2:
            raise InvalidDTypeError(f"{names[2]} must be a 2-D uint8 array, got {bm.dtype} "
                                    f"{bm.shape}")
        if min(shape) < 0:
            raise InvalidShapeError(f"{names[0]} holds a negative dimension: {shape}")
        rows = _p.rows_of(shape)
        vshape = host.bits.shape
        if host.bits.ndim != 2 or vshape[0] < rows or vshape[1] * 2 < shape[-1] or vshape[1] % 2:
            raise InvalidShapeError(f"{names[1]} has shape {vshape}; dense shape {shape} needs "
                                    f"({rows}, {shape[-1] // 2})")
        prow, pcol = vshape[0], vshape[1] * 2
        if bm.shape != (prow, -(-pcol // 8)):
            raise InvalidShapeError(f"{names[2]} has shape {bm.shape}, expected "
                                    f"({prow}, {-(-pcol // 8)}) for {names[1]} of shape {vshape}")
        return cls("bitmask", shape, host.name, host.bits.view(host.out_dtype), bitmask=bm,
                   padded_shape=(prow, pcol), _wrap16=host.wrap16)


def compress(weight, *, layout="cutlass", mask=None, select=False, pad=False, n_threads=None):
    """Compress a 2:4 weight into ``layout`` ("cutlass", "bitmask" or "raw"); see the module
    docstring.  Raises LayoutError naming the first row and group with more than two non-zeros
    (unless ``mask`` or ``select`` decides), InvalidShapeError for shapes the layout does not take
    (unless ``pad``), InvalidDTypeError for other dtypes."""
    if mask is not None and select:
        raise InvalidArgumentError("pass either mask= or select=True, not both")
    if is_cupy(weight):
        keep = None
        if mask is not None:
            keep = mask if is_cupy(mask) else _keep_of(mask, tuple(weight.shape))
        parts = _cuda().compress24(weight, layout=layout, keep=keep, select=bool(select),
                                   pad=pad)
        return Sparse24Tensor(**parts)
    nt = resolve_threads(n_threads)
    host = _Host(weight)
    rows, cols, prow, pcol = _p.plan(host.shape, host.name, layout, pad)
    mode = _p.MODE_NONZERO
    keep = None
    if mask is not None:
        mode = _p.MODE_MASK
        keep = _padded(_keep_of(mask, host.shape), rows, cols, prow, pcol)
    elif select:
        mode = _p.MODE_SELECT
    x = _padded(host.bits, rows, cols, prow, pcol)
    return _compress_host(x, keep, mode, host, layout, prow, pcol, nt)


def _compress_host(x, keep, mode, host, layout, prow, pcol, nt):
    k = _kernels()
    code = _p.LAYOUT_CODE[layout]
    ngroups = pcol // 4
    nbytes = (ngroups + 1) // 2
    wide = _p.wide_code(layout, host.name)
    kinf = _p.FORMATS[host.name][1]
    vals = np.empty((prow, pcol // 2), dtype=host.bits_dtype)
    meta = bitmask = codes = None
    meta_bytes = bits = None
    if code == 2:
        codes = meta = np.empty((prow, nbytes), dtype=np.uint8)
    if code == 1:
        bits = bitmask = np.empty((prow, nbytes), dtype=np.uint8)
    if code == 0:
        (mrows, nwords), _ = _p.side_parts(layout, host.name, prow, pcol)["metadata"]
        meta = np.empty((prow, nwords), dtype=np.int32 if wide == 1 else np.int16)
        meta_bytes = meta.reshape(-1).view(np.uint8)
    status = k.compress(x, keep, mode, kinf if mode == _p.MODE_SELECT else 0, code, wide, vals,
                        codes, bits, meta_bytes, nt)
    _p.raise_status(status, host.shape if len(host.shape) > 1 else (1,) + host.shape, pcol, mode,
                    x, keep, pairs=wide == 2)
    return Sparse24Tensor(layout, host.shape, host.name, vals.view(host.out_dtype), metadata=meta,
                          bitmask=bitmask, padded_shape=(prow, pcol), _wrap16=host.wrap16)
