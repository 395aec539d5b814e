"""OWL: Outlier Weighed Layerwise sparsity (Yin et al., 2024, "Outlier Weighed Layerwise
Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity").

Layers with more outliers in their Wanda scores are pruned less.  For each layer l:

1. the outlier ratio ``D_l``: the fraction of the layer's scores strictly greater than
   ``m`` times the layer's mean score (:func:`owl_outlier_ratio`);
2. the ratios are normalised over the layers to ``[0, 1]``: ``N_l = (D_l - min D) / (max D -
   min D)`` (all 0 when every layer has the same ratio);
3. the layer sparsity is ``s_l = s - 2λ (N_l - N̄)`` where ``N̄`` is the mean of ``N`` weighted
   by the layers' sizes: the sparsities span an interval of width 2λ (``[s - λ, s + λ]`` when
   the normalised ratios average 1/2, as in the paper) and their size-weighted mean is
   exactly ``s`` (the published code centres an unweighted mean over equal-sized blocks);
4. integer prune counts (:func:`owl_allocation`): each ``s_l`` is clamped to ``[0, 1]``, one
   common shift restores the total after clamping, and the counts are rounded by largest
   remainder (ties: lower layer index first) so that they add up to exactly
   ``round(s * total)`` (halves down), the count every aprender function prunes for a
   fraction ``s`` of ``total`` elements.

With the per-row pattern the counts are honoured exactly, rows of a layer differing by at
most one (see :class:`OwlAllocation`); N:M patterns cannot carry per-layer sparsities and are
refused with OWL.

The paper's "layer" is a transformer block (all its Linear weights together): pass a group of
score arrays per block to get that, or one array per weight for a per-weight allocation.
"""
import math
import numbers
from dataclasses import dataclass

import numpy as np

from .._kernels import calib as _calib
from .._validation import (as_floats, as_real, check_sparsity, prune_count, raise_nonfinite,
                           resolve_threads, short_repr, size_text)
from ..errors import InvalidArgumentError, InvalidShapeError, NumericalInstabilityError

__all__ = ["owl_outlier_ratio", "owl_allocation", "owl_sparsities", "OwlAllocation"]

_INT64_MAX = (1 << 63) - 1


def _check_m(m):
    value = as_real(m, "OWL m (the outlier threshold, a multiple of the mean score)")
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"OWL m must be a finite number > 0, got {short_repr(m)}")
    return value


def _check_lam(lam):
    value = as_real(lam, "OWL lam (λ, the half-width of the sparsity range)")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidArgumentError(f"OWL lam must be in [0, 1], got {short_repr(lam)}")
    return value


def _group(scores):
    """A single score array (ndarray, ImportanceScores, Bits16, tensor) or a list/tuple of them."""
    if isinstance(scores, (list, tuple)):
        return list(scores)
    return [scores]


def _outliers(scores, m, nt, label):
    """(elements, elements above m x mean) of one group of score arrays."""
    floats = [as_floats(s, label) for s in _group(scores)]
    total, n = 0.0, 0
    for f in floats:
        s, bad = _calib.score_sum(f.kernel.reshape(-1), f.fmt, nt)
        if bad:
            if f.fmt or not np.isfinite(f.kernel).all():
                raise_nonfinite(f, label)
            raise NumericalInstabilityError(f"{label}: the sum of the scores overflows float64")
        total += s
        n += f.size
    if n == 0:
        return 0, 0
    threshold = m * (total / n)
    above = sum(_calib.count_above(f.kernel.reshape(-1), f.fmt, threshold, nt) for f in floats)
    return n, above


def owl_outlier_ratio(scores, m=5.0, *, n_threads=None):
    """OWL's layer outlier ratio: the fraction of ``scores`` strictly greater than ``m`` times
    their mean (in float64; 0.0 for no scores).

    ``scores``: one array of importance scores (numpy, ImportanceScores, aprender.Bits16 or a
    CPU tensor; Wanda scores for OWL) or a list of them, taken together as one layer (the
    paper's layer is a transformer block: all its Linear weights)."""
    m = _check_m(m)
    n, above = _outliers(scores, m, resolve_threads(n_threads), "scores")
    return above / n if n else 0.0


_SUM_BLOCK = 65536  # the fixed chunk of calib.score_sum (SUM_CHUNK): partial sums fold in order


def streamed_outlier_ratio(chunks, m=5.0, n_threads=None):
    """owl_outlier_ratio of one layer whose scores arrive in pieces, bit-identical to the
    ratio of the whole array: ``chunks()`` returns a fresh iterator over the score arrays (it
    is called twice: once for the mean, once for the count).  The float64 sum folds the same
    fixed blocks in the same order as the in-memory kernel, whatever the pieces' sizes, and
    only one piece (plus less than one block) is held at a time."""
    m = _check_m(m)
    nt = resolve_threads(n_threads)
    total, n, carry = None, 0, None
    for piece in chunks():
        f = as_floats(piece, "scores")
        x = f.kernel.reshape(-1)
        n += x.size
        if carry is not None and carry.size:
            x = np.concatenate([carry, x])
        full = (x.size // _SUM_BLOCK) * _SUM_BLOCK
        for a in range(0, full, _SUM_BLOCK):
            part, bad = _calib.score_sum(x[a:a + _SUM_BLOCK], f.fmt, nt)
            if bad:
                raise_nonfinite(f, "scores")
            total = part if total is None else total + part
        carry = x[full:].copy()
        fmt = f.fmt
    if carry is not None and carry.size:
        part, bad = _calib.score_sum(carry, fmt, nt)
        total = part if total is None else total + part
    if not n:
        return 0.0
    if not np.isfinite(total):
        raise NumericalInstabilityError("scores: the sum of the scores overflows float64")
    threshold = m * (total / n)
    above = 0
    for piece in chunks():
        f = as_floats(piece, "scores")
        above += _calib.count_above(f.kernel.reshape(-1), f.fmt, threshold, nt)
    return above / n


def _sequence(values, name):
    """A list from a sequence argument, or InvalidArgumentError naming what came instead."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise InvalidArgumentError(f"{name} must be a sequence, got {type(values).__name__} "
                                   f"{short_repr(values)}")
    return list(values)


def _check_sizes(sizes):
    arr = []
    for i, v in enumerate(_sequence(sizes, "sizes")):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v < 0:
            raise InvalidArgumentError(f"sizes[{i}] must be an integer >= 0, got {short_repr(v)}")
        arr.append(int(v))
    if sum(arr) > _INT64_MAX:  # the counts are int64, as every element count numpy holds
        raise InvalidArgumentError(f"the layer sizes add up to {size_text(sum(arr))} elements, "
                                   "more than 2**63 - 1")
    return arr


def _apportion(targets, caps, k):
    """Integers c with 0 <= c <= caps, sum(c) == k, close to the real ``targets``: floors, then
    the remainder one by one to the largest fractional parts (ties: lower index first)."""
    counts = np.clip(np.floor(targets), 0, caps).astype(np.int64)
    frac = targets - counts
    while True:
        r = k - int(counts.sum())
        if r == 0:
            return counts
        if r > 0:
            open_ = np.flatnonzero(counts < caps)
            order = open_[np.argsort(-frac[open_], kind="stable")][:r]
            counts[order] += 1
            frac[order] -= 1.0
        else:
            open_ = np.flatnonzero(counts > 0)
            order = open_[np.argsort(frac[open_], kind="stable")][:-r]
            counts[order] -= 1
            frac[order] += 1.0


def _layer_sparsities(ratios, sizes, target, lam):
    """The real-valued OWL sparsities s_l (before clamping), size-weighted mean == target."""
    d = np.asarray(ratios, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64)
    live = n > 0
    if not live.any():
        return np.full(d.shape, target)
    lo, hi = d[live].min(), d[live].max()
    norm = (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)
    mean = float(np.dot(norm[live], n[live]) / n[live].sum())
    return target - 2.0 * lam * (norm - mean)


def owl_allocation(ratios, sizes, target, lam=0.08):
    """Per-layer prune counts (int64 array) from outlier ratios: the OWL sparsities (see the
    module docstring) clamped to [0, 1] and made exact: ``counts.sum() ==
    round(target * sum(sizes))`` (halves down), ``0 <= counts <= sizes``.

    ``ratios``: outlier ratios in [0, 1] (from :func:`owl_outlier_ratio`); ``sizes``: the
    elements of each layer; ``lam``: λ in [0, 1] (the paper's 0.08 by default).  λ = 0 gives
    the uniform allocation.  Layers of size 0 get 0 and do not take part in the
    normalisation."""
    target = check_sparsity(target, "target sparsity")
    lam = _check_lam(lam)
    d = [as_real(r, f"ratios[{i}]") for i, r in enumerate(_sequence(ratios, "ratios"))]
    n = _check_sizes(sizes)
    if len(d) != len(n):
        raise InvalidShapeError(f"{len(d)} outlier ratios for {len(n)} layer sizes")
    for i, r in enumerate(d):
        if not 0.0 <= r <= 1.0:  # NaN fails too
            raise InvalidArgumentError(f"ratios[{i}] must be a fraction in [0, 1], got {r!r}")
    caps = np.asarray(n, dtype=np.int64)
    total = int(sum(n))
    k = prune_count(target, total)
    if not n:
        return np.zeros(0, dtype=np.int64)
    s = _layer_sparsities(d, n, target, lam)
    nf = caps.astype(np.float64)
    if total:
        # one shift delta with sum(clip(s + delta, 0, 1) * n) == k (bisection on a monotone,
        # piecewise linear function; exact integers come from _apportion below)
        def filled(delta):
            return float(np.dot(np.clip(s + delta, 0.0, 1.0), nf))

        lo_d, hi_d = -1.0 - float(s.max()), 1.0 - float(s.min())
        if abs(filled(0.0) - k) > 0.5:
            for _ in range(200):
                mid = 0.5 * (lo_d + hi_d)
                if filled(mid) < k:
                    lo_d = mid
                else:
                    hi_d = mid
            delta = hi_d
        else:
            delta = 0.0
        targets = np.clip(s + delta, 0.0, 1.0) * nf
    else:
        targets = np.zeros(len(n))
    return _apportion(targets, caps, k)


@dataclass(frozen=True)
class OwlAllocation:
    """What :func:`owl_sparsities` decided.  Sequences are in the layers' order.

    ``counts[i]`` elements of layer ``names[i]`` (of ``sizes[i]``) are to be pruned;
    ``sparsities[i] = counts[i] / sizes[i]`` (0 for an empty layer) is the fraction to pass to
    a layer mask function: ``generate_unstructured_mask(scores, sparsities[i])`` prunes exactly
    ``counts[i]`` elements.

    Per-row (Wanda's grouping): ``per_row_count_mask(scores, counts[i])`` prunes exactly
    ``counts[i]``, spread over the rows as evenly as integers allow (every row ``q`` and the
    first ``r`` rows one more, ``(q, r) = divmod(counts[i], rows)``); so do ``aprender prune
    --allocation owl --pattern per-row`` and ``aprender.torch.prune_`` with ``as_dict()``.
    Equal counts in every row and an exact total cannot both hold in general (a count that
    is not a multiple of the rows); the total is kept exact.  (Passing ``sparsities[i]`` to
    ``generate_unstructured_mask(..., per_row=True)`` prunes ``rows * round(counts[i] /
    rows)`` instead.)  N:M patterns fix every layer's sparsity at N/M and are refused with
    OWL."""

    names: tuple
    sizes: tuple
    outlier_ratios: tuple
    counts: tuple
    target: float
    m: float
    lam: float

    @property
    def sparsities(self):
        return tuple(c / n if n else 0.0 for c, n in zip(self.counts, self.sizes))

    @property
    def total(self):
        return sum(self.sizes)

    @property
    def pruned(self):
        """Elements pruned in all: ``round(target * total)``, halves down."""
        return sum(self.counts)

    def as_dict(self):
        """{name: sparsity fraction}."""
        return dict(zip(self.names, self.sparsities))

    def __getitem__(self, name):
        """The sparsity fraction of layer ``name``."""
        try:
            return self.sparsities[self.names.index(name)]
        except ValueError:
            raise KeyError(name) from None


def owl_sparsities(scores_or_layers, target_sparsity, *, m=5.0, lam=0.08, weights=None,
                   n_threads=None):
    """OWL layer sparsities whose element-weighted mean is ``target_sparsity`` exactly (to the
    element): returns an :class:`OwlAllocation`.

    ``scores_or_layers``: a mapping layer name -> importance scores (Wanda scores for OWL:
    ``WandaImportance(name).compute(weight, ctx)``), or a sequence of them (named by index);
    each value is one array (numpy, ImportanceScores, aprender.Bits16, CPU tensor) or a list of
    arrays taken together as one layer (a transformer block, as in the paper).  ``m``: the
    outlier threshold as a multiple of the layer's mean score (paper: 5); ``lam``: λ, the
    sparsities span 2λ around the target (paper: 0.08).  ``weights``: the elements each layer
    prunes from (a mapping or a sequence in the same order; default: the size of its scores) —
    for when the scores were computed on a sample of each layer."""
    if hasattr(scores_or_layers, "keys") and callable(scores_or_layers.keys):
        names = list(scores_or_layers.keys())
        groups = [scores_or_layers[k] for k in names]
    elif isinstance(scores_or_layers, (list, tuple)):
        names = list(range(len(scores_or_layers)))
        groups = list(scores_or_layers)
    else:
        raise InvalidArgumentError(f"owl_sparsities needs a mapping layer name -> scores or a "
                                   f"sequence of scores, got {type(scores_or_layers).__name__}")
    target = check_sparsity(target_sparsity, "target sparsity")
    m = _check_m(m)
    lam = _check_lam(lam)
    nt = resolve_threads(n_threads)
    ratios, sizes = [], []
    for name, g in zip(names, groups):
        n, above = _outliers(g, m, nt, f"scores of layer {short_repr(name)}")
        ratios.append(above / n if n else 0.0)
        sizes.append(n)
    if weights is not None:
        if hasattr(weights, "keys") and callable(weights.keys):
            missing = [k for k in names if k not in weights]
            if missing:
                raise InvalidArgumentError(f"weights has no size for layer "
                                           f"{short_repr(missing[0])}")
            sizes = [weights[k] for k in names]
        else:
            sizes = list(weights)
            if len(sizes) != len(names):
                raise InvalidShapeError(f"weights holds {len(sizes)} sizes for {len(names)} "
                                        "layers")
        sizes = _check_sizes(sizes)
    counts = owl_allocation(ratios, sizes, target, lam)
    return OwlAllocation(tuple(names), tuple(sizes), tuple(ratios),
                         tuple(int(c) for c in counts), target, m, lam)
