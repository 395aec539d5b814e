"""The selection engine: every exact threshold selection of the package goes through here.

Prune the k smallest order keys of one tensor or of many (global scope), ties broken by the
lowest index (earlier source, then lower flat index, pruned first), over any *source*:

- ``ArraySource``: a tensor held in memory (a validated ``Floats``);
- ``MappedUnit``: a whole checkpoint tensor, read from its memory map at each pass;
- ``WandaUnit``: rows of a checkpoint tensor's Wanda scores ``|w| * scale``, computed chunk by
  chunk each time a pass needs them (never a whole tensor's scores at once).

A source has ``size``, ``inf16`` (the 16-bit infinity pattern, 0 for float32/float64 keys),
``label`` (how errors name it), ``load(sequential)`` returning the flat kernel array (float32,
float64 or 16-bit bit patterns; ``sequential`` says whether the pass reads every element, so a
memory map can be populated up front, or samples a few) and ``raise_nonfinite(nt)``, which
raises NumericalInstabilityError naming the first non-finite element if the source holds one.
Plain 1-d numpy arrays are accepted where a source is expected (the low-level entry points).

Pipeline (the typed passes are in ``aprender._kernels.select``):

1. bracket  a stratified sample proportional to each source's size brackets the k-th key between
            two sample quantiles lo <= T <= hi (every key is taken when the total is small);
2. passes   in memory (``threshold_masks``) one mark pass per source writes the provisional mask
            and counts the candidates inside [lo, hi], whose keys and positions are gathered;
            streamed (``find_threshold``) one range pass per source copies the candidates
            (an exact second pass over a source denser than the sample said);
3. select   a histogram select among the candidates finds T exactly;
4. write    the tie rule: the first r = k - #(key < T) keys equal to T are pruned, in source
            order then flat order (rewriting the marked bytes in memory; ``write_pass`` per unit
            for streamed sources, carrying r from one unit to the next).

A bracket that misses (adversarial data) or candidates over the scratch budget fall back to radix
histograms over the keys (``_radix_threshold``); the result is the same.

Global scope with a cap per tensor (``max_tensor_sparsity``) runs ONE loop (``_capped``) for
in-memory masks (``select_global``) and for streamed checkpoints (``GlobalPlan``): tensors the
plain selection pushes over their cap are pruned at exactly the cap on their own, the rest of the
count is re-selected over the others, until no tensor exceeds its cap.  Non-finite values are
refused by ONE policy (``raise_nonfinite``): the first source holding one is named, with the index.
"""
import math

import numpy as np

from .._adapters import Bits16
from .._kernels import select as _select
from .._validation import BF16, F16, INF16, Floats, as_floats, decode16, prune_count
from .._validation import raise_nonfinite as _raise_at
from ..errors import (InvalidArgumentError, InvalidShapeError, InvalidSparsityError,
                      NumericalInstabilityError, ShapeMismatchError)

_INF16_OF_CODE = {"BF16": INF16[BF16], "F16": INF16[F16]}  # safetensors dtype code -> +inf bits

__all__ = ["ArraySource", "MappedUnit", "WandaUnit", "GlobalPlan", "MergedPlan", "PlannedKeeps",
           "wanda_units", "typed_rows", "common_dtype", "raise_nonfinite", "require_finite",
           "find_threshold", "threshold_masks", "select_mask", "select_rows", "select_global"]

SAMPLE = 262144       # largest sample for the bracket
SAMPLE_MIN = 16384    # smallest sample once the keys are not all taken
SAMPLE_DIV = 64       # at most one key in SAMPLE_DIV is sampled (1.6 % of the input's bytes)
SMALL = 131072        # at or below this many keys, take them all as the sample
_KEY_MAX = 2**64 - 1


def _key_dtype(itemsize):
    return np.uint16 if itemsize == 2 else (np.uint32 if itemsize == 4 else np.uint64)


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------

def _is_finite(flat, inf16, nt):
    """True when the flat kernel array holds no non-finite value (a counting pass, no mask)."""
    return not (flat.size and _select.range_pass(flat, 0, 0, 1, inf16, 0, nt)[2])


class ArraySource:
    """A tensor held in memory (a validated Floats) as a selection source."""

    __slots__ = ("floats", "label", "flat")

    def __init__(self, floats, label="values"):
        self.floats = floats
        self.label = label
        self.flat = floats.kernel.reshape(-1)

    @property
    def size(self):
        return self.floats.size

    @property
    def inf16(self):
        return self.floats.inf16

    def load(self, sequential=False):
        return self.flat

    def raise_nonfinite(self, nt):
        if not _is_finite(self.flat, self.inf16, nt):
            _raise_at(self.floats, str(self.label))


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
        self.inf16 = 0 if common is not None else _INF16_OF_CODE.get(t.dtype, 0)

    def load(self, sequential=False):
        w = self.sf.words(self.t.name, populate=sequential)
        code = self.t.dtype
        if self.common is None:
            return w if code in ("F16", "BF16") else w.view(_TYPED[code])
        if code in ("BF16", "F16"):
            return decode16(w, BF16 if code == "BF16" else F16).astype(self.common, copy=False)
        return w.view(_TYPED[code]).astype(self.common, copy=False)

    def raise_nonfinite(self, nt):
        ArraySource(as_floats(self.sf.array(self.t.name), self.t.name), self.label) \
            .raise_nonfinite(nt)


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
        from .importance import wanda_scores  # importance sits above the engine

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


def common_dtype(floats):
    """Floats of mixed float dtypes compared exactly in the widest (float64 if any is float64,
    else float32); a list of one dtype is returned as it is."""
    kinds = {f.dtype_name for f in floats if f.size}
    if len(kinds) <= 1:
        return floats
    wide = "float64" if "float64" in kinds else "float32"
    out = []
    for f in floats:
        if f.dtype_name == wide:
            out.append(f)
            continue
        arr = f.array if not f.fmt else decode16(f.kernel, f.fmt)
        arr = np.ascontiguousarray(arr, dtype=wide)
        out.append(Floats(arr, arr, 0, wide))
    return out


# ----------------------------------------------------------------------------------------------
# the non-finite policy
# ----------------------------------------------------------------------------------------------

def raise_nonfinite(sources, nt):
    """The one non-finite policy: NumericalInstabilityError naming the first source (in order)
    that holds a non-finite value, and its index."""
    for s in sources:
        s.raise_nonfinite(nt)
    raise NumericalInstabilityError("non-finite values among the selected tensors")


def require_finite(sources, nt):
    """Raise (the one policy) if any source holds a non-finite value."""
    for s in sources:
        if s.size and not _is_finite(s.load(True), s.inf16, nt):
            raise_nonfinite([s], nt)


# ----------------------------------------------------------------------------------------------
# threshold finding over a pool of sources
# ----------------------------------------------------------------------------------------------

class _Pool:
    """The sources of one selection, checked as they are read: 1-d, contiguous, one float dtype
    (float32, float64 or 16-bit bit patterns) and exactly the sizes announced."""

    __slots__ = ("sources", "sizes", "dtype", "total")

    def __init__(self, sources, sizes):
        self.sources = list(sources)
        self.sizes = [int(v) for v in sizes]
        if len(self.sources) != len(self.sizes):
            raise ShapeMismatchError(f"{len(self.sources)} sources but {len(self.sizes)} sizes")
        for i, v in enumerate(self.sizes):
            if v < 0:
                raise InvalidArgumentError(f"sizes[{i}] = {v} is negative")
        self.total = sum(self.sizes)
        self.dtype = None

    def get(self, i, sequential=False):
        src = self.sources[i]
        x = src.load(sequential) if hasattr(src, "load") else src
        if not isinstance(x, np.ndarray) or x.ndim != 1 or not x.flags.c_contiguous:
            raise InvalidShapeError(f"source {i} must be a 1-d C-contiguous numpy array, got "
                                    f"{type(x).__name__} {getattr(x, 'shape', '')}")
        if x.dtype not in (np.float32, np.float64, np.uint16):
            raise InvalidArgumentError(f"source {i} has dtype {x.dtype}; the kernels take "
                                       "float32, float64 or uint16 bit patterns")
        if self.dtype is None:
            self.dtype = x.dtype
        elif x.dtype != self.dtype:
            raise InvalidArgumentError(f"sources of one dtype expected, got {self.dtype} and "
                                       f"{x.dtype} (source {i})")
        if x.shape[0] != self.sizes[i]:
            raise ShapeMismatchError(f"source {i} holds {x.shape[0]} elements, sizes says "
                                     f"{self.sizes[i]}")
        return x

    def itemsize(self):
        """Bytes per element (reads the first non-empty source if none was read yet)."""
        if self.dtype is None:
            for i, v in enumerate(self.sizes):
                if v:
                    self.get(i)
                    break
        return self.dtype.itemsize if self.dtype is not None else 4


def _check_k(k, total):
    if not 1 <= k <= total:
        raise InvalidArgumentError(f"k={k} outside [1, {total}]")


def _shares(sizes):
    """Each source's share of the bracket sample (proportional to its size; every key when the
    total is small).  Source j is sampled with salt j + 1."""
    total = sum(sizes)
    sample = total if total <= SMALL else min(SAMPLE, max(SAMPLE_MIN, total // SAMPLE_DIV))
    shares = []
    for n_t in sizes:
        if n_t == 0:
            shares.append(0)
        elif total <= SMALL:
            shares.append(n_t)
        else:
            shares.append(min(max(1, (sample * n_t) // total), n_t))
    return shares


def _bracket_of(smp, k, total):
    """(lo, hi, band) from the concatenated sample ``smp`` (in source order) of a selection of
    the k-th smallest among ``total`` keys: the merge step of the bracket."""
    s = smp.shape[0]
    if total <= SMALL and s == total:
        return 0, _KEY_MAX, 1.0
    q = k / float(total)
    sig = math.sqrt(s * q * (1.0 - q))
    delta = int(math.ceil(3.5 * sig)) + 16
    lo_r = int(math.floor(q * s)) - delta
    hi_r = int(math.ceil(q * s)) + delta
    qlo, qhi, inside = _select.sample_bracket(smp, max(lo_r, 0), min(hi_r, s - 1))
    lo_key = 0 if lo_r < 0 else int(qlo)
    hi_key = _KEY_MAX if hi_r >= s else int(qhi)
    if lo_r < 0 or hi_r >= s:
        inside = _select.count_in(smp, lo_key, hi_key)
    # the sample's share inside the bracket, ties at its ends included, estimates the keys'
    return lo_key, hi_key, inside / float(s)


def _bracket(pool, k, magnitude, nt):
    """Keys lo <= hi that bracket the k-th smallest key with high probability, from a stratified
    sample proportional to each source's size (every key when the total is small).  Returns
    (lo, hi, the fraction of the sample inside [lo, hi]: what the passes should expect)."""
    shares = _shares(pool.sizes)
    # every source's sample goes straight into one buffer of the keys' own width
    buf = np.empty(sum(shares) + _select.RUN_KEYS, dtype=_key_dtype(pool.itemsize()))
    s = 0
    for j, share in enumerate(shares):
        if share:
            s += _select.sample_into(pool.get(j), share, j + 1, magnitude, nt, buf[s:])
    return _bracket_of(buf[:s], k, pool.total)


def _collect_cap(n, frac, cand_budget, nt):
    """Candidate slots for mark_collect over n elements (0: mark only, then gather): each task's
    expected share of the bracket with room for its spread and for uneven shares (a quarter
    more: when a task overflows, gather_marked reads the candidates from the marks), within the
    candidates' budget; only where 32-bit positions index the source."""
    if n > 0xFFFFFFFF or n < (1 << 16) or frac >= 1.0:
        return 0
    tasks = max(1, min(nt, n))
    share = frac * n / tasks
    cap = int(share * 1.25 + 8 * math.sqrt(share + 1) + 256) * tasks
    return cap if cap <= cand_budget else 0


def _default_budget(total, itemsize, extra=0):
    """Candidates a selection may hold: the scratch budget in keys of the input's width (plus
    `extra` bytes each: their positions)."""
    return max(1, _select.scratch_budget(total * itemsize) // (itemsize + extra))


def _radix_walk(itemsize, k, hist_round):
    """(k-th smallest key, keys strictly below it, non-finite count) by 16-bit radix histograms,
    top digit first (1, 2 or 4 rounds); ``hist_round(shift, prefix, pmask)`` returns the
    histogram of one round over every key, and the non-finite count."""
    nbins = _select.HIST_BINS
    shift = 8 * itemsize - 16
    rank, below, prefix, pmask = k - 1, 0, 0, 0
    while True:
        hist, bad = hist_round(shift, prefix, pmask)
        if bad:
            return 0, 0, bad
        # the first bin whose running count passes rank (the last bin at most)
        cum = np.cumsum(hist)
        b = min(int(np.searchsorted(cum, rank, side="right")), nbins - 1)
        acc = int(cum[b - 1]) if b else 0
        rank -= acc
        below += acc
        prefix |= b << shift
        pmask |= 0xFFFF << shift
        if shift == 0:
            return prefix, below, 0
        shift -= 16


def _radix_threshold(pool, k, magnitude, inf16, nt):
    """(k-th smallest key, keys strictly below it, non-finite count) by 16-bit radix histograms
    over every key, top digit first (1, 2 or 4 linear passes)."""
    hist = np.zeros(_select.HIST_BINS, dtype=np.int64)

    def hist_round(shift, prefix, pmask):
        hist[:] = 0
        bad = 0
        for i, n in enumerate(pool.sizes):
            if n:
                bad += _select.hist_pass(pool.get(i, True), shift, prefix, pmask, magnitude,
                                         inf16, hist, nt)
        return hist, bad
    return _radix_walk(pool.itemsize(), k, hist_round)


def find_threshold(sources, sizes, k, magnitude, inf16, n_threads, cand_budget=-1):
    """Exact k-th smallest key over the concatenation of the sources (k >= 1, k <= total), read
    by streaming passes (nothing written).

    Returns (thresh, n_below, n_nonfinite, method): n_below keys are strictly smaller than thresh,
    so the first k - n_below keys equal to thresh (in source order, then flat order) are pruned.
    cand_budget bounds the candidate keys held at once (default: the scratch budget)."""
    pool = _Pool(sources, sizes)
    _check_k(k, pool.total)
    if cand_budget < 0:
        cand_budget = _default_budget(pool.total, pool.itemsize())
    lo_key, hi_key, band = _bracket(pool, k, magnitude, n_threads)
    below = inside = bad = 0
    cands = []
    ok = True
    for i, n in enumerate(pool.sizes):
        if n == 0:
            continue
        b_t, i_t, bad_t, c_t = _select.range_pass(pool.get(i, True), lo_key, hi_key, magnitude,
                                                  inf16, cand_budget - inside, n_threads, band)
        below += b_t
        inside += i_t
        bad += bad_t
        if c_t is None:
            ok = False
            break
        cands.append(c_t)
    if bad:
        return 0, 0, bad, "nonfinite"
    if ok and below < k <= below + inside:
        thresh, cbelow = _select.select_hist(cands, k - below - 1, lo_key, hi_key)
        return int(thresh), below + cbelow, 0, "sample"
    del cands
    return _radix_threshold(pool, k, magnitude, inf16, n_threads) + ("radix",)


def threshold_masks(sources, outs, sizes, k, magnitude, inf16, n_threads, cand_budget=-1):
    """Write keep-masks (uint8, 1 = keep) pruning exactly the k smallest keys over the sources
    (ties: earlier source, then lower index, pruned first).  One pass marks the mask (kept,
    pruned, or a candidate inside the sample's bracket); the candidates' keys are gathered into
    one buffer of exactly their number, the threshold is selected among them, and only the
    marked bytes are rewritten.  cand_budget bounds the candidate keys (default: the scratch
    budget).  Returns the number of non-finite values (then the masks are not meaningful)."""
    pool = _Pool(sources, sizes)
    outs = list(outs)
    if len(outs) != len(pool.sizes):
        raise ShapeMismatchError(f"{len(pool.sizes)} sources but {len(outs)} outputs")
    total = pool.total
    _check_k(k, total)
    for i, o in enumerate(outs):
        if not isinstance(o, np.ndarray) or o.dtype != np.uint8 or o.ndim != 1 \
                or o.shape[0] != pool.sizes[i]:
            raise ShapeMismatchError(f"outs[{i}] must be a 1-d uint8 array of {pool.sizes[i]} "
                                     "elements")
    if cand_budget < 0:
        cand_budget = _default_budget(total, pool.itemsize(), 4)
    lo_key, hi_key, frac = _bracket(pool, k, magnitude, n_threads)
    below = inside = bad = 0
    counts = []
    collected = []  # per source: (keys, pos, got) when the mark pass collected its candidates
    kdt = _key_dtype(pool.itemsize())
    for i, o in enumerate(outs):
        if pool.sizes[i] == 0:
            counts.append(None)
            collected.append(None)
            continue
        x = pool.get(i, True)
        cap = _collect_cap(x.shape[0], frac, cand_budget, n_threads)
        if cap:
            # mark and collect in one pass: no second scan of the mask to gather candidates
            ck, cp = np.empty(cap, kdt), np.empty(cap, np.uint32)
            b_t, i_t, bad_t, c_t, got = _select.mark_collect(x, lo_key, hi_key, magnitude,
                                                             inf16, o, ck, cp, n_threads)
            collected.append((ck, cp, got) if got is not None else None)
        else:
            b_t, i_t, bad_t, c_t = _select.mark_pass(x, lo_key, hi_key, magnitude, inf16, o,
                                                     n_threads)
            collected.append(None)
        below += b_t
        inside += i_t
        bad += bad_t
        counts.append(c_t)
    if bad:
        return bad
    if below < k <= below + inside and inside <= cand_budget \
            and all(c is not None for c, n in zip(collected, pool.sizes) if n):
        # every candidate was collected by its task: select among the segments in flat order
        segs = []
        for i, c in enumerate(collected):
            if c is not None:
                ck, cp, got = c
                per = ck.shape[0] // len(got)
                segs += [(i, ck[t * per:t * per + int(g)], cp[t * per:t * per + int(g)])
                         for t, g in enumerate(got)]
        thresh, cbelow = _select.select_hist([sk for _, sk, _ in segs], k - below - 1, lo_key,
                                             hi_key)
        r = k - below - cbelow
        for i, sk, sp in segs:  # the tie rule: the first r equal keys, in source order
            if sk.shape[0]:
                r -= _select.fix_positions(outs[i], sp, sk, thresh, r, n_threads)
        return 0
    del collected
    if below < k <= below + inside and inside <= cand_budget:
        keys = np.empty(inside, dtype=_key_dtype(pool.itemsize()))
        # positions (tensors under 2**32 elements) spare the rewrite a second scan of the mask
        pos = np.empty(inside, dtype=np.uint32) if max(pool.sizes) <= 0xFFFFFFFF else None
        spans = []
        off = 0
        for i, o in enumerate(outs):
            if counts[i] is not None:
                c = int(counts[i].sum())
                _select.gather_marked(pool.get(i), o, counts[i], magnitude, keys[off:off + c],
                                      n_threads, pos[off:off + c] if pos is not None else None)
                spans.append((i, off, c))
                off += c
        thresh, cbelow = _select.select_hist([keys], k - below - 1, lo_key, hi_key)
        r = k - below - cbelow
        for i, off, c in spans:  # the tie rule: the first r equal keys, in source order
            if pos is not None:
                r -= _select.fix_positions(outs[i], pos[off:off + c], keys[off:off + c], thresh,
                                           r, n_threads)
            else:
                r -= _select.fix_marked(outs[i], counts[i], keys[off:off + c], thresh, r,
                                        n_threads)
        return 0
    del counts
    thresh, below, bad = _radix_threshold(pool, k, magnitude, inf16, n_threads)
    if bad:
        return bad
    r = k - below
    for i, o in enumerate(outs):
        if pool.sizes[i]:
            r -= _select.write_pass(pool.get(i, True), thresh, r, magnitude, o, n_threads)
    return 0


# ----------------------------------------------------------------------------------------------
# the write step and the front-end entry points
# ----------------------------------------------------------------------------------------------

def _first_inf16(sources):
    return next((s.inf16 for s in sources if s.size), 0)


def _write_masks(sources, outs, k, magnitude, nt):
    """Fused in-memory write: keep-masks (flat uint8) pruning exactly k over the sources;
    returns the non-finite count (every source is still read when k is 0 or the total)."""
    sizes = [s.size for s in sources]
    inf16 = _first_inf16(sources)
    if k <= 0 or k >= sum(sizes):
        bad = 0
        for s, o in zip(sources, outs):
            bad += _select.fill_pass(s.load(True), 1 if k <= 0 else 0, magnitude, inf16, o, nt)
        return bad
    return threshold_masks(sources, outs, sizes, k, magnitude, inf16, nt)


def select_mask(source, out, k, magnitude, nt):
    """One tensor's keep-mask (flat uint8 ``out``) pruning exactly its k smallest keys."""
    if _write_masks([source], [out], k, magnitude, nt):
        raise_nonfinite([source], nt)


def select_rows(source, out, rows, cols, k, magnitude, nt):
    """Per-row keep-mask (flat uint8 ``out``) pruning the k smallest keys of every row of the
    (rows, cols) view; rows whose keys alone exceed the scratch budget are selected one after
    the other like tensors."""
    x = source.load(True).reshape(rows, cols)
    o = out.reshape(rows, cols)
    rowbytes = cols * x.itemsize
    if 0 < k < cols and rows and _select.scratch_budget(rows * rowbytes) // rowbytes == 0:
        bad = 0
        for i in range(rows):
            bad += threshold_masks([x[i]], [o[i]], [cols], k, magnitude, source.inf16, nt) != 0
    else:
        bad = _select.rows_mask(x, k, magnitude, source.inf16, o, nt)
    if bad:
        raise_nonfinite([source], nt)


def _capped(sizes, k, cap, solve, refusal):
    """The one capped global loop: ``solve(groups, k, count)`` prunes exactly k over the groups
    (returning each group's pruned count when ``count``); ``refusal`` words the error when the
    caps cannot hold k.  Groups the plain selection pushes
    over their cap are pruned at exactly the cap on their own and the rest of the count is
    re-selected over the others, until no group exceeds its cap."""
    caps = [int(math.floor(cap * n + 1e-9)) for n in sizes]
    if k > sum(caps):
        raise InvalidSparsityError(refusal.format(k=k, cap=cap, most=sum(caps)))
    fixed = {}
    while True:
        free = [g for g in range(len(sizes)) if g not in fixed]
        counts = solve(free, k - sum(fixed.values()), True)
        over = [g for g in free if counts[g] > caps[g]]
        if not over:
            break
        for g in over:
            fixed[g] = caps[g]
    for g, c in fixed.items():
        solve([g], c, False)


class _Plan:
    """Exact selection over groups of sources (a group: the sources of one tensor, the
    granularity of a cap), the same for masks in memory and for streamed checkpoints."""

    def __init__(self, sources, nt, magnitude, groups=None):
        self.units = list(sources)
        self.groups = groups if groups is not None else [[i] for i in range(len(self.units))]
        self.usizes = [u.size for u in self.units]
        self.sizes = [sum(self.usizes[i] for i in g) for g in self.groups]
        self.inf16 = _first_inf16(self.units)
        self.nt, self.magnitude = nt, magnitude

    def _select(self, k, cap):
        if cap is None:
            self._solve(list(range(len(self.groups))), k, False)
        else:
            _capped(self.sizes, k, cap, self._solve, self.REFUSAL)

    def _members(self, gidx):
        return [i for g in gidx for i in self.groups[g]]


class _MaskPlan(_Plan):
    """Masks held in memory, written at once by the fused passes."""

    REFUSAL = ("cannot prune {k} elements when max_tensor_sparsity={cap} allows at most {most} "
               "in all")

    def __init__(self, sources, outs, nt, magnitude, groups=None):
        super().__init__(sources, nt, magnitude, groups)
        self.outs = list(outs)

    def _solve(self, gidx, k, count):
        idx = self._members(gidx)
        srcs = [self.units[i] for i in idx]
        if _write_masks(srcs, [self.outs[i] for i in idx], k, self.magnitude, self.nt):
            raise_nonfinite(srcs, self.nt)
        if not count:
            return None
        return {g: sum(self.usizes[i] - int(np.count_nonzero(self.outs[i].view(np.bool_)))
                       for i in self.groups[g]) for g in gidx}


def select_global(sources, outs, sparsity, nt, *, magnitude, cap=None, groups=None):
    """Keep-masks (flat uint8 ``outs``) pruning exactly ``round(sparsity * total)`` keys over
    every source (ties: earlier source, then lower flat index); ``cap``: the largest fraction
    of any one group (default: one group per source) that may be pruned."""
    plan = _MaskPlan(sources, outs, nt, magnitude, groups)
    plan._select(prune_count(sparsity, sum(plan.sizes)), cap)
    return outs


class GlobalPlan(_Plan):
    """Exact selection over units streamed in write order: per unit, a threshold key and how
    many keys equal to it to prune, decided before anything is written.

    ``units``: sources (MappedUnit/WandaUnit); ``groups``: the units of each tensor (default:
    one unit per tensor), the granularity of ``cap`` (a cap on each tensor's pruned fraction;
    the total stays exact).  :meth:`keep` must then be called for every unit, in order."""

    REFUSAL = "cannot prune {k} weights when a cap of {cap} per tensor allows at most {most}"

    def __init__(self, units, sparsity, cap, nt, groups=None, magnitude=1):
        super().__init__(units, nt, magnitude, groups)
        self.k = prune_count(sparsity, sum(self.sizes))
        self.plan = [None] * len(self.units)  # ("fill", v) | ("fixed", t, r) | ("run", t, key)
        self.running = {}
        self.scratch = None
        self._select(self.k, cap)

    def _solve(self, gidx, k, count):
        """Plan groups gidx to prune exactly k in all; returns per-group pruned counts when
        count (a counting pass) else None."""
        idx = self._members(gidx)
        total = sum(self.usizes[i] for i in idx)
        if k <= 0 or k >= total:
            for i in idx:  # nothing to select, but NaN/inf still refuse, as everywhere
                u = self.units[i]
                if u.size and not _is_finite(u.load(sequential=True), self.inf16,
                                                   self.nt):
                    raise_nonfinite([u], self.nt)
                self.plan[i] = ("fill", 1 if k <= 0 else 0)
            return {g: (0 if k <= 0 else self.sizes[g]) for g in gidx}
        thresh, below, bad, _ = find_threshold([self.units[i] for i in idx],
                                               [self.usizes[i] for i in idx], k,
                                               self.magnitude, self.inf16, self.nt)
        if bad:
            raise_nonfinite([self.units[i] for i in idx], self.nt)
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
            r -= _select.write_pass(x, thresh, r, self.magnitude, out, self.nt)
            counts[owner[i]] += x.shape[0] - int(np.count_nonzero(out))
            del x, out
        return counts

    def keep(self, i):
        """Flat uint8 keep-mask of unit i (call once per unit, in order); a view of a buffer
        reused for the next unit."""
        p = self.plan[i]
        n = self.usizes[i]
        if self.scratch is None:  # one keep buffer for every unit (reused, never reallocated)
            self.scratch = np.empty(max(self.usizes), np.uint8)
        out = self.scratch[:n]
        if p[0] != "run":
            return _planned_keep(self.units[i], p, out, self.magnitude, self.nt)
        x = self.units[i].load(sequential=True)
        self.running[p[2]] -= _select.write_pass(x, p[1], self.running[p[2]], self.magnitude,
                                                 out, self.nt)
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


def _planned_keep(unit, p, out, magnitude, nt):
    """A unit's keep-mask from a plan entry that needs nothing from other units:
    ("fill", value) or ("fixed", thresh, r) (prune keys below thresh and the unit's first r keys
    equal to it)."""
    if p[0] == "fill":
        out[:] = p[1]
        return out
    _select.write_pass(unit.load(sequential=True), p[1], p[2], magnitude, out, nt)
    return out


# ----------------------------------------------------------------------------------------------
# mergeable summaries: the global selection split into per-unit passes and a reduction
# ----------------------------------------------------------------------------------------------
# A distributed run computes the per-unit functions below where the units' bytes are (one task
# per tensor) and reduces their small results on the client with the same steps as
# find_threshold: the samples concatenated in unit order give the same bracket; the candidates
# of every unit give the same threshold (select_hist over the same keys); the per-unit counts
# below and equal to it give each unit its share of the ties, in unit order (the tie rule).

def unit_sample(unit, share, salt, magnitude, nt):
    """The bracket sample of one unit (``share`` keys, salt = its position in the pool + 1)."""
    x = unit.load(False)
    buf = np.empty(share + _select.RUN_KEYS, dtype=_key_dtype(x.dtype.itemsize))
    return buf[:_select.sample_into(x, share, salt, magnitude, nt, buf)].copy()


def unit_range(unit, lo, hi, magnitude, inf16, cap, band, nt):
    """(keys below lo, keys in [lo, hi], non-finite count, the keys in [lo, hi] or None when
    more than ``cap``) of one unit."""
    return _select.range_pass(unit.load(True), lo, hi, magnitude, inf16, cap, nt, band)


def unit_range_summary(unit, lo, hi, magnitude, inf16, cap, band, nt):
    """:func:`unit_range` with the candidates as they travel best: the keys themselves, or
    (distinct keys, their counts) when that is smaller (16-bit keys: a bracket holds few
    distinct values, each many times)."""
    b, i, bad, c = unit_range(unit, lo, hi, magnitude, inf16, cap, band, nt)
    if c is not None and c.size:
        vals, counts = np.unique(c, return_counts=True)
        if vals.nbytes + 4 * counts.size < c.nbytes and counts.max() <= 0xFFFFFFFF:
            return b, i, bad, (vals, counts.astype(np.uint32))
    return b, i, bad, c


def _expand(c):
    """Candidates from :func:`unit_range_summary` as one key array (any order: only their
    ranks and counts matter)."""
    return np.repeat(c[0], c[1]) if isinstance(c, tuple) else c


def unit_hist(unit, shift, prefix, pmask, magnitude, inf16, nt):
    """One radix round's histogram over one unit's keys, and its non-finite count."""
    hist = np.zeros(_select.HIST_BINS, dtype=np.int64)
    bad = _select.hist_pass(unit.load(True), shift, prefix, pmask, magnitude, inf16, hist, nt)
    return hist, bad


def unit_check_finite(unit, inf16, nt):
    """Raise (the one non-finite policy) when the unit holds a non-finite value."""
    if unit.size and not _is_finite(unit.load(True), inf16, nt):
        raise_nonfinite([unit], nt)


def local_map(fn, batches, *args):
    """Run ``fn(unit, extra, *args)`` for every (unit, extra) of every batch, here: the
    in-process map of :class:`MergedPlan` (a distributed run passes one that runs each batch as
    a task)."""
    return [[fn(u, extra, *args) for u, extra in batch] for batch in batches]


def _one(fn):
    """fn(unit, *args) as fn(unit, extra, *args) for maps without a per-unit argument."""
    def call(unit, _extra, *args):
        return fn(unit, *args)
    call.__name__ = fn.__name__
    return call


class MergedPlan(_Plan):
    """GlobalPlan's selection (same k, threshold, tie rule and caps) from mergeable per-unit
    summaries, so that the per-unit passes can run anywhere: ``pmap(fn, batches, *args)`` runs
    ``fn(unit, extra, *args)`` over batches of (unit, extra) pairs (one batch per tensor) and
    returns the results batch by batch (default :func:`local_map`).

    Every unit ends with a plan entry that needs no other unit: ("fill", value) or
    ("fixed", thresh, r), where r is that unit's share of the ties (see :meth:`entries`), so the
    masks can be written in any order, in parallel.  ``received``: bytes of the summaries the
    reduction read (samples, candidates, counts, histograms)."""

    REFUSAL = GlobalPlan.REFUSAL

    def __init__(self, units, sparsity, cap, nt, groups=None, magnitude=1, pmap=None):
        super().__init__(units, nt, magnitude, groups)
        self.pmap = pmap or local_map
        self.k = prune_count(sparsity, sum(self.sizes))
        self.plan = [None] * len(self.units)
        self.received = 0
        self._select(self.k, cap)

    def _map(self, fn, gidx, extras, *args):
        """fn over the units of groups gidx (one batch per group); a flat list in unit order.
        ``extras``: one per-unit argument per member, in order (or None)."""
        batches, j = [], 0
        for g in gidx:
            n = len(self.groups[g])
            ex = extras[j:j + n] if extras is not None else [None] * n
            batches.append([(self.units[i], e) for i, e in zip(self.groups[g], ex)])
            j += n
        out = [r for batch in self.pmap(fn, batches, *args) for r in batch]
        for r in out:
            self.received += _nbytes(r)
        return out

    def _refuse_nonfinite(self, gidx):
        self._map(_one(unit_check_finite), gidx, None, self.inf16, self.nt)
        raise NumericalInstabilityError("non-finite values among the selected tensors")

    def _solve(self, gidx, k, count):
        idx = self._members(gidx)
        sizes = [self.usizes[i] for i in idx]
        total = sum(sizes)
        if k <= 0 or k >= total:
            self._map(_one(unit_check_finite), gidx, None, self.inf16, self.nt)
            for i in idx:
                self.plan[i] = ("fill", 1 if k <= 0 else 0)
            return {g: (0 if k <= 0 else self.sizes[g]) for g in gidx}
        nt, mag, inf16 = self.nt, self.magnitude, self.inf16
        shares = _shares(sizes)
        samples = self._map(_sample_at, gidx, [(sh, j + 1) for j, sh in enumerate(shares)],
                            mag, nt)
        smp = np.concatenate([x for x in samples if x is not None])  # in unit order
        lo, hi, band = _bracket_of(smp, k, total)
        itemsize = smp.dtype.itemsize
        budget = _default_budget(total, itemsize)
        # each unit may return about twice its share of the candidate budget (the local run
        # bounds the running total instead): what the client gathers stays near the budget
        # however hostile the values; a unit over its share falls back to the exact radix path
        caps = [min(budget, 2 * (budget * n // total) + 65536) for n in sizes]
        res = self._map(_range_at, gidx, caps, lo, hi, mag, inf16, band, nt)
        if any(r[2] for r in res):
            self._refuse_nonfinite(gidx)
        below = sum(r[0] for r in res)
        inside = sum(r[1] for r in res)
        if all(r[3] is not None for r in res) and below < k <= below + inside \
                and inside <= budget:
            cands = [_expand(r[3]) for r in res]
            thresh, _ = _select.select_hist([c for c in cands if c.size], k - below - 1, lo, hi)
            lt = [int(r[0]) + int(np.count_nonzero(c < thresh)) for r, c in zip(res, cands)]
            eq = [int(np.count_nonzero(c == thresh)) for c in cands]
            below = sum(lt)
        else:
            del res
            def hist_round(shift, prefix, pmask):
                parts = self._map(_one(unit_hist), gidx, None, shift, prefix, pmask, mag, inf16,
                                  nt)
                return sum(h for h, _ in parts), sum(b for _, b in parts)
            thresh, below, bad = _radix_walk(itemsize, k, hist_round)
            if bad:
                self._refuse_nonfinite(gidx)
            res = self._map(_one(unit_range), gidx, None, thresh, thresh, mag, inf16, 0, 0.0,
                            nt)
            lt = [int(r[0]) for r in res]
            eq = [int(r[1]) for r in res]
        # the tie rule: the first r keys equal to the threshold, in unit order, are pruned
        r = k - below
        counts = dict.fromkeys(gidx, 0)
        owner = {i: g for g in gidx for i in self.groups[g]}
        for j, i in enumerate(idx):
            take = min(max(r, 0), eq[j])
            self.plan[i] = ("fixed", int(thresh), take)
            r -= take
            counts[owner[i]] += lt[j] + take
        return counts if count else None

    def entries(self, g):
        """The plan entries of group g's units, in order."""
        return [self.plan[i] for i in self.groups[g]]


def _sample_at(unit, extra, magnitude, nt):
    share, salt = extra
    return unit_sample(unit, share, salt, magnitude, nt) if share else None


def _range_at(unit, cap, lo, hi, magnitude, inf16, band, nt):
    return unit_range_summary(unit, lo, hi, magnitude, inf16, cap, band, nt)


def _nbytes(r):
    """Bytes of a summary (arrays by their size; counts as 8 bytes each)."""
    if isinstance(r, np.ndarray):
        return r.nbytes
    if isinstance(r, (tuple, list)):
        return sum(_nbytes(v) for v in r)
    return 0 if r is None else 8


class PlannedKeeps:
    """The keep-masks of some groups from plan entries that need no other unit (a
    :class:`MergedPlan`'s): ``keeps[g] = [(unit, entry), ...]``; same interface as
    :meth:`GlobalPlan.group_keep`, in any order."""

    def __init__(self, keeps, nt, magnitude=1):
        self.keeps, self.nt, self.magnitude = keeps, nt, magnitude

    def group_keep(self, g, out=None):
        pairs = self.keeps[g]
        n = sum(u.size for u, _ in pairs)
        if out is None:
            out = np.empty(n, np.uint8)
        pos = 0
        for u, p in pairs:
            _planned_keep(u, p, out[pos:pos + u.size], self.magnitude, self.nt)
            pos += u.size
        return out
