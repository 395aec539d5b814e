"""Selection over tensors streamed from a checkpoint: the exact global plan.

Global scope prunes one exact count over every selected tensor of a checkpoint without holding
more than one tensor in memory: the threshold is found by the streaming passes of
``aprender._kernels.select.find_threshold`` over lazily mapped tensors, then each tensor's
mask is written in order, tracking how many ties at the threshold remain to prune (the tie
rule of the in-memory selection: earlier tensor, then lower flat index, first).
"""
import math

import numpy as np

from .._kernels import select as _select
from .._validation import BF16, F16, as_floats, decode16, prune_count, raise_nonfinite
from ..errors import InvalidSparsityError, NumericalInstabilityError

__all__ = ["GlobalPlan"]


def _kernel_source(sf, t, common):
    """A zero-arg callable returning the flat kernel array of tensor t: the mapped words for
    16-bit floats, the mapped float32/float64 array, or (mixed dtypes) a float32/float64 copy."""
    def load(sequential=False):
        w = sf.words(t.name, populate=sequential)
        if common is None:
            if t.dtype in ("F16", "BF16"):
                return w
            return w.view(np.float32 if t.dtype == "F32" else np.float64)
        return _to_float(w, t.dtype, common)
    return load


def _to_float(w, code, dt):
    if code in ("BF16", "F16"):
        return decode16(w, BF16 if code == "BF16" else F16).astype(dt, copy=False)
    return w.view(np.float32 if code == "F32" else np.float64).astype(dt, copy=False)


def _inf16(codes):
    if codes == {"BF16"}:
        return 0x7F80
    if codes == {"F16"}:
        return 0x7C00
    return 0


class GlobalPlan:
    """Exact global selection: per tensor, a threshold key and how many keys equal to it to
    prune, decided before anything is written."""

    def __init__(self, tensors, sparsity, cap, nt, progress=None):
        """``tensors``: a list of (SafetensorsFile, TensorInfo, label) in write order; label
        names the tensor in errors."""
        self.select = _select
        codes = {t.dtype for _, t, _ in tensors}
        self.common = None if len(codes) == 1 else ("float64" if "F64" in codes else "float32")
        self.inf16 = _inf16(codes) if self.common is None else 0
        self.sources = [_kernel_source(sf, t, self.common) for sf, t, _ in tensors]
        self.sizes = [t.size for _, t, _ in tensors]
        self.nt = nt
        total = sum(self.sizes)
        self.k = prune_count(sparsity, total)
        self.plan = [None] * len(tensors)  # (thresh, r) or ("fill", value)
        self.tensors = tensors
        self.running = None
        self.scratch = None
        if cap is None:
            self._solve(list(range(len(tensors))), self.k, progress, count=False)
        else:
            self._capped(cap, progress)

    def _solve(self, idx, k, progress, count=True):
        """Plan tensors idx to prune exactly k in all; returns per-tensor pruned counts when
        count (a counting pass) else None."""
        total = sum(self.sizes[i] for i in idx)
        if k <= 0 or k >= total:
            for i in idx:  # nothing to select, but NaN/inf still refuse, as everywhere
                x = self.sources[i](sequential=True)
                if x.size and self.select.range_pass(x, 0, 0, 1, self.inf16, 0, self.nt)[2]:
                    self._raise_nonfinite([i])
                self.plan[i] = ("fill", 1 if k <= 0 else 0)
            return {i: (0 if k <= 0 else self.sizes[i]) for i in idx}
        srcs = [self.sources[i] for i in idx]
        if progress:
            progress(f"selecting over {len(idx)} tensors")
        thresh, below, bad, _ = self.select.find_threshold(srcs, [self.sizes[i] for i in idx], k,
                                                           1, self.inf16, self.nt)
        if bad:
            self._raise_nonfinite(idx)
        r = k - below
        if len(idx) == 1 and not count:
            self.plan[idx[0]] = (thresh, r)
            return None
        if not count:
            # tensors are written in this order: the remaining count is tracked while writing
            for i in idx:
                self.plan[i] = (thresh, None)
            self.running = r
            return None
        counts = {}
        for i in idx:
            self.plan[i] = (thresh, r)
            x = self.sources[i](sequential=True)
            out = np.empty(x.shape[0], np.uint8)
            eq = self.select.write_pass(x, thresh, r, 1, out, self.nt)
            counts[i] = x.shape[0] - int(np.count_nonzero(out))
            r -= eq
            del x, out
        return counts

    def _capped(self, cap, progress):
        caps = [int(math.floor(cap * n + 1e-9)) for n in self.sizes]
        if self.k > sum(caps):
            raise InvalidSparsityError(f"cannot prune {self.k} weights when a cap of {cap} per "
                                       f"tensor allows at most {sum(caps)}")
        fixed = {}
        while True:
            free = [i for i in range(len(self.sizes)) if i not in fixed]
            counts = self._solve(free, self.k - sum(fixed.values()), progress)
            over = [i for i in free if counts[i] > caps[i]]
            if not over:
                break
            for i in over:
                fixed[i] = caps[i]
        for i, c in fixed.items():
            self._solve([i], c, None, count=False)

    def _raise_nonfinite(self, idx):
        for i in idx:
            sf, t, label = self.tensors[i]
            f = as_floats(sf.array(t.name), t.name)
            scratch = np.empty(f.size, np.uint8)
            if f.size and self.select.fill_pass(f.kernel.reshape(-1), 1, 1, f.inf16, scratch,
                                                self.nt):
                raise_nonfinite(f, label)
        raise NumericalInstabilityError("non-finite weights among the selected tensors")

    def keep(self, i):
        """Flat uint8 keep-mask of selected tensor i (call once per tensor, in order)."""
        p = self.plan[i]
        n = self.sizes[i]
        if self.scratch is None:  # one keep buffer for every tensor (reused, never reallocated)
            self.scratch = np.empty(max(self.sizes), np.uint8)
        out = self.scratch[:n]
        if p[0] == "fill":
            out[:] = p[1]
            return out
        thresh, r = p
        x = self.sources[i](sequential=True)
        if r is None:
            self.running -= self.select.write_pass(x, thresh, self.running, 1, out, self.nt)
        else:
            self.select.write_pass(x, thresh, r, 1, out, self.nt)
        return out
