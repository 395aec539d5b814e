"""The 2:4 layout rules that the CPU path (aprender.sparse24) and the GPU path (aprender.cuda)
share, below both (it imports neither): layout and dtype tables, the shape plan (which shapes a
layout takes, and the padded shape), the checks of a compressed tensor's parts, and the decoding
of the kernels' row statuses into typed errors.  See aprender.sparse24 for the layouts.
"""
import math
import numbers

import numpy as np

from ._adapters import is_cupy
from ._validation import ABS16, BF16, F16, INF16
from .errors import (InvalidArgumentError, InvalidDTypeError, InvalidShapeError, LayoutError,
                     NumericalInstabilityError, ShapeMismatchError)

LAYOUTS = ("cutlass", "bitmask", "raw")
LAYOUT_CODE = {"cutlass": 0, "bitmask": 1, "raw": 2}
# dtype name -> (bit-pattern dtype, key of +inf for select=True; 0: no check)
FORMATS = {
    "float16": (np.uint16, INF16[F16]),
    "bfloat16": (np.uint16, INF16[BF16]),
    "int8": (np.int8, 0),
    "float32": (np.uint32, 0x7F800000),
}
# how a group's present flags are formed (APR24_NONZERO, APR24_MASK, APR24_SELECT)
MODE_NONZERO, MODE_MASK, MODE_SELECT = 0, 1, 2


def rows_of(shape):
    """The rows of the 2-D view: the product of all but the last dimension (1 for 1-d)."""
    return math.prod(shape[:-1]) if len(shape) > 1 else 1


def multiples(layout, name):
    """(row multiple, column multiple) a layout needs for a dtype."""
    if layout == "cutlass":
        if name == "float32":
            return 32, 16  # 1:2 pairs, four pairs per 16-bit word
        return (16, 64) if name == "int8" else (32, 32)
    return 1, 4


def wide_code(layout, name):
    """The kernels' metadata-word code: 1 for int8 (32-bit words), 2 for float32 in the cutlass
    layout (1:2 pairs, 16-bit words), else 0 (16-bit words)."""
    if name == "int8":
        return 1
    return 2 if (layout == "cutlass" and name == "float32") else 0


def refuse_gpu_pairs(layout, name):
    """The GPU kernel has no float32 cutlass (1:2 pairs) layout yet."""
    if layout == "cutlass" and name == "float32":
        raise InvalidDTypeError("the cutlass layout for float32 (1:2 pairs) is CPU-only; use "
                                "layout='bitmask' or 'raw' on the GPU, or a numpy array")


def plan(shape, name, layout, pad):
    """(rows, cols, padded_rows, padded_cols) for a weight of this shape, or a typed error."""
    if layout not in LAYOUTS:
        raise InvalidArgumentError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    ndim = len(shape)
    if layout == "cutlass":
        if ndim != 2:
            raise InvalidShapeError(f"the cutlass layout needs a 2-D weight, got shape {shape}")
    elif ndim == 0:
        raise InvalidShapeError("a 2:4 layout needs at least a 1-d weight, got a 0-d array")
    cols = shape[-1]
    rows = rows_of(shape)
    rmul, cmul = multiples(layout, name)
    if layout == "cutlass":
        rule = (f"the cutlass layout for {name} needs rows a multiple of {rmul} and columns a "
                f"multiple of {cmul}")
    else:
        rule = f"the {layout} layout needs the last dimension to be a multiple of 4"
    prow = -(-rows // rmul) * rmul
    pcol = -(-cols // cmul) * cmul
    if (prow, pcol) != (rows, cols) or rows == 0 or cols == 0:
        if rows == 0 or cols == 0:
            raise InvalidShapeError(f"weight of shape {shape} is empty; nothing to compress")
        if not pad:
            raise InvalidShapeError(f"{rule}; got shape {shape} (pass pad=True to pad with zeros)")
    return rows, cols, prow, pcol


def _dims(value, what):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InvalidShapeError(f"{what} must be a sequence of integers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise InvalidShapeError(f"{what} must hold integers, got {value!r}")
        if v < 0:
            raise InvalidShapeError(f"{what} holds a negative dimension: {tuple(value)}")
        out.append(int(v))
    return tuple(out)


def _array_shape(a, what):
    shape = getattr(a, "shape", None)
    dtype = getattr(a, "dtype", None)
    if shape is None or dtype is None:
        raise InvalidDTypeError(f"{what} must be an array, got {type(a).__name__}")
    return tuple(int(v) for v in shape), dtype


def side_parts(layout, name, prow, pcol):
    """{"metadata" | "bitmask": (shape, itemsize)} a compressed tensor of this padded shape
    carries besides its values."""
    if layout == "cutlass":
        if name == "int8":
            return {"metadata": ((prow, pcol // 32), 4)}
        if name == "float32":
            return {"metadata": ((prow, pcol // 8), 2)}
        return {"metadata": ((prow, pcol // 16), 2)}
    nbytes = -(-pcol // 8)
    return {"metadata" if layout == "raw" else "bitmask": ((prow, nbytes), 1)}


def check_parts(layout, shape, dtype, values, metadata, bitmask, padded_shape):
    """Validate the parts of a compressed 2:4 tensor (numpy or CuPy arrays) and return
    (shape, padded_shape) as tuples of ints: every buffer has exactly the size its layout,
    dtype and padded shape call for, so decompression stays inside them."""
    if layout not in LAYOUTS:
        raise InvalidArgumentError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if dtype not in FORMATS:
        raise InvalidDTypeError(f"dtype must be one of {tuple(FORMATS)}, got {dtype!r}")
    shape = _dims(shape, "shape")
    if layout == "cutlass" and len(shape) != 2:
        raise InvalidShapeError(f"the cutlass layout needs a 2-D shape, got {shape}")
    if len(shape) == 0:
        raise InvalidShapeError("a 2:4 tensor needs at least a 1-d shape, got ()")
    rows, cols = rows_of(shape), shape[-1]
    if padded_shape is None:
        _, _, prow, pcol = plan(shape, dtype, layout, pad=True)
    else:
        ps = _dims(padded_shape, "padded_shape")
        if len(ps) != 2:
            raise InvalidShapeError(f"padded_shape must be (rows, columns), got {ps}")
        prow, pcol = ps
    rmul, cmul = multiples(layout, dtype)
    if prow < rows or pcol < cols or prow % rmul or pcol % cmul or prow == 0 or pcol == 0:
        raise InvalidShapeError(
            f"padded_shape {(prow, pcol)} must cover shape {shape} (rows {rows}, columns {cols}), "
            f"be non-empty and have rows a multiple of {rmul} and columns a multiple of {cmul} "
            f"for the {layout} layout of {dtype}")
    vshape, vdtype = _array_shape(values, "values")
    if vshape != (prow, pcol // 2):
        raise ShapeMismatchError(f"values has shape {vshape}, the {layout} layout of padded "
                                 f"shape {(prow, pcol)} needs {(prow, pcol // 2)}")
    want = np.dtype(FORMATS[dtype][0]).itemsize
    if np.dtype(vdtype).itemsize != want:
        raise InvalidDTypeError(f"values has dtype {vdtype}; {dtype} values take {want} byte(s) "
                                "each")
    parts = {"metadata": metadata, "bitmask": bitmask}
    need = side_parts(layout, dtype, prow, pcol)
    for key, arr in parts.items():
        if key not in need:
            if arr is not None:
                raise LayoutError(f"the {layout} layout has no {key}; got one")
            continue
        if arr is None:
            raise LayoutError(f"the {layout} layout needs {key}, got None")
        (eshape, esize) = need[key]
        ashape, adtype = _array_shape(arr, key)
        if ashape != eshape or np.dtype(adtype).itemsize != esize:
            raise ShapeMismatchError(f"{key} has shape {ashape} and dtype {adtype}; the "
                                     f"{layout} layout of {dtype} with padded shape "
                                     f"{(prow, pcol)} needs shape {eshape} of {esize}-byte "
                                     "elements")
    return shape, (prow, pcol)


def raise_status(status, shape, cols, mode, bits, keep, pairs=False):
    """Raise the typed error for the first bad row of a kernel's row statuses (numpy int64:
    -1 fine, else first_bad_group * 4 + kind), naming the row and group (``pairs``: the float32
    cutlass layout, where the unit is a pair of elements and first_bad_group a pair index)."""
    bad = np.flatnonzero(status >= 0)
    if bad.size == 0:
        return
    r = int(bad[0])
    s = int(status[r])
    g, kind = s // 4, s % 4
    where = f"row {r}" if len(shape) <= 2 else f"row {r} (index {np.unravel_index(r, shape[:-1])})"
    w = 2 if pairs else 4
    unit = "pair" if pairs else "group"
    span = f"{unit} {g} (columns {w * g}..{w * g + w - 1})"
    if kind == 2:
        raise NumericalInstabilityError(
            f"weight {where} {span} contains inf or NaN; select=True needs finite values",
            index=(r, w * g))
    if kind == 3:
        raise LayoutError(f"bitmask {where} {span} does not have exactly two bits set")
    grp = bits.reshape(-1, cols)[r, w * g:w * g + w] if r * cols < bits.size else None
    if grp is not None and is_cupy(grp):
        grp = grp.get()
    detail = ""
    if grp is not None:
        n = int(np.count_nonzero(grp if grp.dtype == np.int8 else
                                 grp & (ABS16 if grp.dtype == np.uint16 else 0x7FFFFFFF)))
        detail = f" has {n} non-zeros"
    if pairs:
        how = ", and the mask keeps both" if mode == MODE_MASK else ""
        raise LayoutError(f"weight {where} {span}{detail}{how}; the float32 cutlass "
                          "layout stores one element of every pair (1:2; pass select=True to "
                          "keep the larger, or a mask)")
    if mode == MODE_MASK:
        raise LayoutError(f"weight {where} {span}{detail}, and the mask keeps more than two of "
                          "them; a 2:4 layout stores at most two per group of four")
    raise LayoutError(f"weight {where} {span}{detail}; a 2:4 layout stores at most two non-zeros "
                      "per group of four (pass select=True to keep the two largest, or a mask)")
