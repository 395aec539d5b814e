"""Slow, obviously-correct numpy versions of every kernel, for tests and benchmarks.

They work on float64 copies (exact for every supported input dtype) and stable sorts, and follow
the same documented rules as the kernels:

* counting: prune the integer nearest sparsity * n (computed in float64), halves rounding down;
* ties: among equal scores the lowest flat C-order index is pruned first;
* N:M: keep the n largest of each group of m along the axis; ties prune the lowest index first;
* structured: blocks scored by the float64 sum of their values, then the unstructured rule.
"""
import math

import numpy as np

__all__ = ["to_float64", "prune_count", "unstructured_mask", "per_row_mask", "nm_mask",
           "global_masks", "block_mask", "row_mask", "column_mask", "scores", "stats",
           "apply_mask"]


def to_float64(values):
    """Exact float64 copy of a float16/bfloat16/float32/float64 array (or aprender.Bits16)."""
    if hasattr(values, "bits") and hasattr(values, "format"):
        bits = np.asarray(values.bits, dtype=np.uint16)
        if values.format == "bfloat16":
            return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return bits.view(np.float16).astype(np.float64)
    arr = np.asarray(values)
    if arr.dtype.name == "bfloat16":
        return arr.astype(np.float32).astype(np.float64)
    return arr.astype(np.float64)


def prune_count(sparsity, n):
    p = float(sparsity) * n
    lo = math.floor(p)
    return int(lo if p - lo <= 0.5 else lo + 1)


def _order_values(v):
    # -0.0 and +0.0 are equal scores: canonicalise so that the stable sort treats them as ties
    v = np.where(v == 0, 0.0, v)
    return v


def unstructured_mask(values, sparsity, magnitude=False):
    v = to_float64(values)
    if magnitude:
        v = np.abs(v)
    flat = _order_values(v.reshape(-1))
    k = prune_count(sparsity, flat.size)
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:k]] = False
    return keep.reshape(v.shape)


def per_row_mask(values, sparsity, magnitude=False):
    v = to_float64(values)
    if v.size == 0:
        return np.ones(v.shape, dtype=bool)
    if magnitude:
        v = np.abs(v)
    rows = v.reshape(-1, v.shape[-1]) if v.ndim else v.reshape(1, 1)
    keep = np.ones(rows.shape, dtype=bool)
    k = prune_count(sparsity, rows.shape[1])
    for i in range(rows.shape[0]):
        keep[i, np.argsort(_order_values(rows[i]), kind="stable")[:k]] = False
    return keep.reshape(v.shape)


def nm_mask(values, n, m, axis=-1, magnitude=False):
    v = to_float64(values)
    if magnitude:
        v = np.abs(v)
    moved = np.moveaxis(v, axis, -1)
    groups = _order_values(moved.reshape(-1, m))
    keep = np.zeros(groups.shape, dtype=bool)
    for g in range(groups.shape[0]):
        order = np.argsort(groups[g], kind="stable")  # ascending; equal: lower index first
        keep[g, order[m - n:]] = True
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def global_masks(values_list, sparsity, magnitude=False):
    vs = [to_float64(v) for v in values_list]
    if magnitude:
        vs = [np.abs(v) for v in vs]
    flat = _order_values(np.concatenate([v.reshape(-1) for v in vs])) if vs else np.zeros(0)
    k = prune_count(sparsity, flat.size)
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:k]] = False
    out, start = [], 0
    for v in vs:
        out.append(keep[start:start + v.size].reshape(v.shape))
        start += v.size
    return out


def _as_2d(v):
    if v.ndim == 1:
        return v.reshape(1, -1)
    return v.reshape(-1, v.shape[-1])


def block_mask(values, sparsity, block):
    """Blocks scored by the float64 sum of their values in row-major order (the kernel's order:
    sequential, so the result never depends on the thread count)."""
    v = to_float64(values)
    if v.size == 0:
        return np.ones(v.shape, dtype=bool)
    v2 = _as_2d(v)
    h, w = block
    rows, cols = v2.shape
    sums = np.zeros((rows // h, cols // w))
    for i in range(rows // h):
        for j in range(cols // w):
            blk = v2[i * h:(i + 1) * h, j * w:(j + 1) * w].reshape(-1)
            sums[i, j] = np.cumsum(blk)[-1]  # sequential, row-major
    bkeep = unstructured_mask(sums, sparsity)
    keep = np.repeat(np.repeat(bkeep, h, axis=0), w, axis=1)
    return keep.reshape(v.shape)


def row_mask(values, sparsity):
    v2 = _as_2d(to_float64(values))
    if v2.size == 0:
        return np.ones(np.shape(to_float64(values)), dtype=bool)
    return block_mask(values, sparsity, (1, v2.shape[1]))


def column_mask(values, sparsity):
    v2 = _as_2d(to_float64(values))
    if v2.size == 0:
        return np.ones(np.shape(to_float64(values)), dtype=bool)
    return block_mask(values, sparsity, (v2.shape[0], 1))


def scores(weights, p):
    """|w|**p rounded to the weights' dtype (what MagnitudeImportance stores)."""
    arr = np.asarray(weights)
    w = to_float64(arr)
    if p == 1:
        s = np.abs(w)
    elif p == 2:
        s = np.square(w.astype(np.float32)).astype(np.float64) if arr.dtype != np.float64 \
            else np.square(w)
    else:
        s = np.abs(w) ** p
    return s.astype(arr.dtype) if arr.dtype.name != "bfloat16" else \
        s.astype(np.float32).astype(arr.dtype)


def stats(score_values):
    s = to_float64(score_values).reshape(-1)
    return float(s.min()), float(s.max()), float(s.mean()), float(s.std())


def apply_mask(weights, keep):
    out = np.array(weights, copy=True)
    out[~np.asarray(keep, dtype=bool)] = 0
    return out
