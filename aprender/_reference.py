"""Slow, obviously-correct numpy versions of every kernel, for tests and benchmarks.

They work on float64 copies (exact for every supported input dtype) and stable sorts, and follow
the same documented rules as the kernels:

* counting: prune the integer nearest sparsity * n (computed in float64), halves rounding down;
* ties: among equal scores the lowest flat C-order index is pruned first;
* N:M: keep the n largest of each group of m along the axis; ties prune the lowest index first;
* structured: blocks scored by the float64 sum of their values, then the unstructured rule;
* 2:4 layouts: the two largest |w| of each group of four are kept (the N:M rule); a group stores
  two positions, filled by a fixed table when it has fewer than two non-zeros.
"""
import math

import numpy as np

__all__ = ["to_float64", "prune_count", "unstructured_mask", "per_row_mask", "nm_mask",
           "global_masks", "block_mask", "row_mask", "column_mask", "scores", "stats",
           "apply_mask", "sum_squares_chunk_rows", "sum_squares", "hessian", "wanda_scores",
           "score_sum", "outlier_ratio", "owl_layer_sparsities", "SPARSE24_FILL", "sparse24_select",
           "sparse24_stored", "sparse24_pair_select", "sparse24_pair_stored", "sparsegpt"]


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


# ----------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------

def sum_squares_chunk_rows(d):
    """Rows per chunk of the sum-of-squares kernel for rows of d elements."""
    return max(256, min(4096, (1 << 20) // max(d, 1)))


def sum_squares(x, where=None, start=None):
    """start + Σ_rows x**2 per feature (last axis), float64, in the kernel's documented order:
    the selected rows split into chunks of sum_squares_chunk_rows(d) rows, each chunk summed
    row after row, the chunk sums folded in order and added to ``start``."""
    v = to_float64(x)
    d = v.shape[-1]
    rows = v.reshape(-1, d)
    if where is not None:
        rows = rows[np.asarray(where, dtype=bool).reshape(-1)]
    out = np.zeros(d) if start is None else np.array(start, dtype=np.float64)
    r = sum_squares_chunk_rows(d)
    chunks = []
    for c in range(0, rows.shape[0], r):
        acc = np.zeros(d)
        for row in rows[c:c + r]:
            acc = acc + row * row
        chunks.append(acc)
    if chunks:
        total = chunks[0]
        for p in chunks[1:]:
            total = total + p
        out = out + total
    return out


def hessian(x, where=None):
    """XᵀX of the selected rows in float64 (exact products, float64 sums)."""
    v = to_float64(x)
    rows = v.reshape(-1, v.shape[-1])
    if where is not None:
        rows = rows[np.asarray(where, dtype=bool).reshape(-1)]
    return rows.T @ rows


def wanda_scores(weights, sum_sq):
    """|w| * sqrt(sum_sq) per input feature: float32(|w|) * float32(sqrt(sum_sq)) rounded once
    to float32 for 16/32-bit weights, float64 for float64 weights."""
    arr = np.asarray(weights.bits if hasattr(weights, "bits") else weights)
    w = to_float64(weights)
    norms = np.sqrt(np.asarray(sum_sq, dtype=np.float64))
    if arr.dtype == np.float64:
        return np.abs(w) * norms
    # the product of two float32 values is exact in float64; one rounding to float32
    return (np.abs(w).astype(np.float32).astype(np.float64)
            * norms.astype(np.float32).astype(np.float64)).astype(np.float32)


def score_sum(values):
    """Σ values in float64: chunks of 65536 elements summed in order, chunk sums folded in
    order (the kernel's order)."""
    v = to_float64(values).reshape(-1)
    total = 0.0
    for c in range(0, v.size, 65536):
        s = 0.0
        for e in v[c:c + 65536].tolist():
            s += e
        total = s if c == 0 else total + s
    return total


def outlier_ratio(groups, m):
    """OWL: fraction of the scores (all arrays of the group together) > m * their mean."""
    vs = [to_float64(g).reshape(-1) for g in groups]
    n = sum(v.size for v in vs)
    if n == 0:
        return 0.0
    total = 0.0
    for v in vs:
        total += score_sum(v)
    thr = m * (total / n)
    return sum(int((v > thr).sum()) for v in vs) / n


def owl_layer_sparsities(ratios, sizes, target, lam):
    """OWL layer sparsities before clamping: target - 2*lam*(N_l - weighted mean of N), with
    N the ratios min-max normalised over the non-empty layers (all 0 if they are equal)."""
    live = [i for i, n in enumerate(sizes) if n > 0]
    if not live:
        return [float(target)] * len(ratios)
    lo = min(ratios[i] for i in live)
    hi = max(ratios[i] for i in live)
    norm = [(r - lo) / (hi - lo) if hi > lo else 0.0 for r in ratios]
    mean = sum(norm[i] * sizes[i] for i in live) / sum(sizes[i] for i in live)
    return [target - 2.0 * lam * (v - mean) for v in norm]


# the positions a 2:4 group with fewer than two non-zeros stores, by its non-zero flags (bit t:
# element t), as documented in aprender.sparse24 (PyTorch's CUTLASS conversion does the same)
SPARSE24_FILL = {0b0000: (2, 3), 0b0001: (0, 2), 0b0010: (1, 2), 0b0100: (2, 3), 0b1000: (2, 3)}


def sparse24_select(values):
    """The dense weight 2:4 selection leaves: the two largest |w| of every group of four along the
    last axis kept (ties: the lowest index pruned), the others zeroed; in the input's dtype."""
    out = np.array(values, copy=True)
    out[~nm_mask(values, 2, 4, magnitude=True)] = 0
    return out


def sparse24_stored(dense2d):
    """The positions a 2:4 layout stores for a 2-D weight with at most two non-zeros in each group
    of four (bool, same shape): the non-zeros, completed to two per group by SPARSE24_FILL."""
    nz = to_float64(dense2d) != 0
    rows, cols = nz.shape
    stored = np.zeros_like(nz)
    for r in range(rows):
        for g in range(cols // 4):
            f = nz[r, 4 * g:4 * g + 4]
            idx = tuple(int(i) for i in np.flatnonzero(f))
            if len(idx) < 2:
                idx = SPARSE24_FILL[sum(int(b) << t for t, b in enumerate(f))]
            if len(idx) != 2:
                raise ValueError(f"row {r}, group {g} has {len(idx)} non-zeros; 2:4 stores two")
            stored[r, 4 * g + idx[0]] = stored[r, 4 * g + idx[1]] = True
    return stored


def sparsegpt(weights, hessian, sparsity=None, *, n=None, m=None, per_row=False, block_size=128,
              percdamp=0.01, force_keep=None, must_prune=None):
    """SparseGPT as the paper writes it, in float64 with plain numpy and no lazy batching:
    H⁻¹ by np.linalg.inv, U = its upper Cholesky factor; for each column in order, the column's
    error (w - q) / U[c, c] is subtracted, times U[c, c+1:], from every later column at once.
    Masks: per block of ``block_size`` columns, chosen at the block's start by w² / U[j, j]²
    (unstructured: the block's share round(2 k c1 + cols) // (2 cols) minus the same at c0 of
    the layer's count k; per_row: the same share of every row's count; N:M (n kept of every m):
    each group chosen when the loop reaches it).  Ties prune the lowest index first.

    Returns (weights float64, keep bool, decisions): ``decisions`` lists, per selection, the
    saliencies compared and the keep flags chosen, so a test can check that a kernel's choice
    is also a valid one where float32 rounding separates near-equal saliencies.
    ``force_keep``: use this keep-mask instead of choosing (the decisions are still recorded).
    ``must_prune``: weights ranked below all others (saliency -1) and pruned in any case."""
    w = to_float64(weights).copy()
    h = np.array(hessian, dtype=np.float64)
    rows, cols = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.arange(cols), np.arange(cols)] += percdamp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H⁻¹ = Uᵀ U
    keep = np.ones((rows, cols), dtype=bool)
    decisions = []
    k_all = prune_count(sparsity, rows * cols) if n is None else 0
    k_row = prune_count(sparsity, cols) if n is None else 0

    def share(total, c):
        return (2 * total * c + cols) // (2 * cols)

    for c0 in range(0, cols, block_size):
        c1 = min(cols, c0 + block_size)
        if n is None:
            sal = w[:, c0:c1] ** 2 / np.diag(u)[c0:c1] ** 2
            if must_prune is not None:
                sal = np.where(must_prune[:, c0:c1], -1.0, sal)
            blk = np.ones(sal.shape, dtype=bool)
            if per_row:
                kb = share(k_row, c1) - share(k_row, c0)
                for r in range(rows):
                    blk[r, np.argsort(sal[r], kind="stable")[:kb]] = False
            else:
                kb = share(k_all, c1) - share(k_all, c0)
                blk.reshape(-1)[np.argsort(sal.reshape(-1), kind="stable")[:kb]] = False
            if force_keep is not None:
                blk = np.array(force_keep[:, c0:c1], dtype=bool)
            decisions.append(("rows" if per_row else "block", sal, blk))
            keep[:, c0:c1] = blk if must_prune is None else blk & ~must_prune[:, c0:c1]
        for c in range(c0, c1):
            if n is not None and (c - c0) % m == 0:
                sal = w[:, c:c + m] ** 2 / np.diag(u)[c:c + m] ** 2
                if must_prune is not None:
                    sal = np.where(must_prune[:, c:c + m], -1.0, sal)
                grp = np.ones(sal.shape, dtype=bool)
                for r in range(rows):
                    grp[r, np.argsort(sal[r], kind="stable")[:m - n]] = False
                if force_keep is not None:
                    grp = np.array(force_keep[:, c:c + m], dtype=bool)
                decisions.append(("rows", sal, grp))
                keep[:, c:c + m] = grp if must_prune is None else grp & ~must_prune[:, c:c + m]
            q = np.where(keep[:, c], w[:, c], 0.0)
            e = (w[:, c] - q) / u[c, c]
            w[:, c] = q
            w[:, c + 1:] -= np.outer(e, u[c, c + 1:])
    return w, keep, decisions


def sparse24_pair_select(values):
    """The dense weight the float32 cutlass layout's select=True leaves: of every pair of
    consecutive elements along the last axis the larger |w| kept (a tie keeps the second: the
    lowest index is pruned), the other zeroed; in the input's dtype."""
    out = np.array(values, copy=True)
    out[~nm_mask(values, 1, 2, magnitude=True)] = 0
    return out


def sparse24_pair_stored(dense2d):
    """The element of each pair the float32 cutlass layout stores (bool, same shape): the
    non-zero one, the second when neither is non-zero (PyTorch's code 0b1110); a pair with two
    non-zeros raises ValueError."""
    nz = to_float64(dense2d) != 0
    pairs = nz.reshape(nz.shape[0], -1, 2)
    if np.any(pairs.all(axis=-1)):
        raise ValueError("a pair has two non-zeros; the float32 cutlass layout stores one")
    stored = np.zeros_like(pairs)
    stored[..., 0] = pairs[..., 0]
    stored[..., 1] = ~pairs[..., 0]
    return stored.reshape(nz.shape)
