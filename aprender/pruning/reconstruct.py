"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"): prune a layer and update its remaining weights to compensate, from the
layer's input Hessian ``H = XᵀX``.

The algorithm, as :func:`sparsegpt` runs it on a weight ``W`` of shape (rows, cols):

1. ``H`` is checked (square, symmetric, finite, non-negative diagonal); an input that never
   fired (``H[j, j] == 0``) gets ``H[j, j] = 1`` and its weights are zeroed; ``percdamp`` times
   the mean diagonal is added to the diagonal.
2. ``U``, the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``), in float64: the reversed matrix
   ``P H P`` is factorised (LAPACK potrf) and its factor inverted (trtri), ``U = P L⁻¹ P`` — half
   the work of inverting ``H`` and factorising again; then rounded to float32 (float64 weights
   keep float64) in the same buffer.
3. Columns in blocks of ``block_size``.  Before a block, the errors of all earlier columns are
   applied to it at once (``W[:, B] -= E[:, :c0] @ U[:c0, B]``, one BLAS matmul).  The block's
   mask is chosen by the saliency ``w² / U[j, j]²``: unstructured takes the block's share of
   the layer's exact count, per-row the block's share of every row's count (both by the
   selection engine, ties to the lowest index), N:M chooses each group of M input columns when
   the column loop reaches it.  The column loop (Cython, no GIL, one task per row) sets a pruned
   weight to +0.0, records its error ``w / U[c, c]`` and subtracts ``error * U[c, c+1:]`` from
   the block's later columns.

Precision: weights are updated in float32 (float64 for float64 weights) and rounded once to
their dtype at the end; the factorisation is float64.  Scaling ``H`` (e.g. ``2/n XᵀX``) gives
the same result: SparseGPT is invariant to it, so the plain sums of a calibration file serve.

Memory beyond the output for float32 weights: ``U`` (the size of ``H`` in float32, after a float64
factorisation in one buffer of twice that, half of it returned to the system before the weights
are touched), the error matrix (the size of ``W`` in float32) and two (rows, block_size) blocks.
16-bit weights also need their float32 working copy.

The factorisation needs SciPy's LAPACK wrappers (``pip install 'aprender[sparsegpt]'``): numpy
has no in-place Cholesky or triangular inverse, and without them the factorisation would need
three n x n float64 buffers and twice the arithmetic.
"""
import math
import mmap

import numpy as np

from .._adapters import Bits16, is_torch, to_numpy_view
from .._threads import limit_pools
from .._kernels import sparsegpt as _k
from .._validation import (as_floats, as_real, check_int, decode16, prune_count,
                           raise_nonfinite, require_memory, resolve_threads, short_repr)
from ..errors import (CalibrationError, HessianError, InsufficientMemoryError,
                      InvalidArgumentError, InvalidDTypeError, InvalidPatternError,
                      InvalidShapeError, NumericalInstabilityError, PruningError,
                      ShapeMismatchError)
from .importance import ImportanceScores, ImportanceStats, _weights_of, layer_stats
from .mask import SparsityMask, SparsityPattern
from .selection import ArraySource, _is_finite, select_mask, select_rows

__all__ = ["sparsegpt", "SparseGPTImportance", "hessian_factor", "sparsegpt_workspace_bytes"]

SYMMETRY_RTOL = 1e-3  # |h_ij - h_ji| <= rtol * sqrt(h_ii h_jj): float32 XᵀX sums pass easily


def _lapack():
    try:
        from scipy.linalg import lapack
    except ImportError as exc:
        raise ImportError("SparseGPT needs SciPy's LAPACK for its Cholesky factorisation; "
                          "install it with: pip install 'aprender[sparsegpt]'") from exc
    return lapack


def _at(layer):
    from ..io.files import display

    return f"layer {display(short_repr(layer))}: " if layer is not None else ""


def _pattern(pattern):
    p = pattern if isinstance(pattern, SparsityPattern) else SparsityPattern.parse(pattern)
    if not (p.is_unstructured or p.is_per_row or p.is_nm):
        raise InvalidPatternError(f"SparseGPT supports the patterns 'unstructured', 'per-row' and "
                                  f"N:M such as '2:4', got {p}")
    if p.is_nm and p.axis not in (-1, 1):
        raise InvalidPatternError(f"SparseGPT N:M groups run along the input dimension (the last "
                                  f"axis), got {p}")
    return p


MAX_PERCDAMP = 1e6  # beyond, H + damp I is the identity to float32 and U underflows


def _percdamp(value):
    v = as_real(value, "percdamp (a finite fraction > 0)")
    if not math.isfinite(v) or not 0 < v <= MAX_PERCDAMP:
        raise InvalidArgumentError(f"percdamp must be a number in (0, {MAX_PERCDAMP:g}] (a "
                                   f"fraction of the mean diagonal), got {short_repr(value)}")
    return v


def hessian_array(hessian, cols, layer=None, n_threads=None):
    """The Hessian as a C-contiguous float32/float64 (cols, cols) array, checked: square, of the
    weights' input size, finite, non-negative diagonal, symmetric up to float32 summation
    (``SYMMETRY_RTOL``), not all zero.  Accepts an array, a CPU torch tensor or an
    ActivationStats collected with ``hessian=True``.  Raises HessianError (ShapeMismatchError
    for a size that does not match the weights) naming the layer."""
    from .calibration import ActivationStats

    at = _at(layer)
    if isinstance(hessian, ActivationStats):
        if hessian._origin is not None:  # read from a file: name it too
            at = f"{hessian._origin}: "
        if not hessian.has_hessian:
            raise CalibrationError(f"{at}the calibration statistics have no Hessian (collect "
                                   "them with hessian=True, or 'aprender calibrate --hessian')")
        if hessian.count == 0:
            raise HessianError(f"{at}the calibration statistics hold no tokens", layer=layer)
        hessian = hessian.hessian
    if is_torch(hessian):
        hessian = to_numpy_view(hessian)
    if isinstance(hessian, Bits16):
        raise InvalidDTypeError(f"{at}the Hessian must be float32 or float64, got "
                                f"{hessian.format}")
    if not isinstance(hessian, np.ndarray):
        try:
            hessian = np.asarray(hessian)
        except Exception as exc:
            raise InvalidDTypeError(f"{at}the Hessian must be a float32 or float64 array, got "
                                    f"{type(hessian).__name__}") from exc
    h = hessian
    if h.dtype.kind == "f" and not h.dtype.isnative:
        h = h.astype(h.dtype.newbyteorder("="))
    if h.dtype not in (np.float32, np.float64):
        raise InvalidDTypeError(f"{at}the Hessian must be float32 or float64, got {h.dtype}")
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise HessianError(f"{at}the Hessian must be a square matrix, got shape {h.shape}",
                           layer=layer)
    if h.shape[0] != cols:
        raise ShapeMismatchError(f"{at}the Hessian is {h.shape[0]} x {h.shape[1]} but the "
                                 f"weights have {cols} input columns")
    h = np.ascontiguousarray(h)
    code, i, j = _k.check_hessian(h, SYMMETRY_RTOL, resolve_threads(n_threads))
    if code == 1:
        raise HessianError(f"{at}the Hessian holds {float(h[i, j])!r} at ({i}, {j}); it must be "
                           "finite", layer=layer)
    if code == 3:
        raise HessianError(f"{at}the Hessian has a negative diagonal entry {float(h[i, i])!r} at "
                           f"({i}, {i}); XᵀX has none", layer=layer)
    if code == 2:
        raise HessianError(f"{at}the Hessian is not symmetric: h[{i}, {j}] = {float(h[i, j])!r} "
                           f"but h[{j}, {i}] = {float(h[j, i])!r}", layer=layer)
    if cols and not np.diagonal(h).any():
        raise HessianError(f"{at}the Hessian is all zero on its diagonal (no input ever "
                           "fired): there is nothing to prune by", layer=layer)
    return h


class _Factor:
    """U (the upper Cholesky factor of the damped H⁻¹), the dead inputs, and the anonymous
    memory holding U (kept alive with it)."""

    __slots__ = ("u", "dead", "_mem")

    def __init__(self, u, dead, mem):
        self.u, self.dead, self._mem = u, dead, mem


def hessian_factor(hessian, percdamp=0.01, *, wide=False, layer=None, n_threads=None):
    """The upper Cholesky factor U of ``(H + damp I)⁻¹`` (dead inputs with ``H[j, j] = 1``),
    float32 (float64 with ``wide``), and the boolean mask of dead inputs, as a ``_Factor``
    (``u``, ``dead``).  ``hessian``: as for :func:`sparsegpt` (checked by
    :func:`hessian_array`).  U is computed for H scaled to a mean diagonal of 1 (SparseGPT's
    result does not depend on the scale), so it stays inside float32's range.  Raises
    HessianError when H is not positive definite after damping."""
    h = hessian_array(hessian, _square_size(hessian), layer, n_threads)
    return _factor(h, _percdamp(percdamp), wide, layer, resolve_threads(n_threads))


def _square_size(hessian):
    shape = getattr(hessian, "shape", None)
    if shape is None and hasattr(hessian, "in_features"):
        return hessian.in_features
    return shape[0] if shape is not None and len(shape) else -1


def dead_and_mean(h):
    """SparseGPT's damping basis for a checked Hessian: the boolean mask of dead inputs
    (``H[j, j] == 0``, inputs that never fired) and the mean of the diagonal with those
    entries taken as 1 (the damping adds ``percdamp`` times it to the diagonal).  The mean is
    computed without overflow for diagonals near the float64 limit; 1.0 for an empty H."""
    diag = np.diagonal(h).astype(np.float64)
    dead = diag == 0
    if not diag.size:
        return dead, 1.0
    d1 = np.where(dead, 1.0, diag)
    top = float(d1.max())
    return dead, top * float(np.mean(d1 / top))


def _factor(h, percdamp, wide, layer, nt):
    """hessian_factor for a Hessian already checked by hessian_array."""
    lapack = _lapack()
    at = _at(layer)
    n = h.shape[0]
    dead, mean = dead_and_mean(h)
    if n == 0:
        return _Factor(np.zeros((0, 0), np.float64 if wide else np.float32), dead, None)
    damp = percdamp * mean
    nbytes = 8 * n * n
    mem = mmap.mmap(-1, nbytes)  # anonymous: its second half can be returned after narrowing
    b = np.frombuffer(mem, dtype=np.float64).reshape(n, n)
    _k.load_reversed(h, b, damp, 1.0 / mean, nt)
    c = b.T  # the same bytes as a Fortran-ordered matrix: LAPACK works in place
    info2 = 0
    with limit_pools(nt, serial_blas=True):  # LAPACK: one thread (see _threads)
        c2, info = lapack.dpotrf(c, lower=0, clean=1, overwrite_a=1)
        if info == 0:
            c2, info2 = _trtri(lapack, c, c2, b)
    if info > 0:
        k = n - int(info) + 1  # potrf of the reversed matrix failed at order info
        raise HessianError(f"{at}the Hessian is not positive definite even after damping by "
                           f"{percdamp:g} x its mean diagonal (the block of inputs {k - 1} to "
                           f"{n - 1} is not); raise percdamp", layer=layer)
    if info < 0:  # pragma: no cover - an argument error inside the wrapper
        raise HessianError(f"{at}LAPACK potrf rejected argument {-int(info)}", layer=layer)
    if info2 != 0:
        raise HessianError(f"{at}the Cholesky factor of the damped Hessian is singular",
                           layer=layer)
    del c, c2
    bad = _k.reverse_narrow(b.reshape(-1), n * n, not wide, nt)
    if wide:
        u = b
    else:
        del b
        u = np.frombuffer(mem, dtype=np.float32, count=n * n).reshape(n, n)
        start = -(-4 * n * n // mmap.PAGESIZE) * mmap.PAGESIZE
        if start < nbytes and hasattr(mem, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mem.madvise(mmap.MADV_DONTNEED, start, nbytes - start)  # the float64 half's pages
    d = np.diagonal(u).astype(np.float64)
    limit = float(np.finfo(u.dtype).max)
    if bad or not (d > 0).all() or not (1.0 / d.min() ** 2 < limit):
        raise HessianError(f"{at}the inverse of the damped Hessian leaves "
                           f"{'float64' if wide else 'float32'}'s range (the Hessian is too "
                           "ill-conditioned); raise percdamp", layer=layer)
    return _Factor(u, dead, mem)


def _trtri(lapack, c, c2, b):
    """Invert the Cholesky factor in place (trtri) after potrf; returns (factor, info)."""
    if c2.ctypes.data != b.ctypes.data:  # pragma: no cover - SciPy copied after all
        np.copyto(c, c2)
    c2, info = lapack.dtrtri(c, lower=0, unitdiag=0, overwrite_c=1)
    if c2.ctypes.data != b.ctypes.data:  # pragma: no cover
        np.copyto(c, c2)
    return c2, info


def _share(total, c, cols):
    """The count of the first c of cols columns when `total` are spread evenly (round half up),
    so the blocks' shares add up to `total` exactly."""
    return (2 * total * c + cols) // (2 * cols)


def sparsegpt_workspace_bytes(rows, cols, itemsize, block_size=128):
    """Peak bytes :func:`sparsegpt` holds beyond the weights it reads and the output it
    returns (the output being the pruned weights and the bool mask), for a (rows, cols) layer
    of ``itemsize``-byte floats: the factorisation buffer, or U plus the error matrix, the 16-bit
    weights' float32 working copy, and the block scratch."""
    wide = itemsize == 8
    w = 8 if wide else 4
    factor = 8 * cols * cols
    blocks = rows * min(block_size, cols) * (2 * w + 1)
    work = 0 if itemsize == w else rows * cols * w
    u = cols * cols * w
    return max(factor, u + rows * cols * w + work + blocks)


def sparsegpt(weights, hessian, sparsity=None, *, pattern="unstructured", block_size=128,
              percdamp=0.01, n_threads=None, layer=None, must_prune=None, factor=None):
    """Prune a layer with SparseGPT; returns ``(pruned_weights, SparsityMask)``.

    ``weights``: (out_features, in_features) float16, bfloat16 (``aprender.Bits16``, ml_dtypes or
    torch), float32 or float64 — numpy arrays or CPU torch tensors, never modified.
    ``hessian``: the layer's input Hessian ``XᵀX`` (in_features, in_features), float32 or
    float64, or the layer's ActivationStats collected with ``hessian=True``.
    ``pattern``: "unstructured" (an exact count over the layer, spread over the column blocks),
    "per-row" (an exact count in every row) or N:M such as "2:4" along the input dimension
    (``sparsity`` then implied).  ``block_size``: columns per block (a multiple of M for N:M).
    ``percdamp``: the damping, a fraction of the mean diagonal of H (> 0).  ``layer``: a name
    for error messages.  ``must_prune``: an optional boolean array of the weights' shape marking
    weights that are pruned whatever their saliency (an existing mask's zeros): they are ranked
    below every other weight, so they take their block's (or group's) share first, and they
    are pruned even beyond it (the count is then at least the target).  ``factor``: the
    :func:`hessian_factor` of this Hessian with this ``percdamp`` (``wide`` for float64
    weights), for layers that share one Hessian (factorised once); ``hessian`` is then not
    read again.

    The pruned weights have the input's dtype (a numpy array; bfloat16 from Bits16 or torch
    comes back as Bits16); every pruned position is +0.0 and the mask's count is exact.  See
    the module documentation for the algorithm, precision and memory.  A workspace larger
    than this machine's memory is refused before the Hessian is read, and one the system
    refuses raises InsufficientMemoryError (a MemoryError) naming the layer."""
    try:
        return _sparsegpt(weights, hessian, sparsity, pattern=pattern, block_size=block_size,
                          percdamp=percdamp, n_threads=n_threads, layer=layer,
                          must_prune=must_prune, factor=factor)
    except MemoryError as exc:
        if isinstance(exc, PruningError):
            raise
        raise InsufficientMemoryError(f"{_at(layer)}SparseGPT cannot allocate its workspace "
                                      "(about 8 x in_features**2 bytes and a copy of the "
                                      "weights)") from None


def _sparsegpt(weights, hessian, sparsity, *, pattern, block_size, percdamp, n_threads, layer,
               must_prune, factor):
    pat = _pattern(pattern)
    sparsity = pat.resolve_sparsity(sparsity)
    block_size = check_int(block_size, "block_size", minimum=1)
    percdamp = _percdamp(percdamp)
    f = as_floats(_weights_of(weights), "weights")
    if f.array.ndim != 2:
        raise InvalidShapeError(f"{_at(layer)}SparseGPT needs a 2-D weight (out_features, "
                                f"in_features), got shape {f.shape}")
    rows, cols = f.shape
    if pat.is_nm:
        pat.check_shape(f.shape)
        if pat.m > 256:
            raise InvalidPatternError(f"SparseGPT N:M supports M up to 256, got {pat}")
        if block_size % pat.m:
            raise InvalidArgumentError(f"block_size {block_size} must be a multiple of M={pat.m} "
                                       f"for pattern {pat}")
    nt = resolve_threads(n_threads)
    require_memory(sparsegpt_workspace_bytes(rows, cols, 2 if f.fmt else f.kernel.itemsize),
                   f"{_at(layer)}SparseGPT on a {rows} x {cols} weight")
    if not _is_finite(f.kernel.reshape(-1), f.inf16, nt):
        raise_nonfinite(f, "weights")
    wide = f.dtype_name == "float64"
    if factor is None:
        h = hessian_array(hessian, cols, layer, nt)
    else:
        _check_factor(factor, cols, wide, layer)
    forced = _must_prune(must_prune, (rows, cols))
    wt = np.float64 if wide else np.float32
    keep = np.empty((rows, cols), dtype=np.bool_)
    if rows == 0 or cols == 0:
        return _result(f, np.zeros((rows, cols), wt), weights, nt, layer), \
            SparsityMask(keep, pat, _trusted=True)
    if factor is None:
        factor = _factor(h, percdamp, wide, layer, nt)
    u = factor.u
    w = _working_copy(f, weights, wt)
    if factor.dead.any():
        w[:, factor.dead] = 0
    err = np.empty((rows, cols), dtype=wt)
    kv = keep.view(np.uint8)
    bs = min(block_size, cols)
    total = rows * cols
    k_all = prune_count(sparsity, total)
    k_row = prune_count(sparsity, cols)
    with limit_pools(nt, serial_blas=True):  # each block's matmul alternates with a kernel
        _blocks(w, err, u, kv, forced, pat, rows, cols, bs, k_all, k_row, nt)
    del err, factor, u
    return _result(f, w, weights, nt, layer), SparsityMask(keep, pat, _trusted=True)


def _blocks(w, err, u, kv, forced, pat, rows, cols, bs, k_all, k_row, nt):
    """SparseGPT's column blocks: the lazy update, the block's mask, the column loop."""
    wt = w.dtype
    tmp = np.empty(rows * bs, dtype=wt)
    sal = np.empty(rows * bs, dtype=wt)
    bk = np.empty(rows * bs, dtype=np.uint8)
    none = np.empty((0, 0), dtype=np.uint8)
    for c0 in range(0, cols, bs):
        c1 = min(cols, c0 + bs)
        width = c1 - c0
        if c0:  # the lazy update: every earlier column's error at once
            t = tmp[:rows * width].reshape(rows, width)
            np.matmul(err[:, :c0], u[:c0, c0:c1], out=t)
            blk = w[:, c0:c1]
            np.subtract(blk, t, out=blk)
        if pat.is_nm:
            _k.prune_block(w, err, u, c0, c1, none, pat.n, pat.m, forced, kv, nt)
            continue
        s = sal[:rows * width].reshape(rows, width)
        _k.saliency(w, c0, c1, u, s, forced, nt)
        b = bk[:rows * width]
        src = ArraySource(as_floats(s, "saliency"), "saliency")
        if pat.is_per_row:
            select_rows(src, b, rows, width, _share(k_row, c1, cols) - _share(k_row, c0, cols),
                        0, nt)
        else:
            select_mask(src, b, _share(k_all, c1, cols) - _share(k_all, c0, cols), 0, nt)
        _k.prune_block(w, err, u, c0, c1, b.reshape(rows, width), 0, 0, forced, kv, nt)


def _check_factor(factor, cols, wide, layer):
    """A factor handed to sparsegpt must be hessian_factor's, of the weights' size and width."""
    if not isinstance(factor, _Factor):
        raise InvalidArgumentError(f"{_at(layer)}factor must come from hessian_factor(), got "
                                   f"{type(factor).__name__}")
    if factor.u.shape != (cols, cols):
        raise ShapeMismatchError(f"{_at(layer)}the factor is {factor.u.shape[0]} x "
                                 f"{factor.u.shape[1]} but the weights have {cols} input "
                                 "columns")
    if (factor.u.dtype == np.float64) != wide:
        raise InvalidDTypeError(f"{_at(layer)}the factor is {factor.u.dtype} but the weights "
                                f"need {'float64' if wide else 'float32'} (hessian_factor's "
                                "wide=True for float64 weights)")


def _must_prune(mask, shape):
    """The must_prune mask as a C-contiguous uint8 array of ``shape`` (0 x 0 for None)."""
    if mask is None:
        return np.empty((0, 0), np.uint8)
    if is_torch(mask):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ShapeMismatchError(f"must_prune has shape {m.shape}, the weights {tuple(shape)}")
    if m.dtype != np.bool_:
        raise InvalidDTypeError(f"must_prune must be a boolean array, got {m.dtype}")
    return np.ascontiguousarray(m).view(np.uint8)


def _working_copy(f, original, wt):
    """The weights as a float32 (float64) array of our own, copied once: 16-bit weights are
    decoded; a contiguous copy that as_floats already made (Fortran order, big-endian) is used
    as it is."""
    if f.fmt:
        return decode16(f.kernel, f.fmt)
    inner = _weights_of(original)
    if is_torch(inner):
        inner = to_numpy_view(inner)
    if f.array.dtype == wt and f.array.flags.writeable and isinstance(inner, np.ndarray) \
            and not np.may_share_memory(f.array, inner):
        return f.array
    return np.array(f.array, dtype=wt, copy=True)


def _result(f, w, original, nt, layer):
    """The updated float32/float64 weights ``w`` in the input's dtype."""
    if not _is_finite(w.reshape(-1), 0, nt):
        i = int(np.argmax(~np.isfinite(w.reshape(-1))))
        idx = tuple(int(v) for v in np.unravel_index(i, w.shape))
        raise NumericalInstabilityError(f"{_at(layer)}the updated weight at {idx} is not finite "
                                        "(an ill-conditioned Hessian? raise percdamp)",
                                        index=idx, value="inf")
    if not f.fmt:
        return w if w.dtype == f.array.dtype else w.astype(f.array.dtype)
    bits = np.empty(w.shape, dtype=np.uint16)
    if _k.narrow16(w.reshape(-1), bits.reshape(-1), f.fmt, nt):
        i = int(np.argmax((bits.reshape(-1) & f.inf16) == f.inf16))
        idx = tuple(int(v) for v in np.unravel_index(i, w.shape))
        raise NumericalInstabilityError(f"{_at(layer)}the updated weight at {idx} overflows "
                                        f"{f.dtype_name}", index=idx, value="inf")
    inner = _weights_of(original)
    if isinstance(inner, Bits16):
        return Bits16(bits, f.dtype_name)
    if isinstance(inner, np.ndarray) and inner.dtype.itemsize == 2 and inner.dtype.kind != "u":
        return bits.view(f.array.dtype)  # float16, or ml_dtypes bfloat16
    return Bits16(bits, f.dtype_name) if f.dtype_name == "bfloat16" else bits.view(np.float16)


class SparseGPTImportance:
    """SparseGPT's saliency ``w[i, j]² / U[j, j]²`` as ImportanceScores, ``U`` being the upper
    Cholesky factor of the damped inverse of the Hessian scaled to a mean diagonal of 1 (the
    criterion :func:`sparsegpt` uses for a layer's first block; later blocks see weights
    already updated; the scale makes the scores independent of the activations' units).  For users who only want
    scores: pruning by them alone is not SparseGPT (no weight update).

    ``SparseGPTImportance(layer_name)`` looks the layer's ActivationStats (with a Hessian) up in
    the CalibrationContext passed to :meth:`compute`; ``SparseGPTImportance()`` takes the
    ActivationStats directly.  Scores are float32 (float64 for float64 weights)."""

    name = "sparsegpt"
    requires_calibration = True

    def __init__(self, layer_name=None, *, percdamp=0.01):
        if layer_name is not None and not isinstance(layer_name, str):
            raise InvalidArgumentError(f"SparseGPTImportance layer_name must be a string or "
                                       f"None, got {type(layer_name).__name__} "
                                       f"{short_repr(layer_name)}")
        self.layer_name = layer_name
        self.percdamp = _percdamp(percdamp)

    def __repr__(self):
        return f"SparseGPTImportance({self.layer_name!r})" if self.layer_name is not None \
            else "SparseGPTImportance()"

    def compute(self, layer_or_weights, calibration=None, *, n_threads=None) -> ImportanceScores:
        stats = layer_stats(self.layer_name, calibration, "SparseGPT", "SparseGPTImportance")
        f = as_floats(_weights_of(layer_or_weights), "weights")
        if f.array.ndim != 2:
            raise InvalidShapeError(f"SparseGPT scores need a 2-D weight (out_features, "
                                    f"in_features), got shape {f.shape}")
        nt = resolve_threads(n_threads)
        if not _is_finite(f.kernel.reshape(-1), f.inf16, nt):
            raise_nonfinite(f, "weights")
        h = hessian_array(stats, f.shape[1], self.layer_name, nt)
        wide = f.dtype_name == "float64"
        factor = _factor(h, self.percdamp, wide, self.layer_name, nt)
        w = decode16(f.kernel, f.fmt) if f.fmt else np.array(f.array, dtype=np.float64 if wide
                                                             else np.float32)
        if factor.dead.any():
            w[:, factor.dead] = 0
        out = np.empty(f.shape, dtype=w.dtype)
        if f.size:
            _k.saliency(w, 0, f.shape[1], factor.u, out, np.empty((0, 0), np.uint8), nt)
            v = out.astype(np.float64, copy=False)
            st = ImportanceStats(float(v.min()), float(v.max()), float(v.mean()),
                                 float(v.std()), int(v.size))
        else:
            st = ImportanceStats(float("nan"), float("nan"), float("nan"), float("nan"), 0)
        return ImportanceScores(out, self.name, st)
