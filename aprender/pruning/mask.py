"""Masks: SparsityPattern, SparsityMask and the generate_* functions (thin: validate, call one
kernel, wrap the result)."""
import numbers
import re
import warnings

import numpy as np

from .._kernels import apply as _apply
from .._kernels import nm as _nmk
from .._kernels import select as _select
from .._adapters import is_torch, to_numpy_view
from .._validation import (Floats, as_array, as_floats, check_axis, check_bool, check_int,
                           check_nm, check_sparsity, prune_count, resolve_threads, short_repr)
from ..errors import (InvalidArgumentError, InvalidDTypeError, InvalidPatternError, InvalidShapeError,
                     InvalidSparsityError, NumericalInstabilityError, ReadOnlyError,
                     ShapeMismatchError)
from .selection import (ArraySource, common_dtype, raise_nonfinite, require_finite,
                        select_global, select_mask, select_rows)

__all__ = ["SparsityPattern", "SparsityMask", "generate_unstructured_mask", "generate_nm_mask",
           "generate_global_mask", "generate_block_mask", "generate_row_mask",
           "generate_column_mask", "magnitude_mask", "magnitude_nm_mask", "layer_magnitude_mask",
           "per_row_count_mask", "row_counts"]


_NM_TEXT = re.compile(r"([0-9]+)\s*:\s*([0-9]+)", re.ASCII)
_BLOCK_TEXT = re.compile(r"block\s*:\s*([0-9]+)\s*x\s*([0-9]+)", re.ASCII)
_MAX_PATTERN_TEXT = 64  # longer than any pattern; bounds the work and the error message
_PATTERN_HELP = ("'unstructured', 'per-row', 'N:M' such as '2:4', 'block:HxW' such as "
                 "'block:4x4', 'row' (whole rows) or 'column' (whole columns)")


def _outside_aprender():
    """The warnings stacklevel of the first caller outside the aprender package, so that a
    warning raised deep inside a front end points at the user's line."""
    import os
    import sys

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


class SparsityPattern:
    """The structure a mask follows.  Construct with the class methods or :meth:`parse`;
    ``validate(mask)`` raises if a mask breaks it.  Patterns are compared and hashed by all of
    their fields (kind, n, m, axis, block).

    ``kind`` is one of:

    - ``"unstructured"``: any elements (:meth:`unstructured`, text ``"unstructured"``);
    - ``"per-row"``: per-row unstructured, the same count pruned in every row of the 2-D view
      (leading axes flattened into rows), as Wanda groups weights (:meth:`per_row`, text
      ``"per-row"``);
    - ``"nm"``: N kept in every group of M consecutive elements along ``axis``
      (:meth:`nm`, text ``"2:4"``); the axis is kept as given, so ``nm(2, 4)`` (the last axis)
      and ``nm(2, 4, axis=1)`` are different patterns even where they select the same groups;
    - ``"block"``: whole (h, w) blocks of the 2-D view (:meth:`block_pattern`, text
      ``"block:4x4"``);
    - ``"row"`` / ``"column"``: whole rows (output channels) / whole columns (input channels),
      structured (:meth:`rows`, :meth:`columns`, text ``"row"`` / ``"column"``).
    """

    KINDS = ("unstructured", "per-row", "nm", "block", "row", "column")
    __slots__ = ("kind", "n", "m", "block", "axis")

    def __init__(self, kind, n=None, m=None, block=None, axis=-1):
        if not isinstance(kind, str) or kind not in self.KINDS:
            raise InvalidPatternError(f"unknown sparsity pattern {short_repr(kind)}; one of "
                                      f"{self.KINDS}")
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
            raise InvalidShapeError(f"pattern axis must be an integer, got {short_repr(axis)}")
        axis = int(axis)
        if kind != "nm" and axis != -1:
            raise InvalidPatternError(f"axis={axis} applies to N:M patterns only, not {kind!r}")
        self.kind = kind
        self.n = self.m = self.block = None
        self.axis = axis
        if kind == "nm":
            self.n, self.m = check_nm(n, m)
        if kind == "block":
            if not (isinstance(block, tuple) and len(block) == 2):
                raise InvalidPatternError(f"block pattern needs (h, w), got {short_repr(block)}")
            try:
                h, w = (check_int(v, "block size", minimum=1) for v in block)
            except InvalidArgumentError as exc:
                raise InvalidPatternError(f"block pattern {short_repr(block)}: {exc}") from None
            self.block = (h, w)

    @classmethod
    def unstructured(cls):
        return cls("unstructured")

    @classmethod
    def per_row(cls):
        """Per-row unstructured: the same fraction pruned within every row."""
        return cls("per-row")

    @classmethod
    def nm(cls, n, m, axis=-1):
        return cls("nm", n=n, m=m, axis=axis)

    @classmethod
    def block_pattern(cls, h, w):
        return cls("block", block=(h, w))

    @classmethod
    def rows(cls):
        """Whole rows pruned (structured); see :meth:`per_row` for per-row unstructured."""
        return cls("row")

    @classmethod
    def columns(cls):
        return cls("column")

    @classmethod
    def parse(cls, text, *, legacy_row=False):
        """The one parser of pattern names (the object API, ``aprender.torch`` and the command
        line all use it): ``"unstructured"``, ``"per-row"``, ``"N:M"`` such as ``"2:4"`` (ASCII
        digits, along the last axis), ``"block:HxW"`` such as ``"block:4x4"``, ``"row"`` (whole
        rows) or ``"column"`` (whole columns); case and surrounding spaces are ignored.

        ``legacy_row=True`` is for the front ends where ``"row"`` used to mean per-row
        unstructured (``aprender.torch.prune_``, the command line): there ``"row"`` is read as
        ``"per-row"`` with a DeprecationWarning."""
        if isinstance(text, SparsityPattern):
            return text
        if not isinstance(text, str):
            raise InvalidPatternError(f"pattern must be a string, got {type(text).__name__} "
                                      f"{short_repr(text)}")
        if len(text) > _MAX_PATTERN_TEXT:
            raise InvalidPatternError(f"invalid pattern {short_repr(text)} ({len(text)} "
                                      f"characters): use {_PATTERN_HELP}")
        t = text.strip().lower()
        if t == "row" and legacy_row:
            warnings.warn("pattern 'row' is deprecated here: it means per-row unstructured, "
                          "now spelled 'per-row' ('row' elsewhere prunes whole rows)",
                          DeprecationWarning, stacklevel=_outside_aprender())
            return cls("per-row")
        if t in ("unstructured", "per-row", "row", "column"):
            return cls(t)
        mt = _BLOCK_TEXT.fullmatch(t)
        if mt:
            return cls("block", block=(int(mt.group(1)), int(mt.group(2))))
        if t.startswith("block"):
            raise InvalidPatternError(f"block pattern must look like 'block:4x4', got "
                                      f"{short_repr(text)}")
        mt = _NM_TEXT.fullmatch(t)
        if mt:
            try:
                return cls("nm", n=int(mt.group(1)), m=int(mt.group(2)))
            except InvalidPatternError as exc:
                raise InvalidPatternError(f"invalid pattern {short_repr(text)}: {exc}") from None
        raise InvalidPatternError(f"invalid pattern {short_repr(text)}: use {_PATTERN_HELP}")

    # --- what a front end asks about a pattern ----------------------------------------------

    @property
    def is_unstructured(self):
        """True for "unstructured" only (not per-row)."""
        return self.kind == "unstructured"

    @property
    def is_per_row(self):
        """True for per-row unstructured (Wanda's grouping), not for whole-row pruning."""
        return self.kind == "per-row"

    @property
    def is_nm(self):
        """True for N:M; then ``n``, ``m`` and ``axis`` describe it."""
        return self.kind == "nm"

    @property
    def theoretical_sparsity(self):
        """1 - N/M for N:M patterns, None for the others (their sparsity is chosen freely)."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def resolve_sparsity(self, sparsity=None):
        """The sparsity to prune to, as a float: for N:M, 1 - N/M (a ``sparsity`` given as well
        must agree with it); for the other patterns ``sparsity`` is required and checked."""
        if self.kind == "nm":
            implied = 1.0 - self.n / self.m
            if sparsity is not None and abs(check_sparsity(sparsity) - implied) > 1e-9:
                raise InvalidSparsityError(f"sparsity={short_repr(sparsity)} contradicts pattern "
                                           f"{self} (which prunes {implied:g})")
            return implied
        if sparsity is None:
            raise InvalidSparsityError(f"pattern {self} needs a sparsity")
        return check_sparsity(sparsity)

    def _key(self):
        return (self.kind, self.n, self.m, self.axis if self.kind == "nm" else None, self.block)

    def __eq__(self, other):
        return isinstance(other, SparsityPattern) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __str__(self):
        if self.kind == "nm":
            return f"{self.n}:{self.m}" + ("" if self.axis == -1 else f" along axis {self.axis}")
        if self.kind == "block":
            return f"block {self.block[0]}x{self.block[1]}"
        return self.kind

    def __repr__(self):
        if self.kind == "nm":
            axis = "" if self.axis == -1 else f", axis={self.axis}"
            return f"SparsityPattern.nm({self.n}, {self.m}{axis})"
        if self.kind == "block":
            return f"SparsityPattern.block_pattern({self.block[0]}, {self.block[1]})"
        method = {"unstructured": "unstructured", "per-row": "per_row", "row": "rows",
                  "column": "columns"}[self.kind]
        return f"SparsityPattern.{method}()"

    def check_shape(self, shape):
        """Raise if an array of this shape cannot carry the pattern."""
        if self.kind == "nm":
            axis = check_axis(self.axis, len(shape))
            if shape[axis] % self.m:
                raise InvalidPatternError(
                    f"{self} pattern: axis {axis} of shape {tuple(shape)} has length {shape[axis]}, "
                    f"not divisible by M={self.m}")
        elif self.kind != "unstructured":
            rows, cols = _as_2d_shape(shape)
            if self.kind == "block":
                h, w = self.block
                if rows % h or cols % w:
                    raise InvalidPatternError(
                        f"block ({h}, {w}) does not tile shape {tuple(shape)} (seen as "
                        f"{rows}x{cols})")

    def count_groups(self, mask):
        """(groups that satisfy the pattern, total groups): for N:M the groups that keep N; for
        block/row/column the blocks that are uniformly kept or pruned; for per-row the rows
        that keep the most common count; unstructured: (size, size)."""
        keep = _keep_bytes(mask)
        shape = keep.shape
        if self.kind == "unstructured":
            return keep.size, keep.size
        self.check_shape(shape)
        if self.kind == "nm":
            axis = check_axis(self.axis, len(shape))
            outer = int(np.prod(shape[:axis], dtype=np.int64))
            inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
            total = keep.size // self.m
            bad = _nmk.nm_check(keep.reshape(-1), outer, shape[axis], inner, self.n, self.m)
            return total - bad, total
        rows, cols = _as_2d_shape(shape)
        if self.kind == "per-row":
            if keep.size == 0:
                return rows, rows
            kept = np.count_nonzero(keep.reshape(rows, cols), axis=1)
            return int(np.bincount(kept).max()), rows
        h, w = self._block_for(rows, cols)
        if keep.size == 0:
            return 0, 0
        k2 = keep.reshape(rows // h, h, cols // w, w)
        mins = k2.min(axis=(1, 3))
        maxs = k2.max(axis=(1, 3))
        return int(np.count_nonzero(mins == maxs)), int(mins.size)

    def _block_for(self, rows, cols):
        if self.kind == "row":
            return 1, cols
        if self.kind == "column":
            return rows, 1
        return self.block

    def validate(self, mask):
        """Raise InvalidPatternError if mask breaks the pattern; return True otherwise."""
        keep = _keep_bytes(mask)
        if self.kind == "unstructured":
            return True
        self.check_shape(keep.shape)
        if keep.size == 0:
            return True
        ok, total = self.count_groups(keep)
        if ok != total:
            if self.kind == "nm":
                what = f"groups keep other than N={self.n}"
            elif self.kind == "per-row":
                what = "rows keep a different count than the others"
            else:
                what = "blocks are partly pruned in it"
            raise InvalidPatternError(f"mask breaks the {self} pattern: {total - ok} of {total} "
                                      f"{what}")
        return True


def _as_2d_shape(shape):
    if len(shape) == 0:
        raise InvalidShapeError("structured patterns need at least a 1-d array, got a 0-d array")
    if len(shape) == 1:
        return 1, int(shape[0])
    return int(np.prod(shape[:-1], dtype=np.int64)), int(shape[-1])


def _keep_bytes(mask):
    """A contiguous bool view of a mask (SparsityMask, bool array or 0/1 numbers)."""
    if isinstance(mask, SparsityMask):
        return mask.keep
    keep = as_array(mask, "mask")
    if keep.ndim == 0:  # np.ascontiguousarray would silently make it 1-d
        raise InvalidShapeError("a mask needs at least a 1-d array, got a 0-d array")
    if keep.dtype != np.bool_:
        if keep.dtype.kind not in "biuf":
            raise InvalidDTypeError(f"mask must be boolean or 0/1 numbers, got {keep.dtype}")
        keep = keep != 0
    return np.ascontiguousarray(keep)


class SparsityMask:
    """A boolean keep-mask (True = keep) and the pattern that made it."""

    __slots__ = ("_keep", "pattern")

    def __init__(self, mask, pattern=None, *, _trusted=False):
        if pattern is None:
            pattern = SparsityPattern.unstructured()
        if not isinstance(pattern, SparsityPattern):
            raise InvalidPatternError(f"pattern must be a SparsityPattern, got "
                                      f"{short_repr(pattern)}")
        if _trusted:
            keep = mask
        else:
            keep = as_array(mask, "mask")
            if keep.ndim == 0:
                raise InvalidShapeError("a SparsityMask needs at least a 1-d array, got a 0-d array")
            if keep.dtype != np.bool_:
                if keep.dtype.kind not in "biuf":
                    raise InvalidDTypeError(f"mask must be boolean or 0/1 numbers, got {keep.dtype}")
                if keep.size and not np.all((keep == 0) | (keep == 1)):
                    raise InvalidPatternError("mask must be binary: found values other than 0 and 1")
                keep = keep != 0
            keep = np.ascontiguousarray(keep)
            if keep.size:
                # a bool array viewed from other bytes may hold values other than 0/1
                raw = keep.view(np.uint8)
                if raw.max() > 1:
                    keep = raw != 0
            pattern.validate(keep)
        self._keep = keep
        self.pattern = pattern

    @property
    def keep(self):
        """The boolean keep-mask (read it; do not write it)."""
        return self._keep

    @property
    def shape(self):
        return self._keep.shape

    @property
    def size(self):
        return self._keep.size

    def __array__(self, dtype=None, copy=None):
        return self._keep if dtype is None else self._keep.astype(dtype)

    def nnz(self):
        """Kept (non-zero) elements."""
        if self._keep.size == 0:
            return 0
        return int(_apply.count_nonzero_u8(self._keep.reshape(-1).view(np.uint8),
                                           resolve_threads(None)))

    def num_zeros(self):
        """Pruned elements."""
        return self._keep.size - self.nnz()

    def sparsity(self):
        """Fraction pruned (0.0 for an empty mask)."""
        return self.num_zeros() / self._keep.size if self._keep.size else 0.0

    def apply(self, weights, *, n_threads=None):
        """Zero the pruned elements of ``weights`` in place (any dtype; NaN weights that are
        pruned become 0).  Returns ``weights``."""
        nt = resolve_threads(n_threads)
        target = weights
        if isinstance(weights, np.ndarray):
            arr = weights
        elif hasattr(weights, "bits") and hasattr(weights, "format"):
            arr = weights.bits
        elif is_torch(weights):
            view = to_numpy_view(weights)
            arr = view.bits if hasattr(view, "bits") else view
        else:
            raise InvalidDTypeError(f"apply needs a numpy array (or torch tensor) to modify in "
                                    f"place, got {type(weights).__name__}")
        if arr.shape != self._keep.shape:
            raise ShapeMismatchError(f"mask shape {self._keep.shape} does not match weights shape "
                                     f"{arr.shape}")
        if not arr.flags.writeable:
            raise ReadOnlyError("apply modifies weights in place, but the array is read-only")
        if arr.dtype.kind not in "fiubcV" or arr.dtype.hasobject:
            raise InvalidDTypeError(f"apply cannot zero elements of dtype {arr.dtype}")
        if arr.size == 0:
            return target
        size = arr.dtype.itemsize
        words = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
        if size not in words:
            raise InvalidDTypeError(f"apply supports element sizes 1, 2, 4 and 8 bytes, got {arr.dtype}")
        if arr.flags.c_contiguous:
            _apply.apply_mask(arr.reshape(-1).view(words[size]), self._keep.reshape(-1).view(np.uint8),
                              nt)
        elif arr.flags.f_contiguous:
            _apply.apply_mask(arr.T.reshape(-1).view(words[size]),
                              np.ascontiguousarray(self._keep.T).reshape(-1).view(np.uint8), nt)
        else:
            # strided view: a single masked assignment (numpy) rather than a copy-back
            np.copyto(arr.view(words[size]), 0, where=~self._keep)
        return target

    def __repr__(self):
        return (f"SparsityMask(shape={self.shape}, pattern={self.pattern}, "
                f"sparsity={self.sparsity():.4f})")


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------

def _out_mask(out, shape):
    """A caller's ``out=`` buffer (reused to avoid fresh pages for every mask) or a new one."""
    if out is None:
        return np.empty(shape, dtype=np.bool_)
    if not (isinstance(out, np.ndarray) and out.dtype == np.bool_ and out.shape == tuple(shape)
            and out.flags.c_contiguous and out.flags.writeable):
        raise InvalidArgumentError(f"out must be a writeable C-contiguous bool array of shape "
                                   f"{tuple(shape)}, got {short_repr(out)}")
    return out


def _unstructured(f, sparsity, per_row, magnitude, nt, name, out=None):
    n = f.size
    keep = _out_mask(out, f.shape)
    if n == 0:
        return keep
    src, flat = ArraySource(f, name), keep.reshape(-1).view(np.uint8)
    if per_row:
        rows, cols = _as_2d_shape(f.shape)
        select_rows(src, flat, rows, cols, prune_count(sparsity, cols), magnitude, nt)
    else:
        select_mask(src, flat, prune_count(sparsity, n), magnitude, nt)
    return keep


def row_counts(count, rows):
    """How ``count`` pruned elements spread over ``rows`` rows as evenly as integers allow:
    ``(q, r)`` where every row prunes ``q`` and the first ``r`` rows one more
    (``count == q * rows + r``)."""
    return divmod(count, rows) if rows else (0, 0)


def per_row_count_mask(values, count, *, first_row=0, total_rows=None, magnitude=False,
                       n_threads=None, out=None):
    """A per-row mask pruning exactly ``count`` elements of a tensor: row ``i`` prunes its
    ``q + (i < r)`` smallest values, ``(q, r) = row_counts(count, total_rows)`` (so rows
    differ by at most one, and the first rows take the remainder), ties pruning the lowest
    index first.  This is how a per-layer count (OWL's) is honoured with the per-row pattern:
    ``generate_unstructured_mask(values, count / size, per_row=True)`` prunes
    ``rows * round(count / rows)`` instead.

    ``values``: importance scores (``magnitude=True``: weights, ranked by |w|) with the rows
    along the leading axes; they may be rows ``[first_row, first_row + rows)`` of a tensor of
    ``total_rows`` rows (default: the whole tensor), so a tensor scored a chunk of rows at a
    time gets the mask it would get in one piece.  ``out``: as for
    :func:`generate_unstructured_mask`."""
    f = as_floats(values, "weights" if magnitude else "values")
    magnitude = check_bool(magnitude, "magnitude")
    nt = resolve_threads(n_threads)
    rows, cols = _as_2d_shape(f.shape) if f.array.ndim else (0, 0)
    total_rows = rows if total_rows is None else check_int(total_rows, "total_rows", minimum=0)
    first_row = check_int(first_row, "first_row", minimum=0)
    if first_row + rows > total_rows:
        raise InvalidShapeError(f"rows [{first_row}, {first_row + rows}) of values lie outside "
                                f"a tensor of {total_rows} rows")
    count = check_int(count, "count", minimum=0)
    if count > total_rows * cols:
        raise InvalidArgumentError(f"count {short_repr(count)} exceeds the {total_rows * cols} "
                                   f"elements of a tensor of {total_rows} rows of {cols}")
    keep = _out_mask(out, f.shape)
    if f.size == 0:
        return SparsityMask(keep, SparsityPattern.per_row(), _trusted=True)
    q, r = row_counts(count, total_rows)
    extra = min(max(r - first_row, 0), rows)  # rows of this piece that prune q + 1
    kern, flat = f.kernel.reshape(rows, cols), keep.reshape(-1).view(np.uint8)
    arr = f.array.reshape(rows, cols)
    for a, b, k in ((0, extra, q + 1), (extra, rows, q)):
        if b > a:
            part = Floats(arr[a:b], kern[a:b], f.fmt, f.dtype_name)
            select_rows(ArraySource(part, "weights" if magnitude else "values"),
                        flat[a * cols:b * cols], b - a, cols, k, int(magnitude), nt)
    return SparsityMask(keep, SparsityPattern.per_row(), _trusted=True)


def _unstructured_pattern(per_row):
    return SparsityPattern.per_row() if per_row else SparsityPattern.unstructured()


def generate_unstructured_mask(values, sparsity, *, per_row=False, n_threads=None, out=None):
    """Prune the ``round(sparsity * n)`` smallest importance values (halves round down; among
    equal values the lowest flat C-order index is pruned first).  ``per_row=True`` is per-row
    unstructured: the same count within each row along the last axis, and the mask carries
    ``SparsityPattern.per_row()``.  ``values`` are importance scores (an array or
    ImportanceScores): larger means more important.  ``out``: a bool array of the values'
    shape to write the mask into (the SparsityMask then holds it), so callers that prune many
    tensors reuse its pages."""
    sparsity = check_sparsity(sparsity)
    per_row = check_bool(per_row, "per_row")
    f = as_floats(values, "values")
    nt = resolve_threads(n_threads)
    keep = _unstructured(f, sparsity, per_row, 0, nt, "values", out)
    return SparsityMask(keep, _unstructured_pattern(per_row), _trusted=True)


def magnitude_mask(weights, sparsity, *, per_row=False, n_threads=None, out=None):
    """Fast path from raw weights: the unstructured (or with ``per_row=True`` per-row) mask of
    |weights| (same as L1 or L2 scores) without materialising a scores array.  ``out``: as for
    :func:`generate_unstructured_mask`."""
    sparsity = check_sparsity(sparsity)
    per_row = check_bool(per_row, "per_row")
    f = as_floats(weights, "weights")
    nt = resolve_threads(n_threads)
    keep = _unstructured(f, sparsity, per_row, 1, nt, "weights", out)
    return SparsityMask(keep, _unstructured_pattern(per_row), _trusted=True)


def _nm(f, n, m, axis, magnitude, nt, name, out=None):
    n, m = check_nm(n, m)
    keep = _out_mask(out, f.shape)
    given, axis = axis, check_axis(axis, f.array.ndim)
    pattern = SparsityPattern.nm(n, m, axis=int(given))  # the axis as the caller named it
    pattern.check_shape(f.shape)
    if f.size == 0:
        return SparsityMask(keep, pattern, _trusted=True)
    shape = f.shape
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    bad = _nmk.nm_mask(f.kernel.reshape(-1), outer, shape[axis], inner, n, m, magnitude, f.inf16,
                      keep.reshape(-1).view(np.uint8), nt)
    if bad:
        raise_nonfinite([ArraySource(f, name)], nt)
    return SparsityMask(keep, pattern, _trusted=True)


def generate_nm_mask(values, n, m, *, axis=-1, n_threads=None, out=None):
    """Keep the n largest values of every group of m consecutive elements along ``axis`` (ties
    prune the lowest index first).  The axis length must be divisible by m.  ``out``: as for
    :func:`generate_unstructured_mask`."""
    f = as_floats(values, "values")
    return _nm(f, n, m, axis, 0, resolve_threads(n_threads), "values", out)


def magnitude_nm_mask(weights, n, m, *, axis=-1, n_threads=None, out=None):
    """N:M mask straight from raw weights by |w| (no scores array).  ``out``: as for
    :func:`generate_unstructured_mask`."""
    f = as_floats(weights, "weights")
    return _nm(f, n, m, axis, 1, resolve_threads(n_threads), "weights", out)


def layer_magnitude_mask(weights, pattern, sparsity=None, n=None, m=None, *, n_threads=None,
                         out=None):
    """The layer-scope mask of raw weights by |w|: one entry point for the command line and the
    torch interop.  ``pattern`` is a SparsityPattern (or text for :meth:`SparsityPattern.parse`):
    unstructured, per-row or N:M (``sparsity`` then implied: if given it must agree).  ``out``:
    a bool array of the weights' shape to write the mask into (see
    :func:`generate_unstructured_mask`).

    Deprecated form, kept for callers written before SparsityPattern.parse: a kind string
    "unstructured", "row" (per-row unstructured here) or "nm" with ``n`` and ``m``."""
    if isinstance(pattern, str) and pattern in ("row", "nm"):
        pattern = SparsityPattern.per_row() if pattern == "row" else SparsityPattern.nm(n, m)
    pattern = SparsityPattern.parse(pattern)
    sparsity = pattern.resolve_sparsity(sparsity)
    if pattern.is_nm:
        return magnitude_nm_mask(weights, pattern.n, pattern.m, axis=pattern.axis,
                                 n_threads=n_threads, out=out)
    if not (pattern.is_unstructured or pattern.is_per_row):
        raise InvalidPatternError(f"layer pattern must be unstructured, per-row or N:M, got "
                                  f"{pattern}")
    return magnitude_mask(weights, sparsity, per_row=pattern.is_per_row, n_threads=n_threads,
                          out=out)


def generate_global_mask(values, sparsity, *, n_threads=None, max_tensor_sparsity=None,
                         out=None):
    """One exact count over many tensors: prune ``round(sparsity * total)`` smallest values across
    all of them (ties: earlier tensor, then lower flat index, pruned first), without concatenating.

    ``values``: a mapping name -> array (returns a dict of SparsityMask) or a sequence (returns a
    list).  Tensors of different float dtypes are compared exactly in the widest one.
    ``max_tensor_sparsity``: cap on any one tensor's pruned fraction; the overall count stays exact,
    the excess is taken from the other tensors.  ``out``: bool arrays to write the masks into,
    one per tensor in the same order (a sequence) or under the same names (a mapping), each
    as for :func:`generate_unstructured_mask`."""
    sparsity = check_sparsity(sparsity)
    nt = resolve_threads(n_threads)
    if isinstance(values, dict) or hasattr(values, "keys"):
        names = list(values.keys())
        items = [values[k] for k in names]
    elif isinstance(values, (list, tuple)):
        names = None
        items = list(values)
    else:
        raise InvalidDTypeError("generate_global_mask needs a mapping name -> array or a sequence "
                                f"of arrays, got {type(values).__name__}")
    labels = names if names is not None else [f"values[{i}]" for i in range(len(items))]
    floats = [as_floats(v, str(lbl)) for v, lbl in zip(items, labels)]
    floats = common_dtype(floats)
    if out is None:
        keeps = [np.empty(f.shape, dtype=np.bool_) for f in floats]
    else:
        if names is not None:
            if not hasattr(out, "keys") or set(out.keys()) != set(names):
                raise InvalidArgumentError("out must be a mapping with the same names as values")
            outs = [out[k] for k in names]
        else:
            if not isinstance(out, (list, tuple)) or len(out) != len(floats):
                raise InvalidArgumentError(f"out must be a sequence of {len(floats)} bool "
                                           f"arrays, got {short_repr(out)}")
            outs = list(out)
        keeps = [_out_mask(o, f.shape) for o, f in zip(outs, floats)]
    cap = None
    if max_tensor_sparsity is not None:
        cap = check_sparsity(max_tensor_sparsity, "max_tensor_sparsity")
    select_global([ArraySource(f, str(lbl)) for f, lbl in zip(floats, labels)],
                  [kp.reshape(-1).view(np.uint8) for kp in keeps], sparsity, nt, magnitude=0,
                  cap=cap)
    masks = [SparsityMask(kp, SparsityPattern.unstructured(), _trusted=True) for kp in keeps]
    return dict(zip(names, masks)) if names is not None else masks


class _BlockScores(ArraySource):
    """Float64 block sums as a selection source: a non-finite sum is an overflow, named by
    block."""

    __slots__ = ("block",)

    def __init__(self, sums, block):
        super().__init__(as_floats(sums, "block scores"), "block scores")
        self.block = block

    def raise_nonfinite(self, nt):
        sums = self.floats.array
        i = int(np.argmax(~np.isfinite(sums.reshape(-1))))
        blk = tuple(int(v) for v in np.unravel_index(i, sums.shape))
        h, w = self.block
        raise NumericalInstabilityError(
            f"the float64 sum of block {blk} (size {h}x{w}) of values overflows; "
            "scale the values down", index=blk, value="inf")


def _structured(values, sparsity, block_of, pattern_of, n_threads, out=None):
    sparsity = check_sparsity(sparsity)
    f = as_floats(values, "values")
    nt = resolve_threads(n_threads)
    keep = _out_mask(out, f.shape)
    if f.size == 0:
        return SparsityMask(keep, pattern_of(f.shape), _trusted=True)
    rows, cols = _as_2d_shape(f.shape)
    h, w = block_of(rows, cols)
    pattern = pattern_of(f.shape)
    pattern.check_shape(f.shape)
    require_finite([ArraySource(f, "values")], nt)
    sums = np.empty((rows // h, cols // w), dtype=np.float64)
    _select.block_sums(f.kernel.reshape(rows, cols), h, w, f.fmt, sums, nt)
    bkeep = np.empty(sums.shape, dtype=np.bool_)
    select_mask(_BlockScores(sums, (h, w)), bkeep.reshape(-1).view(np.uint8),
                prune_count(sparsity, sums.size), 0, nt)
    _select.expand_blocks(bkeep.view(np.uint8), h, w, keep.reshape(rows, cols).view(np.uint8), nt)
    return SparsityMask(keep, pattern, _trusted=True)


def generate_block_mask(values, sparsity, block=(4, 4), *, n_threads=None, out=None):
    """Prune whole (h, w) blocks of the 2-D view (leading axes flattened into rows): blocks are
    scored by the sum of their importance values (the L1 norm for L1 scores, the squared L2 norm
    for L2 scores) and the round(sparsity * blocks) lowest are pruned (ties: lowest block index).
    ``out``: as for :func:`generate_unstructured_mask`."""
    if not (isinstance(block, (tuple, list)) and len(block) == 2):
        raise InvalidPatternError(f"block must be a pair (h, w), got {block!r}")
    try:
        h, w = (check_int(v, "block size", minimum=1) for v in block)
    except InvalidArgumentError as exc:
        raise InvalidPatternError(f"block {tuple(block)!r}: {exc}") from None
    return _structured(values, sparsity, lambda r, c: (h, w),
                       lambda s: SparsityPattern.block_pattern(h, w), n_threads, out)


def generate_row_mask(values, sparsity, *, n_threads=None, out=None):
    """Prune whole rows (output channels), scored by the sum of their importance values.
    ``out``: as for :func:`generate_unstructured_mask`."""
    return _structured(values, sparsity, lambda r, c: (1, c), lambda s: SparsityPattern.rows(),
                       n_threads, out)


def generate_column_mask(values, sparsity, *, n_threads=None, out=None):
    """Prune whole columns (input channels), scored by the sum of their importance values.
    ``out``: as for :func:`generate_unstructured_mask`."""
    return _structured(values, sparsity, lambda r, c: (r, 1), lambda s: SparsityPattern.columns(),
                       n_threads, out)
