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
from .._adapters import Bits16
from .._validation import BF16, F16, as_floats, decode16, prune_count, raise_nonfinite
from ..errors import InvalidSparsityError, NumericalInstabilityError

__all__ = ["GlobalPlan", "MappedUnit", "WandaUnit", "wanda_units", "typed_rows"]


_TYPED = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


def typed_rows(sf, t, r0, r1, populate=True):
    """Rows [r0, r1) of a 2-D checkpoint tensor as a read-only mapped array in its dtype
    (Bits16 for bfloat16)."""
    cols = t.shape[-1]
    w = sf.words(t.name, populate=populate, first=r0 * cols, count=(r1 - r0) * cols)
    w = w.reshape(r1 - r0, cols)
    return Bits16(w, "bfloat16") if t.dtype == "BF16" else w.view(_TYPED[t.dtype])


class MappedUnit:
    """A whole checkpoint tensor ranked by |w| from its mapped words (16-bit floats as their
    bit patterns; with mixed dtypes, a float32/float64 copy)."""

    def __init__(self, sf, t, label, common=None):
        self.sf, self.t, self.label, self.common = sf, t, label, common
        self.size = t.size
        self.inf16 = 0 if common is not None else {"BF16": 0x7F80, "F16": 0x7C00}.get(t.dtype, 0)

    def load(self, sequential=False):
        w = self.sf.words(self.t.name, populate=sequential)
        code = self.t.dtype
        if self.common is None:
            return w if code in ("F16", "BF16") else w.view(_TYPED[code])
        if code in ("BF16", "F16"):
            return decode16(w, BF16 if code == "BF16" else F16).astype(self.common, copy=False)
        return w.view(_TYPED[code]).astype(self.common, copy=False)

    def raise_nonfinite(self, nt):
        f = as_floats(self.sf.array(self.t.name), self.t.name)
        scratch = np.empty(f.size, np.uint8)
        if f.size and _select.fill_pass(f.kernel.reshape(-1), 1, 1, f.inf16, scratch, nt):
            raise_nonfinite(f, self.label)


class WandaUnit:
    """Rows [r0, r1) of a checkpoint tensor's Wanda scores ``|w| * scale``, computed from the
    mapped weights each time they are needed (never a whole tensor's scores at once)."""

    inf16 = 0

    def __init__(self, sf, t, scale, r0, r1, label, nt, common=None):
        self.sf, self.t, self.scale, self.r0, self.r1 = sf, t, scale, r0, r1
        self.label, self.nt, self.common = label, nt, common
        self.size = (r1 - r0) * t.shape[-1]
        self.shape = (r1 - r0, t.shape[-1])
        self.dtype = np.dtype(np.float64 if t.dtype == "F64" else np.float32)

    def scores(self, sequential=True, out=None):
        """The chunk's scores, shape (rows, cols); ``out``: a buffer to write them into."""
        from .importance import wanda_scores

        w = typed_rows(self.sf, self.t, self.r0, self.r1, populate=sequential)
        try:
            s = wanda_scores(w, self.scale, n_threads=self.nt, out=out)
        except NumericalInstabilityError as exc:
            raise NumericalInstabilityError(f"{self.label}: {exc}") from None
        return s if self.common is None else s.astype(self.common)

    def load(self, sequential=False):
        return self.scores(sequential).reshape(-1)

    def raise_nonfinite(self, nt):
        self.scores()  # raises naming the element; finite scores have nothing to report


def wanda_units(sf, t, scale, label, nt, common=None, chunk=1 << 22):
    """The WandaUnits of a 2-D tensor, in row chunks of about ``chunk`` elements."""
    rows, cols = t.shape
    step = max(1, chunk // max(cols, 1))
    return [WandaUnit(sf, t, scale, r0, min(rows, r0 + step), label, nt, common)
            for r0 in range(0, rows, step)] or [WandaUnit(sf, t, scale, 0, 0, label, nt, common)]


class GlobalPlan:
    """Exact selection over units streamed in write order: per unit, a threshold key and how
    many keys equal to it to prune, decided before anything is written.

    ``units``: MappedUnit/WandaUnit objects (``size``, ``inf16``, ``load(sequential)``,
    ``raise_nonfinite(nt)``, ``label``); ``groups``: the units of each tensor (default: one
    unit per tensor), the granularity of ``cap`` (a cap on each tensor's pruned fraction; the
    total stays exact).  :meth:`keep` must then be called for every unit, in order."""

    def __init__(self, units, sparsity, cap, nt, groups=None):
        self.units = units
        self.groups = groups if groups is not None else [[i] for i in range(len(units))]
        self.usizes = [u.size for u in units]
        self.sizes = [sum(self.usizes[i] for i in g) for g in self.groups]
        inf16 = {u.inf16 for u in units}
        self.inf16 = inf16.pop() if len(inf16) == 1 else 0
        self.nt = nt
        self.k = prune_count(sparsity, sum(self.sizes))
        self.plan = [None] * len(units)  # ("fill", v) | ("fixed", thresh, r) | ("run", thresh, key)
        self.running = {}
        self.scratch = None
        if cap is None:
            self._solve(list(range(len(self.groups))), self.k, count=False)
        else:
            self._capped(cap)

    def _solve(self, gidx, k, count=True):
        """Plan groups gidx to prune exactly k in all; returns per-group pruned counts when
        count (a counting pass) else None."""
        idx = [i for g in gidx for i in self.groups[g]]
        total = sum(self.usizes[i] for i in idx)
        if k <= 0 or k >= total:
            for i in idx:  # nothing to select, but NaN/inf still refuse, as everywhere
                x = self.units[i].load(sequential=True)
                if x.size and _select.range_pass(x, 0, 0, 1, self.inf16, 0, self.nt)[2]:
                    self.units[i].raise_nonfinite(self.nt)
                self.plan[i] = ("fill", 1 if k <= 0 else 0)
            return {g: (0 if k <= 0 else self.sizes[g]) for g in gidx}
        thresh, below, bad, _ = _select.find_threshold([self.units[i].load for i in idx],
                                                       [self.usizes[i] for i in idx], k, 1,
                                                       self.inf16, self.nt)
        if bad:
            for i in idx:
                self.units[i].raise_nonfinite(self.nt)
            raise NumericalInstabilityError("non-finite values among the selected tensors")
        r = k - below
        if not count:
            # units are written in this order: the remaining ties are tracked while writing
            key = len(self.running)
            self.running[key] = r
            for i in idx:
                self.plan[i] = ("run", thresh, key)
            return None
        counts = dict.fromkeys(gidx, 0)
        owner = {i: g for g in gidx for i in self.groups[g]}
        for i in idx:
            self.plan[i] = ("fixed", thresh, r)
            x = self.units[i].load(sequential=True)
            out = np.empty(x.shape[0], np.uint8)
            r -= _select.write_pass(x, thresh, r, 1, out, self.nt)
            counts[owner[i]] += x.shape[0] - int(np.count_nonzero(out))
            del x, out
        return counts

    def _capped(self, cap):
        caps = [int(math.floor(cap * n + 1e-9)) for n in self.sizes]
        if self.k > sum(caps):
            raise InvalidSparsityError(f"cannot prune {self.k} weights when a cap of {cap} per "
                                       f"tensor allows at most {sum(caps)}")
        fixed = {}
        while True:
            free = [g for g in range(len(self.sizes)) if g not in fixed]
            counts = self._solve(free, self.k - sum(fixed.values()))
            over = [g for g in free if counts[g] > caps[g]]
            if not over:
                break
            for g in over:
                fixed[g] = caps[g]
        for g, c in fixed.items():
            self._solve([g], c, count=False)

    def keep(self, i):
        """Flat uint8 keep-mask of unit i (call once per unit, in order); a view of a buffer
        reused for the next unit."""
        p = self.plan[i]
        n = self.usizes[i]
        if self.scratch is None:  # one keep buffer for every unit (reused, never reallocated)
            self.scratch = np.empty(max(self.usizes), np.uint8)
        out = self.scratch[:n]
        if p[0] == "fill":
            out[:] = p[1]
            return out
        x = self.units[i].load(sequential=True)
        if p[0] == "run":
            self.running[p[2]] -= _select.write_pass(x, p[1], self.running[p[2]], 1, out,
                                                     self.nt)
        else:
            _select.write_pass(x, p[1], p[2], 1, out, self.nt)
        return out

    def group_keep(self, g, out=None):
        """Flat uint8 keep-mask of group g (its units' masks in order)."""
        units = self.groups[g]
        if len(units) == 1 and out is None:
            return self.keep(units[0])
        if out is None:
            out = np.empty(self.sizes[g], np.uint8)
        pos = 0
        for i in units:
            out[pos:pos + self.usizes[i]] = self.keep(i)
            pos += self.usizes[i]
        return out
