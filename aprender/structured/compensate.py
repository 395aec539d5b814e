"""Least-squares compensation after structured pruning.

Removing input channels of a linear layer ``y = W x`` (the down projection's columns for MLP
channels, the output projection's columns for heads) changes its output.  With the layer's input
Hessian ``H = XᵀX`` over the calibration tokens (rows of ``X``), the kept columns ``S`` are
refit so that the sliced layer reproduces the dense layer's output on those tokens in least
squares:

    min over W'  ||X Wᵀ - X_S W'ᵀ||²_F + λ ||W'||²_F     =>     W' = W · H[:, S] · (H[S, S] + λI)⁻¹

with SparseGPT's damping ``λ = percdamp * mean(diag H)`` (dead inputs, ``H[j, j] == 0``,
counted as 1 in the mean; :func:`aprender.pruning.reconstruct.dead_and_mean`), the same Hessian
checks as SparseGPT (:func:`aprender.pruning.reconstruct.hessian_array`), float64 arithmetic
(``H`` scaled to a mean diagonal of 1, which changes nothing in ``W'``), and a Cholesky solve
(LAPACK potrf/potrs through SciPy, the ``[sparsegpt]`` extra).  A kept input that never fired
(a dead column: nothing in the calibration data constrains it) keeps its weights unchanged.

Memory beyond the input: the weights in float64, ``H[S, S]`` in float64, ``H[S, :] Wᵀ``
(|S| x out_features float64), and a bounded block of Hessian rows.

The result has the weights' dtype: float64 is rounded once to float32, float16 or bfloat16 (for
the 16-bit formats through float32 rounded to odd, which makes the double rounding exact).
"""
import numpy as np

from .._threads import limit_pools
from .._validation import as_array, as_floats, raise_nonfinite, resolve_threads, short_repr
from ..errors import (HessianError, InvalidArgumentError, InvalidDTypeError, InvalidShapeError,
                      NumericalInstabilityError)
from ..pruning.importance import _weights_of
from ..pruning.reconstruct import (_lapack, _percdamp, _result, dead_and_mean, hessian_array)
from ..pruning.selection import _is_finite

__all__ = ["compensate_columns"]

_BLOCK = 1 << 22  # elements of the Hessian's rows widened to float64 at a time


def _at(layer):
    return f"layer {short_repr(layer)}: " if layer is not None else ""


def _kept(kept, cols, layer):
    """The kept column indices as a 1-D intp array: integers, in [0, cols), unique."""
    k = as_array(kept, f"{_at(layer)}kept")
    if k.dtype.kind == "b":
        raise InvalidDTypeError(f"{_at(layer)}kept must hold column indices, got a boolean "
                                "array (use np.flatnonzero(mask))")
    if k.size == 0:
        k = k.astype(np.intp)
    if k.dtype.kind not in "iu":
        raise InvalidDTypeError(f"{_at(layer)}kept must hold integer column indices, got dtype "
                                f"{k.dtype}")
    if k.ndim != 1:
        raise InvalidShapeError(f"{_at(layer)}kept must be 1-D, got shape {k.shape}")
    bad = (k < 0) | (k >= cols)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidArgumentError(f"{_at(layer)}kept[{i}] = {int(k[i])} is outside the "
                                   f"weights' {cols} input columns")
    k = k.astype(np.intp)
    if np.unique(k).size != k.size:
        u, c = np.unique(k, return_counts=True)
        raise InvalidArgumentError(f"{_at(layer)}kept lists column {int(u[c > 1][0])} more "
                                   "than once")
    return k


def _float64(f):
    """The weights (a Floats) as a new float64 array."""
    if f.fmt:
        from .._validation import decode16
        return decode16(f.kernel, f.fmt).astype(np.float64)
    return f.array.astype(np.float64)


def _odd_float32(x):
    """float64 ``x`` rounded to float32 with round-to-odd: the float32 neighbour of x whose
    last significand bit is 1 when x is not a float32.  Rounding that to a 16-bit format
    (round-to-nearest-even) equals rounding x directly, as float32 has over two more bits."""
    r = x.astype(np.float32)
    inexact = r.astype(np.float64) != x
    even = (r.view(np.uint32) & 1) == 0
    fix = inexact & even & np.isfinite(r)
    if fix.any():
        # the other neighbour, on x's side of r, is odd
        toward = np.where(x[fix] > r[fix].astype(np.float64), np.float32(np.inf),
                          np.float32(-np.inf))
        r[fix] = np.nextafter(r[fix], toward)
    return r


def _in_dtype(f, w64, original, nt, layer):
    if f.fmt:
        return _result(f, _odd_float32(w64), original, nt, layer)
    out = w64.astype(f.array.dtype, copy=False)
    if not _is_finite(out.reshape(-1), 0, nt):
        i = int(np.argmax(~np.isfinite(out.reshape(-1))))
        idx = tuple(int(v) for v in np.unravel_index(i, out.shape))
        raise NumericalInstabilityError(f"{_at(layer)}the compensated weight at {idx} is not "
                                        f"finite in {f.dtype_name} (an ill-conditioned Hessian? "
                                        "raise percdamp)", index=idx, value="inf")
    return out


def compensate_columns(w, hessian, kept, percdamp=0.01, *, layer=None, n_threads=None):
    """The kept input columns of ``w`` refit by least squares: ``W · H[:, S] · (H[S, S] +
    λI)⁻¹``, an array of shape (out_features, len(kept)) in ``w``'s dtype, its columns in the
    order of ``kept``.

    ``w``: (out_features, in_features) float16, bfloat16 (``aprender.Bits16``, ml_dtypes or
    torch), float32 or float64, never modified.  ``hessian``: the layer's input ``XᵀX``
    (in_features, in_features; array, CPU tensor or ActivationStats with a Hessian).
    ``kept``: the column indices kept (integers, unique, in range).  ``percdamp``: the
    damping as a fraction of the mean diagonal (> 0).  ``layer`` names the layer in errors.

    Raises HessianError (not square, not symmetric, non-finite, negative or all-zero diagonal,
    not positive definite after damping), ShapeMismatchError (a Hessian of another size),
    InvalidShapeError / InvalidDTypeError / InvalidArgumentError for bad weights or indices,
    NumericalInstabilityError for non-finite weights or a result that leaves the dtype's range.
    See the module documentation for the method."""
    nt = resolve_threads(n_threads)
    percdamp = _percdamp(percdamp)
    original = _weights_of(w)
    f = as_floats(original, f"{_at(layer)}weights")
    if f.array.ndim != 2:
        raise InvalidShapeError(f"{_at(layer)}compensation needs a 2-D weight (out_features, "
                                f"in_features), got shape {f.shape}")
    rows, cols = f.shape
    if f.size and not _is_finite(f.kernel.reshape(-1), f.inf16, nt):
        raise_nonfinite(f, f"{_at(layer)}weights")
    idx = _kept(kept, cols, layer)
    h = hessian_array(hessian, cols, layer, nt)
    dead, mean = dead_and_mean(h)
    w64 = _float64(f)
    out = np.empty((rows, idx.size), dtype=np.float64)
    is_dead = dead[idx]
    out[:, is_dead] = w64[:, idx[is_dead]]
    live = idx[~is_dead]
    if live.size and rows:
        hs = h[np.ix_(live, live)].astype(np.float64) / mean
        hs[np.diag_indices_from(hs)] += percdamp
        rhs = np.empty((live.size, rows), dtype=np.float64)  # H[S, :] Wᵀ / mean
        step = max(1, _BLOCK // cols)  # rows of H[S, :] widened to float64 at a time
        with limit_pools(nt):  # matrix products alone: no kernel of ours runs beside them
            for r0 in range(0, live.size, step):
                np.matmul(h[live[r0:r0 + step]].astype(np.float64), w64.T,
                          out=rhs[r0:r0 + step])
        rhs /= mean
        del w64
        with limit_pools(nt, serial_blas=True):  # LAPACK: one thread (see aprender._threads)
            lapack = _lapack()
            c, info = lapack.dpotrf(hs, lower=0, clean=1, overwrite_a=1)
            if info > 0:
                raise HessianError(f"{_at(layer)}H[S, S] (the kept inputs' block of the "
                                   "Hessian) is not positive definite even after damping by "
                                   f"{percdamp:g} x the mean diagonal; raise percdamp",
                                   layer=layer)
            if info < 0:  # pragma: no cover - an argument error inside the wrapper
                raise HessianError(f"{_at(layer)}LAPACK potrf rejected argument {-int(info)}",
                                   layer=layer)
            x, info = lapack.dpotrs(c, rhs, lower=0, overwrite_b=1)
            if info != 0:  # pragma: no cover - potrs fails only on bad arguments
                raise HessianError(f"{_at(layer)}LAPACK potrs failed ({int(info)})",
                                   layer=layer)
            out[:, ~is_dead] = x.T
    return _in_dtype(f, out, original, nt, layer)
