"""2:4 compressed layouts: CUTLASS (PyTorch / cuSPARSELt-style), sparse-24-bitmask
(compressed-tensors / vLLM) and a plain "raw" layout.

``compress(weight, layout=...)`` returns a :class:`Sparse24Tensor`.  The weight is either already
2:4 (at most two non-zeros in every group of four consecutive elements of the last axis), or is
made 2:4 by ``mask`` (a SparsityMask or a boolean keep-mask; positions it drops are dropped) or by
``select=True`` (keep the two largest |w| of every group; ties prune the lowest index first).

Supported dtypes: float16, bfloat16 (ml_dtypes.bfloat16, torch.bfloat16, or raw bits wrapped in
``aprender.Bits16``) and int8 for every layout; float32 for "bitmask" and "raw" (PyTorch's CUTLASS
conversion treats float32 as 1:2 pairs; that layout is not offered here).

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

CuPy arrays are compressed on the GPU by ``aprender.cuda`` (same bytes as the CPU path).
"""
import math

import numpy as np

from ._validation import Bits16, is_cupy, resolve_threads
from .errors import (InvalidArgumentError, InvalidDTypeError, InvalidShapeError,
                             LayoutError, NumericalInstabilityError, ShapeMismatchError)

__all__ = ["compress", "Sparse24Tensor", "LAYOUTS"]

LAYOUTS = ("cutlass", "bitmask", "raw")
_LAYOUT_CODE = {"cutlass": 0, "bitmask": 1, "raw": 2}
# dtype name -> (bit-pattern dtype, +inf key for selection, nonzero mask)
_FORMATS = {
    "float16": (np.uint16, 0x7C00),
    "bfloat16": (np.uint16, 0x7F80),
    "int8": (np.int8, 0),
    "float32": (np.uint32, 0x7F800000),
}
_MODE_NONZERO, _MODE_MASK, _MODE_SELECT = 0, 1, 2


def _kernels():
    from ._kernels import sparse24 as k

    return k


def _bf16_dtype():
    try:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    except ImportError:  # pragma: no cover - ml_dtypes is optional
        return None


def _is_bf16(dt):
    return dt.kind == "V" and dt.name == "bfloat16" or str(dt) == "bfloat16"


def _torch_to_numpy(t):
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        bits = t.view(torch.int16).numpy().view(np.uint16)
        bf = _bf16_dtype()
        return bits.view(bf) if bf is not None else Bits16(bits, "bfloat16")
    return t.numpy()


class _Host:
    """A host weight as bit patterns: bits (C-contiguous), the dtype to give values back in."""

    def __init__(self, weight, name="weight"):
        self.wrap16 = False
        if isinstance(weight, Bits16):
            arr = weight.bits
            self.name = weight.format
            self.out_dtype = np.dtype(np.uint16)
            self.wrap16 = True
        else:
            if type(weight).__module__.startswith("torch"):
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
            if _is_bf16(dt):
                self.name = "bfloat16"
            elif dt == np.float16:
                self.name = "float16"
            elif dt == np.int8:
                self.name = "int8"
            elif dt == np.float32:
                self.name = "float32"
            else:
                hint = " (wrap raw bfloat16 bits in aprender.Bits16)" if dt == np.uint16 else ""
                raise InvalidDTypeError(f"{name}: 2:4 layouts take float16, bfloat16, int8 or "
                                        f"float32, got dtype {dt}{hint}")
            self.out_dtype = arr.dtype.newbyteorder("=")
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        arr = np.ascontiguousarray(arr)
        self.bits_dtype = np.dtype(_FORMATS[self.name][0])
        self.bits = arr.view(self.bits_dtype)
        self.shape = tuple(arr.shape)


def _plan(shape, name, layout, pad):
    """(rows, cols, padded_rows, padded_cols) for a weight of this shape, or a typed error."""
    if layout not in LAYOUTS:
        raise InvalidArgumentError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    ndim = len(shape)
    if layout == "cutlass":
        if ndim != 2:
            raise InvalidShapeError(f"the cutlass layout needs a 2-D weight, got shape {shape}")
        if name == "float32":
            raise InvalidDTypeError("the cutlass layout takes float16, bfloat16 or int8 (PyTorch "
                                    "encodes float32 as 1:2 pairs); use layout='bitmask' or "
                                    "'raw' for float32")
    elif ndim == 0:
        raise InvalidShapeError("a 2:4 layout needs at least a 1-d weight, got a 0-d array")
    cols = shape[-1]
    rows = math.prod(shape[:-1]) if ndim > 1 else 1
    if layout == "cutlass":
        rmul, cmul = (16, 64) if name == "int8" else (32, 32)
        rule = (f"the cutlass layout for {name} needs rows a multiple of {rmul} and columns a "
                f"multiple of {cmul}")
    else:
        rmul, cmul = 1, 4
        rule = f"the {layout} layout needs the last dimension to be a multiple of 4"
    prow = -(-rows // rmul) * rmul
    pcol = -(-cols // cmul) * cmul
    if (prow, pcol) != (rows, cols) or rows == 0 or cols == 0:
        if rows == 0 or cols == 0:
            raise InvalidShapeError(f"weight of shape {shape} is empty; nothing to compress")
        if not pad:
            raise InvalidShapeError(f"{rule}; got shape {shape} (pass pad=True to pad with zeros)")
    return rows, cols, prow, pcol


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
        if type(mask).__module__.startswith("torch"):
            mask = mask.detach().cpu().numpy()
        mask = SparsityMask(mask)
    keep = mask.keep
    if tuple(keep.shape) != tuple(shape):
        raise ShapeMismatchError(f"mask shape {tuple(keep.shape)} does not match weight shape "
                                 f"{tuple(shape)}")
    return np.ascontiguousarray(keep, dtype=np.bool_).view(np.uint8)


def _raise_status(status, shape, cols, mode, bits, keep):
    bad = np.flatnonzero(status >= 0)
    if bad.size == 0:
        return
    r = int(bad[0])
    s = int(status[r])
    g, kind = s // 4, s % 4
    where = f"row {r}" if len(shape) <= 2 else f"row {r} (index {np.unravel_index(r, shape[:-1])})"
    span = f"group {g} (columns {4 * g}..{4 * g + 3})"
    if kind == 2:
        raise NumericalInstabilityError(
            f"weight {where} {span} contains inf or NaN; select=True needs finite values",
            index=(r, 4 * g))
    if kind == 3:
        raise LayoutError(f"bitmask {where} {span} does not have exactly two bits set")
    grp = bits.reshape(-1, cols)[r, 4 * g:4 * g + 4] if r * cols < bits.size else None
    if grp is not None and is_cupy(grp):
        grp = grp.get()
    detail = ""
    if grp is not None:
        n = int(np.count_nonzero(grp if grp.dtype == np.int8 else
                                 grp & (0x7FFF if grp.dtype == np.uint16 else 0x7FFFFFFF)))
        detail = f" has {n} non-zeros"
    if mode == _MODE_MASK:
        raise LayoutError(f"weight {where} {span}{detail}, and the mask keeps more than two of "
                          "them; a 2:4 layout stores at most two per group of four")
    raise LayoutError(f"weight {where} {span}{detail}; a 2:4 layout stores at most two non-zeros "
                      "per group of four (pass select=True to keep the two largest, or a mask)")


class Sparse24Tensor:
    """A 2:4-compressed weight.  See the module docstring for the layouts.

    Attributes: ``layout``, ``shape`` (dense, original), ``dtype`` (name: "float16", "bfloat16",
    "int8", "float32"), ``values``, ``metadata`` (cutlass, raw) or ``bitmask`` (bitmask layout),
    ``padded_shape`` (the 2-D shape actually compressed)."""

    __slots__ = ("layout", "shape", "dtype", "values", "metadata", "bitmask", "padded_shape",
                 "_wrap16")

    def __init__(self, layout, shape, dtype, values, metadata=None, bitmask=None,
                 padded_shape=None, _wrap16=False):
        self.layout = layout
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.values = values
        self.metadata = metadata
        self.bitmask = bitmask
        self.padded_shape = tuple(padded_shape) if padded_shape is not None else None
        self._wrap16 = _wrap16

    def __repr__(self):
        pad = f", padded_shape={self.padded_shape}" if self.is_padded else ""
        return f"Sparse24Tensor(layout={self.layout!r}, shape={self.shape}, dtype={self.dtype!r}{pad})"

    @property
    def is_padded(self):
        rows = math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1
        return self.padded_shape != (rows, self.shape[-1])

    def to_dense(self, *, n_threads=None):
        """The dense weight, in the original shape and dtype (Bits16 in, Bits16 out)."""
        if is_cupy(self.values):
            from . import cuda

            return cuda.decompress24(self)
        nt = resolve_threads(n_threads)
        k = _kernels()
        prow, pcol = self.padded_shape
        vals = np.ascontiguousarray(self.values)
        bits_dtype = np.dtype(_FORMATS[self.dtype][0])
        vbits = vals.view(bits_dtype).reshape(prow, pcol // 2)
        out = np.empty((prow, pcol), dtype=bits_dtype)
        ngroups = pcol // 4
        scratch = np.empty((max(nt, 1), (ngroups + 1) // 2), dtype=np.uint8)
        code = _LAYOUT_CODE[self.layout]
        wide = int(self.dtype == "int8")
        if code == 0:
            status = k.decompress(vbits, None, np.ascontiguousarray(self.metadata).reshape(-1)
                                  .view(np.uint8), code, wide, out, scratch, nt)
        else:
            src = self.bitmask if code == 1 else self.metadata
            status = k.decompress(vbits, np.ascontiguousarray(src, dtype=np.uint8), None, code,
                                  wide, out, scratch, nt)
        _raise_status(status, (prow, pcol), pcol, _MODE_NONZERO, out, None)
        rows = math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1
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
        if type(shape).__module__.startswith("torch"):
            shape = shape.detach().cpu().numpy()
        shape = np.asarray(shape)
        if shape.dtype.kind not in "iu" or shape.size == 0:
            raise InvalidDTypeError(f"{names[0]} must hold integer dimensions, got {shape!r}")
        shape = tuple(int(s) for s in shape.reshape(-1))
        comp = tensors[names[1]]
        if isinstance(comp, np.ndarray) and comp.dtype == np.uint16:
            comp = Bits16(comp, "bfloat16")
        host = _Host(comp, names[1])
        bm = tensors[names[2]]
        if type(bm).__module__.startswith("torch"):
            bm = bm.detach().cpu().numpy()
        bm = np.asarray(bm)
        if bm.dtype != np.uint8 or bm.ndim != 2:
            raise InvalidDTypeError(f"{names[2]} must be a 2-D uint8 array, got {bm.dtype} "
                                    f"{bm.shape}")
        if min(shape) < 0:
            raise InvalidShapeError(f"{names[0]} holds a negative dimension: {shape}")
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
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
        from . import cuda

        return cuda.compress24(weight, layout=layout, mask=mask, select=select, pad=pad)
    nt = resolve_threads(n_threads)
    host = _Host(weight)
    rows, cols, prow, pcol = _plan(host.shape, host.name, layout, pad)
    mode = _MODE_NONZERO
    keep = None
    if mask is not None:
        mode = _MODE_MASK
        keep = _padded(_keep_of(mask, host.shape), rows, cols, prow, pcol)
    elif select:
        mode = _MODE_SELECT
    x = _padded(host.bits, rows, cols, prow, pcol)
    return _compress_host(x, keep, mode, host, layout, rows, cols, prow, pcol, nt)


def _compress_host(x, keep, mode, host, layout, rows, cols, prow, pcol, nt):
    k = _kernels()
    code = _LAYOUT_CODE[layout]
    ngroups = pcol // 4
    nbytes = (ngroups + 1) // 2
    wide = int(host.name == "int8")
    kinf = _FORMATS[host.name][1]
    vals = np.empty((prow, pcol // 2), dtype=host.bits_dtype)
    meta = bitmask = None
    meta_bytes = bits = None
    if code == 2:
        codes = np.empty((prow, nbytes), dtype=np.uint8)
        meta = codes
    else:
        codes = np.empty((max(nt, 1), nbytes), dtype=np.uint8)
    if code == 1:
        bits = bitmask = np.empty((prow, nbytes), dtype=np.uint8)
    if code == 0:
        nwords = ngroups // 8 if wide else ngroups // 4
        meta = np.empty((prow, nwords), dtype=np.int32 if wide else np.int16)
        meta_bytes = meta.reshape(-1).view(np.uint8)
    status = k.compress(x, keep, mode, kinf if mode == _MODE_SELECT else 0, code, wide, vals,
                        codes, bits, meta_bytes, nt)
    _raise_status(status, host.shape if len(host.shape) > 1 else (1,) + host.shape, pcol, mode,
                  x, keep)
    return Sparse24Tensor(layout, host.shape, host.name, vals.view(host.out_dtype), metadata=meta,
                          bitmask=bitmask, padded_shape=(prow, pcol), _wrap16=host.wrap16)
