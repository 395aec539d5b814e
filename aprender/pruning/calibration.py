"""Calibration statistics: what Wanda (and later SparseGPT) need to know about a layer's inputs.

:class:`ActivationStats` accumulates, for one layer with ``in_features`` inputs, the float64 sum
of squares of every input feature over the tokens seen and the token count (and, on request,
XᵀX in float64).  :class:`CalibrationContext` maps layer names to their statistics and reads
and writes them as one safetensors file, so statistics collected on several machines can be
merged.

Precision and reproducibility of the sums of squares: the squares of float16, bfloat16 and
float32 activations are exact in float64; the sums round in a fixed order (rows in chunks of a
size fixed by the row length, each chunk summed row after row, chunks folded in order), so a
result never depends on the thread count or the machine's core count.  Statistics of one batch
split in two and merged equal those of one pass up to float64 rounding of the sums (relative
differences of order 1e-16 times the number of chunks), not bit for bit; the float32 Wanda
scales derived from them practically always agree exactly.

Hessians (SparseGPT): layers that read the same input (query/key/value, gate/up) share one XᵀX.
In memory they hold the same array, copied on the first write that would make them differ (an
update or merge of one of them alone); in a calibration file it is stored once, in float32, under
the first such layer, and ``__metadata__["hessian_of"]`` (JSON) maps every other layer to it.

Model-level statistics (format 2, for structured pruning): per transformer block, the sum over
calibration tokens of ``cos(h_in, h_out)`` and the token count (:class:`BlockStats`: block
influence ``BI = 1 - mean cos``, ShortGPT); per routed MoE expert, the tokens routed to it and the
sum over those tokens of ``gate weight * ||expert output||_2`` (:class:`ExpertStats`: the REAP
saliency is their mean).  Blocks and experts are named by their checkpoint prefix
(``model.layers.3``, ``model.layers.3.mlp.experts.7``).  Files of format 1 read as before.
"""
import difflib
import errno
import json
import math
import numbers
import os
import re
import stat
from collections.abc import Mapping

import numpy as np

from .._adapters import is_torch, to_numpy_view
from .._kernels import calib as _calib
from .._threads import limit_pools
from .._validation import (ABS16, BF16, F16, INF16, SIGN16, Bits16, _is_bf16, as_array, check_int,
                           decode16, format_bytes, require_memory, resolve_threads, short_repr,
                           size_text as _size_text)
from ..errors import (CalibrationError, CalibrationFileError, CheckpointError,
                      InsufficientMemoryError, InvalidArgumentError, InvalidDTypeError,
                      InvalidShapeError, MissingActivationStatsError, NumericalInstabilityError,
                      ShapeMismatchError, UnsafePathError)

__all__ = ["ActivationStats", "BlockStats", "CalibrationContext", "ExpertStats",
           "CALIBRATION_FORMAT"]

CALIBRATION_FORMAT = "aprender.calibration/2"
_READABLE_FORMATS = ("aprender.calibration/1", CALIBRATION_FORMAT)
_SUFFIXES = ("sum_squares", "count", "hessian")
# model-level statistics: suffix -> (group, field, dtype)
_MODEL_SUFFIXES = {"block_cos_sum": ("block", "cos_sum", "F64"),
                   "block_tokens": ("block", "tokens", "I64"),
                   "expert_tokens": ("expert", "tokens", "I64"),
                   "expert_reap_sum": ("expert", "reap_sum", "F64")}
_INT64_MAX = (1 << 63) - 1
_HESSIAN_BLOCK = 1 << 22  # elements of one float32/float64 block of rows for XᵀX
_F32_SAFE = 3.0e38  # below float32's largest value (3.4e38) with room for rounding


class _Rows:
    """Activations as a 2-D (rows, in_features) kernel view without a float64 copy: float32,
    float64 or uint16 bit patterns (fmt F16/BF16), inner axis contiguous."""

    __slots__ = ("kernel", "fmt", "dtype_name", "shape", "inf16")

    def __init__(self, x, in_features, name):
        if is_torch(x):
            x = to_numpy_view(x)
        if isinstance(x, Bits16):
            arr = x.bits
            self.fmt = BF16 if x.format == "bfloat16" else F16
            self.dtype_name = x.format
        else:
            arr = as_array(x, name)
            dt = arr.dtype
            if _is_bf16(dt):
                self.fmt, self.dtype_name = BF16, "bfloat16"
            elif dt.kind == "f" and dt.itemsize in (2, 4, 8):
                self.fmt = F16 if dt.itemsize == 2 else 0
                self.dtype_name = {2: "float16", 4: "float32", 8: "float64"}[dt.itemsize]
            else:
                raise InvalidDTypeError(
                    f"{name}: expected floating activations (float16, bfloat16, float32 or "
                    f"float64), got dtype {dt}" + (" (wrap raw bfloat16 bits in aprender.Bits16)"
                                                   if dt == np.uint16 else ""))
        if arr.ndim == 0:
            raise InvalidShapeError(f"{name}: expected activations of shape (..., "
                                    f"{in_features}), got a 0-d array")
        if arr.shape[-1] != in_features:
            raise ShapeMismatchError(
                f"{name} has shape {tuple(arr.shape)} but the statistics are of {in_features} "
                f"input features: expected shape (..., {in_features})")
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        self.shape = tuple(arr.shape)
        if self.fmt:
            arr = arr.view(np.uint16)
        x2 = arr.reshape(-1, in_features)  # a view where the strides allow it
        if x2.shape[1] > 1 and x2.strides[1] != x2.itemsize:
            x2 = np.ascontiguousarray(x2)  # one copy in the input's own dtype
        self.kernel = x2
        self.inf16 = INF16.get(self.fmt, 0)

    def floats(self, rows):
        """The rows (an index array or slice) as float32 (float64 for float64 input)."""
        blk = self.kernel[rows]
        return decode16(np.ascontiguousarray(blk), self.fmt) if self.fmt else blk

    def raise_nonfinite(self, rows, name):
        """NumericalInstabilityError naming the first NaN/infinity among ``rows`` (None: all),
        or the float64 overflow when there is none."""
        sel = self.kernel if rows is None else self.kernel[rows]
        bad = (sel & self.inf16) == self.inf16 if self.fmt else ~np.isfinite(sel)
        if bad.any():
            r, j = np.unravel_index(int(np.argmax(bad)), bad.shape)
            row = int(r) if rows is None else int(rows[r])
            idx = tuple(int(v) for v in np.unravel_index(row, self.shape[:-1])) + (int(j),)
            if self.fmt:
                raw = int(sel[r, j])
                kind = "NaN" if raw & ABS16 > self.inf16 else ("-inf" if raw & SIGN16 else "inf")
            else:
                v = float(sel[r, j])
                kind = "NaN" if math.isnan(v) else ("-inf" if v < 0 else "inf")
            raise NumericalInstabilityError(
                f"{name} contains {kind} at index {idx}; activation statistics need finite "
                "values", index=idx, value=kind)
        raise NumericalInstabilityError(
            f"the sum of squares of {name} overflows float64 (activations of magnitude above "
            "about 1e154)", value="inf")


def _where_rows(where, shape, name):
    """Row indices selected by a boolean (or 0/1 integer) mask of shape ``shape``."""
    if is_torch(where):
        where = where.detach().cpu().numpy()
    w = as_array(where, "where")
    if tuple(w.shape) != tuple(shape):
        raise ShapeMismatchError(f"where has shape {tuple(w.shape)} but {name} has leading "
                                 f"shape {tuple(shape)} (one flag per token)")
    if w.dtype != np.bool_:
        if w.dtype.kind not in "iu":
            raise InvalidDTypeError(f"where must be a boolean (or 0/1 integer) mask, got dtype "
                                    f"{w.dtype}")
        if w.size and ((w != 0) & (w != 1)).any():
            raise InvalidArgumentError("where must hold only 0 and 1 (or True and False)")
    return np.flatnonzero(w.reshape(-1)).astype(np.intp, copy=False)


class ActivationStats:
    """Running statistics of one layer's inputs (activations of shape ``(..., in_features)``).

    ``update(x)`` adds a batch: float16, bfloat16 (ml_dtypes, ``aprender.Bits16`` or
    ``torch.bfloat16``), float32 or float64 numpy arrays or CPU torch tensors, read in place
    (16-bit floats are converted in registers, never copied to float64).  Kept in float64:
    ``sum_squares[j] = Σ_tokens x[t, j]²``, ``count`` (tokens), and with ``hessian=True`` also
    ``hessian = XᵀX`` (each block of rows multiplied by numpy's BLAS in float32 — float64 for
    float64 activations — and the blocks summed in float64; as BLAS-dependent as any matmul).

    The arrays returned by ``sum_squares`` and ``hessian`` are read-only views of the running
    sums (later updates change them: copy to keep a snapshot).  Not thread-safe: one updater
    at a time.  An update that fails (a NaN, a shape mismatch) leaves the statistics unchanged.

    Memory: ``8 * in_features`` bytes, plus ``8 * in_features**2`` with ``hessian=True`` (and
    a float32 block product of ``4 * in_features**2`` during an update).  Sizes no array can
    address raise InvalidArgumentError, sizes beyond this machine's physical memory
    InsufficientMemoryError (a MemoryError too), both naming the size and the bytes needed and
    raised before anything is allocated; an allocation the system refuses raises
    InsufficientMemoryError as well.
    """

    __slots__ = ("_d", "_ss", "_count", "_h", "_hshared", "_origin")

    def __init__(self, in_features, *, hessian=False):
        d = check_int(in_features, "in_features", minimum=1)
        if not isinstance(hessian, (bool, np.bool_)):
            raise InvalidArgumentError(f"hessian must be True or False, got "
                                       f"{short_repr(hessian)}")
        what = f"ActivationStats(in_features={_size_text(d)}{', hessian=True' if hessian else ''})"
        need = 8 * d + (8 * d * d if hessian else 0)
        require_memory(need, what)
        try:
            self._ss = np.zeros(d, dtype=np.float64)
            self._h = np.zeros((d, d), dtype=np.float64) if hessian else None
        except MemoryError:
            raise InsufficientMemoryError(f"{what}: cannot allocate {format_bytes(need)}") \
                from None
        self._d = d
        self._count = 0
        self._hshared = False  # _h is also another layer's: copy before writing to it
        self._origin = None  # "layer 'x' of calibration file 'f'" for statistics read from one

    # -- construction from stored arrays ----------------------------------------------------
    @classmethod
    def from_arrays(cls, sum_squares, count, hessian=None):
        """Statistics from stored arrays (copied), validated: a 1-D float64 array of finite,
        non-negative sums; an integer count >= 0 (0 only with all sums 0); an optional
        (in, in) Hessian of finite values with a non-negative diagonal.  Raises
        CalibrationError naming the problem.  The Hessian is checked and copied a block of
        rows at a time (a memory-mapped one is read once, with no full-size temporary)."""
        ss = _stored(sum_squares, "sum_squares")
        if ss.ndim != 1 or ss.size == 0:
            raise CalibrationError(f"sum_squares must be a non-empty 1-D array, got shape "
                                   f"{ss.shape}")
        if ss.dtype != np.float64:
            raise CalibrationError(f"sum_squares must be float64, got {ss.dtype}")
        if not np.isfinite(ss).all():
            raise CalibrationError("sum_squares holds NaN or infinity")
        if (ss < 0).any():
            raise CalibrationError(f"sum_squares holds a negative sum "
                                   f"({float(ss[np.argmax(ss < 0)])!r}); sums of squares are "
                                   ">= 0")
        if isinstance(count, np.ndarray) and count.ndim == 0:
            count = count[()]
        if isinstance(count, (bool, np.bool_)) or not isinstance(count, numbers.Integral):
            raise CalibrationError(f"count must be an integer, got {short_repr(count)}")
        count = int(count)
        if count < 0 or count > _INT64_MAX:
            raise CalibrationError(f"count must be in [0, 2**63), got {_size_text(count)}")
        if count == 0 and ss.any():
            raise CalibrationError("count is 0 but sum_squares is not all zero")
        h = None
        if hessian is not None:
            h = _stored(hessian, "hessian")
            if h.shape != (ss.size, ss.size):
                raise CalibrationError(f"hessian has shape {h.shape}, expected "
                                       f"({ss.size}, {ss.size}) for {ss.size} input features")
            if h.dtype not in (np.float32, np.float64):
                raise CalibrationError(f"hessian must be float32 or float64, got {h.dtype}")
        out = cls(ss.size, hessian=h is not None)
        out._ss[:] = ss
        out._count = count
        if h is not None:
            d = ss.size
            step = max(1, _HESSIAN_BLOCK // d)
            for a in range(0, d, step):
                blk = h[a:a + step]
                if not np.isfinite(blk).all():
                    i, j = np.unravel_index(int(np.argmax(~np.isfinite(blk))), blk.shape)
                    raise CalibrationError(f"hessian holds NaN or infinity "
                                           f"({float(blk[i, j])!r} at ({a + int(i)}, {int(j)}))")
                out._h[a:a + step] = blk
            if (np.diagonal(out._h) < 0).any():
                raise CalibrationError("hessian has a negative diagonal entry (XᵀX has none)")
            if count == 0 and out._h.any():
                raise CalibrationError("count is 0 but the hessian is not all zero")
        return out

    # -- properties -------------------------------------------------------------------------
    @property
    def in_features(self):
        return self._d

    @property
    def count(self):
        """Tokens (rows of activations) accumulated."""
        return self._count

    @property
    def sum_squares(self):
        """float64 (in_features,): Σ x[t, j]² over the tokens (read-only view)."""
        v = self._ss.view()
        v.flags.writeable = False
        return v

    @property
    def input_norms(self):
        """float64 (in_features,): ‖X_j‖₂ = sqrt(sum_squares), the column norms Wanda uses."""
        return np.sqrt(self._ss)

    @property
    def squared_mean(self):
        """float64 (in_features,): sum_squares / count, the mean square of each feature."""
        if self._count == 0:
            raise CalibrationError("squared_mean of statistics with no tokens (count is 0)")
        return self._ss / self._count

    @property
    def has_hessian(self):
        return self._h is not None

    @property
    def hessian(self):
        """float64 (in_features, in_features) XᵀX (read-only view), or None when the
        statistics were created with ``hessian=False``."""
        if self._h is None:
            return None
        v = self._h.view()
        v.flags.writeable = False
        return v

    # -- accumulation -----------------------------------------------------------------------
    def update(self, x, *, where=None, n_threads=None):
        """Add the tokens of ``x`` (shape ``(..., in_features)``); returns self.

        ``where``: optional boolean (or 0/1) mask of shape ``x.shape[:-1]``; only tokens where
        it is true are counted (padding excluded).  ``update(x, where=m)`` gives exactly the
        statistics of ``update(x[m])``.  Non-finite activations raise
        NumericalInstabilityError naming the first one; the statistics are then unchanged."""
        rows = _Rows(x, self._d, "x")
        nt = resolve_threads(n_threads)
        sel = None if where is None else _where_rows(where, rows.shape[:-1], "x")
        n_sel = rows.kernel.shape[0] if sel is None else sel.size
        if n_sel == 0:
            return self
        if self._count + n_sel > _INT64_MAX:
            raise CalibrationError("token count would exceed 2**63 - 1")
        ss = self._ss.copy()
        empty = np.empty(0, np.intp)
        bad = _calib.sum_squares(rows.kernel, rows.fmt, empty if sel is None else sel,
                                 sel is None, ss, nt)
        if bad:
            rows.raise_nonfinite(sel, "x")
        if self._h is not None:
            if rows.kernel.dtype != np.float64:
                # every entry of a float32 block product is at most the largest per-feature
                # sum of squares of the batch (Cauchy-Schwarz): refuse before anything changes
                batch = ss - self._ss
                j = int(np.argmax(batch))
                if batch[j] >= _F32_SAFE:
                    raise NumericalInstabilityError(
                        f"x: the squares of input feature {j} sum to {float(batch[j]):.3g} in "
                        "this batch, beyond float32's range for XᵀX; scale the activations "
                        "down or pass float64 activations", index=(j,), value="inf")
            self._add_hessian(rows, sel, n_sel, nt)
        self._ss = ss
        self._count += n_sel
        self._origin = None  # no longer what a file held
        return self

    def _own_hessian(self):
        """Make _h this object's own before it is written to (copy on write)."""
        if self._hshared:
            self._h = self._h.copy()
            self._hshared = False

    def _add_hessian(self, rows, sel, n_sel, nt):
        d = self._d
        wide = rows.kernel.dtype == np.float64
        dt = np.float64 if wide else np.float32
        step = max(1, _HESSIAN_BLOCK // d)
        need = d * d * np.dtype(dt).itemsize * (2 if self._hshared else 1)
        try:  # allocated before the running sum is touched
            prod = np.empty((d, d), dtype=dt)
            self._own_hessian()
        except MemoryError:
            raise InsufficientMemoryError(f"x: the XᵀX update of {d} input features needs "
                                          f"{format_bytes(need)} more, which cannot be "
                                          "allocated") from None
        with limit_pools(nt):  # BLAS alone here; 1 thread inside calibration hooks
            for s in range(0, n_sel, step):
                idx = slice(s, min(n_sel, s + step)) if sel is None else sel[s:s + step]
                blk = rows.floats(idx)
                if blk.dtype != dt:
                    blk = blk.astype(dt)
                np.matmul(blk.T, blk, out=prod)
                self._h += prod

    def merge(self, other):
        """A new ActivationStats holding the statistics of both (self and other unchanged)."""
        return self.copy().merge_(other)

    def merge_(self, other):
        """Add other's statistics to self in place; returns self."""
        if not isinstance(other, ActivationStats):
            raise InvalidArgumentError(f"merge needs an ActivationStats, got "
                                       f"{type(other).__name__}")
        if other._d != self._d:
            raise ShapeMismatchError(f"cannot merge statistics of {other._d} input features "
                                     f"into statistics of {self._d}")
        if (self._h is None) != (other._h is None):
            raise CalibrationError("cannot merge statistics with a Hessian and statistics "
                                   "without one")
        if self._count + other._count > _INT64_MAX:
            raise CalibrationError("merged token count would exceed 2**63 - 1")
        self._ss = self._ss + other._ss
        self._origin = None
        if self._h is not None:
            self._own_hessian()
            self._h += other._h
        self._count += other._count
        return self

    def copy(self):
        out = ActivationStats(self._d)
        out._ss = self._ss.copy()
        out._count = self._count
        out._h = None if self._h is None else self._h.copy()
        return out

    def shares_hessian_with(self, other):
        """True when both statistics hold the same Hessian (layers reading the same input)."""
        return (isinstance(other, ActivationStats) and self._h is not None
                and self._h is other._h)

    def _share_hessian_of(self, leader):
        """Hold ``leader``'s Hessian (the same array) from now on; both copy it on write."""
        self._h = leader._h
        self._hshared = leader._hshared = True

    def __eq__(self, other):
        if not isinstance(other, ActivationStats):
            return NotImplemented
        return (self._d == other._d and self._count == other._count
                and np.array_equal(self._ss, other._ss)
                and (self._h is None) == (other._h is None)
                and (self._h is None or np.array_equal(self._h, other._h)))

    __hash__ = None

    def __repr__(self):
        return (f"ActivationStats(in_features={self._d}, count={self._count}"
                f"{', hessian=True' if self._h is not None else ''})")


def _stored(value, name):
    """A stored statistic as an array, or CalibrationError (a ragged list, an object numpy
    refuses)."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise CalibrationError(f"{name} is not an array of numbers "
                               f"({short_repr(str(exc), 120)})") from None


def _check_tokens(tokens, what):
    if isinstance(tokens, np.ndarray) and tokens.ndim == 0:
        tokens = tokens[()]
    if isinstance(tokens, (bool, np.bool_)) or not isinstance(tokens, numbers.Integral):
        raise CalibrationError(f"{what}: the token count must be an integer, got "
                               f"{short_repr(tokens)}")
    tokens = int(tokens)
    if not 0 <= tokens <= _INT64_MAX:
        raise CalibrationError(f"{what}: the token count must be in [0, 2**63), got "
                               f"{_size_text(tokens)}")
    return tokens


def _check_sum(value, what, field):
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise CalibrationError(f"{what}: {field} must be a real number, got {short_repr(value)}")
    try:
        value = float(value)
    except (OverflowError, ValueError):  # an integer or fraction beyond float64
        raise CalibrationError(f"{what}: {field} is too large for a float64 "
                               f"({type(value).__name__} {short_repr(value)})") from None
    if not math.isfinite(value):
        raise CalibrationError(f"{what}: {field} is not finite ({value!r})")
    return value


class BlockStats:
    """One transformer block's influence statistics: ``cos_sum`` = the sum over calibration
    tokens of ``cos(h_in, h_out)`` (the block's input and output hidden states of a token),
    ``tokens`` = how many tokens.  ``influence`` is ShortGPT's block influence
    ``BI = 1 - cos_sum / tokens`` (0: the block leaves its input's direction unchanged)."""

    __slots__ = ("cos_sum", "tokens")

    def __init__(self, cos_sum, tokens, *, name="block"):
        what = f"block {short_repr(name)}"
        tokens = _check_tokens(tokens, what)
        cos_sum = _check_sum(cos_sum, what, "cos_sum")
        # each cosine lies in [-1, 1]; allow float rounding of a long sum
        if abs(cos_sum) > tokens * (1 + 1e-6) + 1e-6:
            raise CalibrationError(f"{what}: cos_sum {cos_sum!r} is outside [-tokens, tokens] "
                                   f"for {tokens} tokens (each cosine lies in [-1, 1])")
        self.cos_sum, self.tokens = cos_sum, tokens

    @property
    def influence(self):
        """``1 - mean cos(h_in, h_out)``; NaN when no token was seen."""
        return 1.0 - self.cos_sum / self.tokens if self.tokens else float("nan")

    def __add__(self, other):
        if not isinstance(other, BlockStats):
            return NotImplemented
        return BlockStats(self.cos_sum + other.cos_sum, _add_tokens(self.tokens, other.tokens))

    def __eq__(self, other):
        if not isinstance(other, BlockStats):
            return NotImplemented
        return self.cos_sum == other.cos_sum and self.tokens == other.tokens

    __hash__ = None

    def __repr__(self):
        return f"BlockStats(cos_sum={self.cos_sum!r}, tokens={self.tokens})"


class ExpertStats:
    """One routed MoE expert's REAP statistics: ``tokens`` routed to it and ``reap_sum`` = the
    sum over those tokens of the router's gate weight times the L2 norm of the expert's output.
    ``reap`` is their mean (Lasby et al. 2025, REAP), 0 for an expert no token reached."""

    __slots__ = ("tokens", "reap_sum")

    def __init__(self, tokens, reap_sum, *, name="expert"):
        what = f"expert {short_repr(name)}"
        tokens = _check_tokens(tokens, what)
        reap_sum = _check_sum(reap_sum, what, "reap_sum")
        if reap_sum < 0:
            raise CalibrationError(f"{what}: reap_sum {reap_sum!r} is negative (gate weights "
                                   "and norms are >= 0)")
        if tokens == 0 and reap_sum != 0:
            raise CalibrationError(f"{what}: no token was routed to it but reap_sum is "
                                   f"{reap_sum!r}")
        self.tokens, self.reap_sum = tokens, reap_sum

    @property
    def reap(self):
        return self.reap_sum / self.tokens if self.tokens else 0.0

    def __add__(self, other):
        if not isinstance(other, ExpertStats):
            return NotImplemented
        return ExpertStats(_add_tokens(self.tokens, other.tokens), self.reap_sum + other.reap_sum)

    def __eq__(self, other):
        if not isinstance(other, ExpertStats):
            return NotImplemented
        return self.tokens == other.tokens and self.reap_sum == other.reap_sum

    __hash__ = None

    def __repr__(self):
        return f"ExpertStats(tokens={self.tokens}, reap_sum={self.reap_sum!r})"


def _add_tokens(a, b):
    if a + b > _INT64_MAX:
        raise CalibrationError("merged token count would exceed 2**63 - 1")
    return a + b


def _check_name(name):
    if not isinstance(name, str):
        raise InvalidArgumentError(f"layer names are strings, got {type(name).__name__} "
                                   f"{short_repr(name)}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no safetensors header can hold it
        raise InvalidArgumentError(f"layer name {short_repr(name)} is not valid Unicode (a lone "
                                   "surrogate)") from None
    return name


class CalibrationContext(Mapping):
    """Calibration statistics of a model: layer name -> :class:`ActivationStats`.

    A read-only mapping (``ctx[name]`` raises MissingActivationStatsError, a KeyError, for an
    unknown layer) with ``add_layer_stats`` to fill it.  Layer names are the module names of
    ``torch.nn.Module.named_modules()`` (e.g. ``"model.layers.0.mlp.down_proj"``).
    ``num_samples`` counts the calibration samples (sequences) the statistics came from.

    ``save(path)`` / ``CalibrationContext.load(path)`` write and read one safetensors file (sums
    and counts bit exact, Hessians in float32); ``merge`` adds contexts collected on different machines or data shards."""

    def __init__(self, stats=None, *, num_samples=0):
        self._stats = {}
        self._model = {"block": {}, "expert": {}}  # name -> BlockStats / ExpertStats
        self.num_samples = num_samples
        if stats is not None:
            if not isinstance(stats, Mapping):
                raise InvalidArgumentError(f"stats must be a mapping layer name -> "
                                           f"ActivationStats, got {type(stats).__name__}")
            for name, st in stats.items():
                self.add_layer_stats(name, st)

    # -- num_samples ----------------------------------------------------------------------
    @property
    def num_samples(self):
        return self._num_samples

    @num_samples.setter
    def num_samples(self, value):
        value = check_int(value, "num_samples", minimum=0)
        if value > _INT64_MAX:
            raise InvalidArgumentError(f"num_samples must be below 2**63, got "
                                       f"{_size_text(value)}")
        self._num_samples = value

    # -- layers -----------------------------------------------------------------------------
    def add_layer_stats(self, name, stats, *, replace=False):
        """Register ``stats`` (an ActivationStats, kept by reference) under ``name``.  A name
        already present raises CalibrationError unless ``replace=True`` (to add statistics
        together, use ``ctx[name].merge_(stats)`` or :meth:`merge`)."""
        _check_name(name)
        if not isinstance(stats, ActivationStats):
            raise InvalidArgumentError(f"stats for layer {_layer_text(name)} must be an "
                                       f"ActivationStats, got {type(stats).__name__}")
        if name in self._stats and not replace:
            raise CalibrationError(f"layer {_layer_text(name)} already has statistics (pass "
                                   "replace=True to replace them, or merge)")
        self._stats[name] = stats
        return stats

    def get_stats(self, name):
        """The statistics of layer ``name``, or None."""
        return self._stats.get(name) if isinstance(name, str) else None

    def require_stats(self, name):
        """The statistics of layer ``name``; MissingActivationStatsError (a KeyError and a
        CalibrationError) naming the layer, and the closest names held, when absent."""
        st = self.get_stats(name)
        if st is None:
            raise self._missing(name)
        return st

    def _missing(self, name):
        names = list(self._stats)
        hint = ""
        if isinstance(name, str):
            close = difflib.get_close_matches(name, names, n=3)
            if close:
                hint = f"; did you mean {', '.join(map(_layer_text, close))}?"
        held = ", ".join(_layer_text(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
        return MissingActivationStatsError(
            f"no activation statistics for layer {short_repr(name)} (the calibration holds "
            f"{len(names)} layer(s){': ' + held if names else ''}){hint}", layer=name)

    @property
    def layer_names(self):
        """Layer names, in the order they were added."""
        return list(self._stats)

    # -- model-level statistics (blocks, experts) -------------------------------------------
    def add_block_stats(self, block, cos_sum, tokens):
        """Add ``cos_sum`` (sum of ``cos(h_in, h_out)`` over ``tokens`` tokens) to the influence
        statistics of ``block`` (its checkpoint prefix, e.g. ``"model.layers.3"``); returns
        the block's :class:`BlockStats` so far."""
        return self._add_model("block", block, BlockStats(cos_sum, tokens, name=block))

    def add_expert_stats(self, expert, tokens, reap_sum):
        """Add ``tokens`` routed tokens and their ``reap_sum`` (sum of gate weight times
        expert-output norm) to the REAP statistics of ``expert`` (its checkpoint prefix, e.g.
        ``"model.layers.3.mlp.experts.7"``); returns the expert's :class:`ExpertStats`."""
        return self._add_model("expert", expert, ExpertStats(tokens, reap_sum, name=expert))

    def _add_model(self, group, name, value):
        _check_name(name)
        held = self._model[group]
        held[name] = held[name] + value if name in held else value
        return held[name]

    @property
    def block_stats(self):
        """{block prefix: BlockStats}, in the order they were added (a copy)."""
        return dict(self._model["block"])

    @property
    def expert_stats(self):
        """{expert prefix: ExpertStats}, in the order they were added (a copy)."""
        return dict(self._model["expert"])

    def __getitem__(self, name):
        return self.require_stats(name)

    def __iter__(self):
        return iter(self._stats)

    def __len__(self):
        return len(self._stats)

    def __contains__(self, name):
        return isinstance(name, str) and name in self._stats

    def __eq__(self, other):
        if not isinstance(other, CalibrationContext):
            return NotImplemented
        return (self._num_samples == other._num_samples
                and list(self._stats) == list(other._stats)
                and all(self._stats[k] == other._stats[k] for k in self._stats)
                and self._model == other._model)

    __hash__ = None

    def __repr__(self):
        return f"CalibrationContext({len(self._stats)} layers, num_samples={self._num_samples})"

    # -- merging ------------------------------------------------------------------------------
    def merge(self, other):
        """A new context with the statistics of both: layers in either are copied, layers in
        both are merged (ActivationStats.merge), num_samples are added.  Neither input
        changes."""
        out = CalibrationContext(num_samples=self._num_samples)
        for name, st in self._stats.items():
            out._stats[name] = st.copy()
        out._model = {g: dict(v) for g, v in self._model.items()}
        for name, lead in _hessian_leaders(self._stats).items():  # copies share as they did
            if lead != name:
                out._stats[name]._share_hessian_of(out._stats[lead])
        return out.merge_(other)

    def merge_(self, other):
        """Merge ``other`` into this context in place; returns self.  Checks every shared
        layer before changing any, so a mismatch leaves self unchanged."""
        if not isinstance(other, CalibrationContext):
            raise InvalidArgumentError(f"merge needs a CalibrationContext, got "
                                       f"{type(other).__name__}")
        total = self._num_samples + other._num_samples
        if total > _INT64_MAX:
            raise CalibrationError("merged num_samples would exceed 2**63 - 1")
        for name, st in other._stats.items():
            mine = self._stats.get(name)
            if mine is None:
                continue
            if mine.in_features != st.in_features:
                raise ShapeMismatchError(f"layer {_layer_text(name)}: {mine.in_features} input "
                                         f"features here, {st.in_features} in the other "
                                         "context")
            if mine.has_hessian != st.has_hessian:
                raise CalibrationError(f"layer {_layer_text(name)}: one context has a Hessian, "
                                       "the other not")
            if mine.count + st.count > _INT64_MAX:
                raise CalibrationError(f"layer {_layer_text(name)}: merged token count would "
                                       "exceed 2**63 - 1")
        merged_model = {g: dict(v) for g, v in self._model.items()}
        for group, held in other._model.items():
            for name, value in held.items():
                mine = merged_model[group]
                mine[name] = mine[name] + value if name in mine else value
        mine_groups = _hessian_leaders(self._stats)
        theirs = _hessian_leaders(other._stats)
        for name, st in other._stats.items():
            if name in self._stats:
                self._stats[name].merge_(st)
            else:
                self._stats[name] = st.copy()
        # layers sharing one Hessian on both sides still share it (the same sums were added)
        for name, lead in mine_groups.items():
            if lead != name and theirs.get(name, name) == theirs.get(lead, lead) \
                    and (name in other._stats) == (lead in other._stats):
                self._stats[name]._share_hessian_of(self._stats[lead])
        new_leads = {}  # layers new to this context share as they did in other
        for name, lead in theirs.items():
            if name in mine_groups:
                continue
            first = new_leads.setdefault(lead, name)
            if first != name:
                self._stats[name]._share_hessian_of(self._stats[first])
        self._model = merged_model
        self._num_samples = total
        return self

    # -- files ------------------------------------------------------------------------------
    def save(self, path, *, force=True):
        """Write the context to ``path`` as a safetensors file (format
        ``aprender.calibration/1``, see the README), through a temporary file renamed into
        place.  An existing regular file at ``path`` is replaced (``force=False``: never, not
        even one that appears while the file is written); a folder or special file is
        refused with CheckpointError.  Sums and counts are written exactly; Hessians in float32
        (rounded once from the float64 sums), once per group of layers sharing one."""
        from ..io.files import commit_path, display, file_kind, remove_tree, temp_name
        from ..io.safetensors import write_safetensors

        path = os.fspath(_check_path(path, "CalibrationContext.save"))
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise CheckpointError(f"{display(path)}: cannot use ({exc.strerror or exc})") \
                from None
        if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise UnsafePathError(f"{display(path)} is a {file_kind(st.st_mode)}; a calibration "
                                  "file is never written over it")
        if st is not None and not force:
            raise CheckpointError(f"{display(path)} already exists (use --force to replace it)")
        tensors = {}
        leaders = _hessian_leaders(self._stats)
        for name, s in self._stats.items():
            tensors[f"{name}.sum_squares"] = s._ss
            tensors[f"{name}.count"] = np.asarray(s._count, dtype=np.int64)
            if s._h is not None and leaders[name] == name:
                tensors[f"{name}.hessian"] = _float32_hessian(s._h, name)
        for suffix, (group, field, dtype) in _MODEL_SUFFIXES.items():
            for name, value in self._model[group].items():
                tensors[f"{name}.{suffix}"] = np.asarray(
                    getattr(value, field), dtype=np.float64 if dtype == "F64" else np.int64)
        metadata = {"format": CALIBRATION_FORMAT, "num_samples": str(self._num_samples)}
        shared = {k: v for k, v in leaders.items() if k != v}
        if shared:
            metadata["hessian_of"] = json.dumps(shared, separators=(",", ":"))
        try:
            tmp = temp_name(path, "file")
        except OSError as exc:
            raise CheckpointError(f"{display(path)}: cannot create a file next to it "
                                  f"({exc.strerror or exc})") from None
        try:
            write_safetensors(tmp, tensors, metadata)
            commit_path(tmp, path, force=force, what="calibration file")
        except BaseException:
            remove_tree(tmp)
            raise

    @classmethod
    def load(cls, path, *, hessians=True):
        """Read a calibration file written by :meth:`save` (or any file in the documented
        format).  Everything is validated: the safetensors structure (by aprender's hardened
        reader), the format tag, tensor names, dtypes and shapes, counts >= 0, finite and
        non-negative sums, Hessians of the right size; problems raise CalibrationFileError (a
        CheckpointError and a CalibrationError) naming the file, layer and tensor.

        ``hessians=False`` checks the Hessians' names, dtypes and shapes but leaves them on
        disk (statistics without Hessians): :class:`HessianFile` reads them one at a time."""
        from ..io.files import display

        path = _check_path(path, "CalibrationContext.load")
        if not isinstance(hessians, (bool, np.bool_)):
            raise InvalidArgumentError(f"hessians must be True or False, got "
                                       f"{short_repr(hessians)}")
        shown = display(path)
        sf, layers, shared, model = _read_layout(path)

        def fail(msg):
            return CalibrationFileError(f"{shown}: {msg}")

        # what the header claims is backed by file bytes, but a sparse file holds terabytes of
        # holes: the memory the statistics take is checked before anything is read
        need, largest = 0, (0, None)
        for layer, parts in layers.items():
            d = parts["sum_squares"].shape[0]
            n = 8 * d + (8 * d * d if hessians and "hessian" in parts else 0)
            need += n
            largest = max(largest, (n, layer), key=lambda p: p[0])
        if largest[1] is not None:
            require_memory(need, f"{shown}: the statistics of its {len(layers)} layer(s)"
                           + (" with their Hessians" if hessians else "")
                           + f" (layer {_layer_text(largest[1])} alone: "
                           f"{format_bytes(largest[0])})"
                           + ("; load with hessians=False to leave the Hessians on disk"
                              if hessians else ""))
        out = cls(num_samples=int(sf.metadata["num_samples"]))
        for group, held in model.items():
            make = BlockStats if group == "block" else ExpertStats
            for name, parts in held.items():
                vals = {field: np.array(sf.array(info.name)).reshape(())[()]
                        for field, info in parts.items()}
                try:
                    out._model[group][name] = make(**vals, name=name)
                except CalibrationError as exc:
                    raise fail(str(exc)) from None
        for layer, parts in layers.items():  # names, dtypes and shapes: checked by the layout
            where = f"layer {_layer_text(layer)}"
            ssi, ci, hi = parts["sum_squares"], parts["count"], parts.get("hessian")
            count = int(np.array(sf.array(ci.name)).reshape(()))
            try:
                st = ActivationStats.from_arrays(
                    sf.array(ssi.name), count,
                    None if hi is None or not hessians else sf.array(hi.name))
            except CalibrationError as exc:
                raise fail(f"{where}: {exc}") from None
            except (MemoryError, OSError) as exc:  # the allocation, or mapping the tensors
                if isinstance(exc, OSError) and exc.errno != errno.ENOMEM:
                    raise CalibrationFileError(f"{shown}: {where}: cannot read "
                                               f"({exc.strerror or exc})") from None
                d = ssi.shape[0]
                n = 8 * d + (8 * d * d if hi is not None and hessians else 0)
                why = "cannot allocate" if isinstance(exc, MemoryError) else \
                    f"cannot map ({exc.strerror or type(exc).__name__}) the tensors for"
                raise InsufficientMemoryError(f"{shown}: {where}: {why} its statistics "
                                              f"({format_bytes(n)})") from None
            st._origin = f"{where} of calibration file {shown}"
            out._stats[layer] = st
        for layer, lead in shared.items():
            a, b = out._stats[layer], out._stats[lead]
            if a.count != b.count or not np.array_equal(a._ss, b._ss):
                raise fail(f"__metadata__ hessian_of: layer {_layer_text(layer)} shares "
                           f"the Hessian of {_layer_text(lead)} but its tokens or sums "
                           "of squares differ (layers sharing one read the same inputs)")
            if hessians:
                out._stats[layer]._share_hessian_of(out._stats[lead])
        return out


class HessianFile:
    """The Hessians of a calibration file, read one layer at a time (memory-mapped, never all
    at once): ``get(layer)`` returns the layer's read-only float32/float64 (d, d) array, following
    ``hessian_of`` for layers that share one, or None when the file has none for the layer.
    The file's layout is validated as by ``CalibrationContext.load``; the values are checked
    where they are used (``aprender.pruning.reconstruct.hessian_array``)."""

    def __init__(self, path):
        self.path = _check_path(path, "HessianFile")
        self._sf, self._layers, self._shared, _ = _read_layout(self.path)

    def source(self, layer):
        """The name of the layer whose ``.hessian`` tensor ``layer`` uses, or None."""
        if not isinstance(layer, str):
            raise InvalidArgumentError(f"HessianFile: layer names are strings, got "
                                       f"{type(layer).__name__} {short_repr(layer)}")
        lead = self._shared.get(layer, layer)
        return lead if "hessian" in self._layers.get(lead, {}) else None

    def get(self, layer, cols=None):
        """The layer's Hessian (mapped, read-only), or None.  ``cols``: the input columns of
        the weight it is for; a Hessian of another size is refused before it is mapped
        (CalibrationFileError naming the file and the layer)."""
        lead = self.source(layer)
        if lead is None:
            return None
        info = self._layers[lead]["hessian"]
        if cols is not None:
            cols = check_int(cols, "cols (the weight's input columns)", minimum=0)
        if cols is not None and info.shape != (cols, cols):
            from ..io.files import display

            raise CalibrationFileError(
                f"{display(self.path)}: layer {_layer_text(layer)}: the Hessian is "
                f"{info.shape[0]} x {info.shape[1]} but the weight has {_size_text(cols)} input "
                "columns")
        try:
            return self._sf.array(info.name)
        except OSError as exc:
            from ..io.files import display

            if exc.errno != errno.ENOMEM:
                raise
            raise InsufficientMemoryError(
                f"{display(self.path)}: layer {_layer_text(layer)}: cannot map its Hessian "
                f"({format_bytes(info.nbytes)})") from None


def _check_path(path, who):
    """``path`` if it is a str, bytes or os.PathLike, else InvalidArgumentError naming it."""
    if isinstance(path, (str, bytes, os.PathLike)):
        return path
    raise InvalidArgumentError(f"{who} needs a path (str, bytes or os.PathLike), got "
                               f"{type(path).__name__} {short_repr(path)}")


def _layer_text(name):
    """A layer name from a file or a caller, for messages: quoted, cut, control characters
    escaped."""
    from ..io.files import display

    return display(short_repr(name))


def _hessian_leaders(stats):
    """layer -> the first layer (in order) holding the same Hessian array (itself if none)."""
    first, out = {}, {}
    for name, st in stats.items():
        if st._h is None:
            continue
        out[name] = first.setdefault(id(st._h), name)
    return out


def _float32_hessian(h, layer):
    """A float64 Hessian rounded to float32 for the file, refusing sums beyond its range."""
    with np.errstate(over="ignore"):
        h32 = h.astype(np.float32)
    if not np.isfinite(h32).all():
        i, j = np.unravel_index(int(np.argmax(~np.isfinite(h32))), h32.shape)
        raise CalibrationError(f"layer {_layer_text(layer)}: Hessian entry ({int(i)}, {int(j)}) "
                               f"= {float(h[i, j]):.6g} exceeds the float32 range (about "
                               "3.4e38) the file stores Hessians in; scale the activations down")
    return h32


def _read_layout(path):
    """(SafetensorsFile, layer -> {suffix: TensorInfo}, follower -> leader,
    {"block"|"expert": {name: {field: TensorInfo}}}) of a calibration file, with the format
    tag, num_samples, tensor names, dtypes, shapes and hessian_of checked."""
    from ..io.files import display
    from ..io.safetensors import SafetensorsFile
    from ..io.strictjson import loads

    shown = display(path)
    try:
        sf = SafetensorsFile(path)
    except CheckpointError as exc:
        if "not a safetensors file" not in str(exc):
            raise
        raise CalibrationFileError(f"{exc}; a calibration file is the safetensors file "
                                   "'aprender calibrate' writes") from None

    def fail(msg):
        return CalibrationFileError(f"{shown}: {msg}")

    fmt = sf.metadata.get("format")
    if fmt not in _READABLE_FORMATS:
        if isinstance(fmt, str) and fmt.startswith("aprender.calibration/"):
            raise fail(f"calibration format {display(short_repr(fmt))} is not supported "
                       f"(this aprender reads {' and '.join(map(repr, _READABLE_FORMATS))})")
        raise fail(f"not an aprender calibration file (__metadata__ format is "
                   f"{display(short_repr(fmt))}, expected {CALIBRATION_FORMAT!r})")
    ns = sf.metadata.get("num_samples")
    if not isinstance(ns, str) or not re.fullmatch(r"[0-9]{1,19}", ns, re.ASCII) \
            or int(ns) > _INT64_MAX:
        raise fail(f"__metadata__ num_samples must be a decimal integer in [0, 2**63), got "
                   f"{display(short_repr(ns))}")
    layers, model = {}, {"block": {}, "expert": {}}
    allowed = _SUFFIXES + (tuple(_MODEL_SUFFIXES) if fmt == CALIBRATION_FORMAT else ())
    for info in sf.infos:
        layer, dot, suffix = info.name.rpartition(".")
        if not dot or suffix not in allowed:
            raise fail(f"unexpected tensor {display(short_repr(info.name))} (calibration "
                       f"tensors are named '<layer>.{{{','.join(allowed)}}}')")
        if suffix in _MODEL_SUFFIXES:
            group, field, dtype = _MODEL_SUFFIXES[suffix]
            if info.dtype != dtype or info.shape != ():
                raise fail(f"{group} {display(short_repr(layer))}: {suffix} must be a {dtype} "
                           f"scalar (shape []), got {info.dtype} {list(info.shape)}")
            model[group].setdefault(layer, {})[field] = info
            continue
        layers.setdefault(layer, {})[suffix] = info
    for group, held in model.items():
        for name, parts in held.items():
            for suffix, (g, field, _) in _MODEL_SUFFIXES.items():
                if g == group and field not in parts:
                    raise fail(f"{group} {display(short_repr(name))}: tensor "
                               f"{display(short_repr(name + '.' + suffix))} is missing")
    for layer, parts in layers.items():
        where = f"layer {display(short_repr(layer))}"
        for need in ("sum_squares", "count"):
            if need not in parts:
                raise fail(f"{where}: tensor {display(short_repr(layer + '.' + need))} is "
                           "missing")
        ssi, ci, hi = parts["sum_squares"], parts["count"], parts.get("hessian")
        if ssi.dtype != "F64" or len(ssi.shape) != 1 or ssi.shape[0] < 1:
            raise fail(f"{where}: sum_squares must be F64 of shape [in_features >= 1], got "
                       f"{ssi.dtype} {list(ssi.shape)}")
        if ci.dtype != "I64" or ci.shape != ():
            raise fail(f"{where}: count must be an I64 scalar (shape []), got {ci.dtype} "
                       f"{list(ci.shape)}")
        d = ssi.shape[0]
        if hi is not None and (hi.dtype not in ("F32", "F64") or hi.shape != (d, d)):
            raise fail(f"{where}: hessian must be F32 or F64 of shape [{d}, {d}], got "
                       f"{hi.dtype} {list(hi.shape)}")
    shared = {}
    raw = sf.metadata.get("hessian_of")
    if raw is not None:
        try:
            shared = loads(raw.encode("utf-8"), "__metadata__ hessian_of")
        except CheckpointError as exc:
            raise fail(str(exc)) from None
        if not isinstance(shared, dict) or not all(isinstance(v, str) for v in shared.values()):
            raise fail("__metadata__ hessian_of must be a JSON object mapping layer names to "
                       "layer names")
        for layer, lead in shared.items():
            where = f"__metadata__ hessian_of[{display(short_repr(layer))}]"
            lp = layers.get(lead, {})
            if "hessian" not in lp:
                raise fail(f"{where} names {display(short_repr(lead))}, which has no hessian "
                           "tensor")
            if "hessian" in layers.get(layer, {}):
                raise fail(f"{where}: layer {display(short_repr(layer))} has a hessian tensor "
                           "of its own")
            if layer not in layers:
                raise fail(f"__metadata__ hessian_of names layer {display(short_repr(layer))}, "
                           "which has no statistics")
            own = layers[layer]["sum_squares"]
            theirs = lp["sum_squares"]
            if tuple(own.shape) != tuple(theirs.shape):
                raise fail(f"{where}: {display(short_repr(layer))} and "
                           f"{display(short_repr(lead))} have different input sizes")
    return sf, layers, shared, model
