"""Least-squares compensation of the layer that reads a sliced input.

After removing input columns of ``y = W x`` (the down projection's for MLP channels, the output
projection's for heads), the kept columns ``S`` are refit against the dense layer's output on
the calibration inputs: ``W' = W · H[:, S] · (H[S, S] + λI)⁻¹`` with ``H = XᵀX`` and SparseGPT's
damping ``λ = percdamp · mean(diag H)``.
"""
import numpy as np

from ..errors import HessianError, InvalidArgumentError

__all__ = ["compensate_columns"]


def compensate_columns(w, hessian, kept, percdamp=0.01):
    """``w[:, kept]`` refit (float64 arithmetic; returned as float32 for float16/bfloat16/
    float32 weights, float64 for float64)."""
    w = np.asarray(w)
    out_dtype = np.float64 if w.dtype == np.float64 else np.float32
    w = w.astype(np.float64)
    h = np.asarray(hessian, dtype=np.float64)
    kept = np.asarray(kept, dtype=np.intp)
    if w.ndim != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise InvalidArgumentError(f"a Hessian of shape {h.shape} for weights of shape "
                                   f"{w.shape}")
    if not np.isfinite(h).all():
        raise HessianError("the Hessian holds NaN or infinity")
    diag = np.diag(h).copy()
    diag[diag == 0] = 1.0  # dead inputs count as 1 in the mean, as SparseGPT damps
    hss = h[np.ix_(kept, kept)]
    hss[np.diag_indices_from(hss)] += percdamp * diag.mean()
    try:
        x = np.linalg.solve(hss, h[kept] @ w.T)  # (|S|, out)
    except np.linalg.LinAlgError:
        raise HessianError("H[S, S] is singular even after damping; raise percdamp") from None
    return np.ascontiguousarray(x.T).astype(out_dtype)
