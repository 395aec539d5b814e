"""Time aprender against its NumPy and PyTorch peers and the memory-bandwidth floor, in one process.

    python benchmarks/compare.py                # full run
    python benchmarks/compare.py --quick        # < 1 minute: fewer repeats, no 11008x4096,
                                                # no 16-bit peers, no PyTorch global peer
    python benchmarks/compare.py --threads 2 --json results.json --cases unstructured

Timing: every implementation runs once as a warm-up, then ``repeats`` times; the table shows the
median (and the minimum) of ``time.perf_counter`` deltas in milliseconds.  Work that
is not part of the operation (building inputs, undoing PyTorch's module re-parametrisation between
repeats) runs untimed before each repeat.

Floors: the cheapest pass over the same bytes that NumPy can do — for mask generation
``np.greater(w, t, out=mask)`` (read the weights once, write a 1-byte mask; 16-bit weights are
compared as their uint16 bit patterns, which reads the same bytes without NumPy's slow float16
loops), for apply ``np.copyto(dst, w)``.  Each floor is timed single-threaded and split over
``--threads`` Python threads (NumPy releases the GIL), and the faster of the two is the floor.

Peak memory: measured in a separate, fresh Python process (one per case in the full run; with
``--quick`` one process for all cases, and for aprender only).  That process fixes glibc's mmap
threshold (``mallopt``) so that large buffers are returned to the OS when freed and calls
``malloc_trim(0)`` before each measurement; it then resets the kernel's RSS high-water mark
(``/proc/self/clear_refs`` = 5), runs the operation once (libraries already initialised on a tiny
input), and reports ``VmHWM - VmRSS(before)``: every byte the operation touched, C mallocs and
the returned mask included.  "scratch" subtracts the bytes of the returned mask(s) and is what
the memory target refers to.  Where ``/proc/self/clear_refs`` is missing (not Linux) memory
shows as n/a.

Machine noise: two-thread OpenMP regions suffer badly when another process holds a core (a
thread waits for its time slice); compare the "min ms" column, and rerun on a quiet machine.
"""
import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

import aprender  # noqa: E402
from aprender.pruning import (MagnitudeImportance, generate_global_mask,  # noqa: E402,F401
                              magnitude_mask, magnitude_nm_mask)

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - bfloat16 cases are skipped
    ml_dtypes = None

_TORCH = None


def _torch():
    """PyTorch, imported on first use; None when it is not installed."""
    global _TORCH
    if _TORCH is None:
        try:
            import torch
            import torch.nn.utils.prune  # noqa: F401
            _TORCH = torch
        except ImportError:
            _TORCH = False
    return _TORCH or None


MB = 1024.0 * 1024.0
SPARSITY = 0.5

# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


def _dtype(name):
    if name == "bfloat16":
        if ml_dtypes is None:
            raise ImportError("ml_dtypes is needed for bfloat16 cases")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def make_weights(shape, dtype_name, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape, dtype=np.float32)
    if dtype_name != "float32":
        w = w.astype(_dtype(dtype_name))
    return w


def prune_count(n, sparsity=SPARSITY):
    p = sparsity * n
    lo = math.floor(p)
    return int(lo if p - lo <= 0.5 else lo + 1)


def _bits(w):
    """The array NumPy compares fastest over the same bytes: uint16 bits for 16-bit floats."""
    return w.view(np.uint16) if w.dtype.itemsize == 2 else w


def _to_torch(a):
    torch = _torch()
    if a.dtype.itemsize == 2 and a.dtype != np.float16:  # bfloat16: share the bits
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _split_rows(a, parts):
    a2 = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)
    bounds = np.linspace(0, a2.shape[0], parts + 1).astype(int)
    return [a2[bounds[i]:bounds[i + 1]] for i in range(parts)]


# ------------------------------------------------------------------------------------------------
# cases: each returns {impl name: (fn, setup or None)}; "aprender" first, floors named "floor ..."
# ------------------------------------------------------------------------------------------------


class Case:
    def __init__(self, cid, kind, title, shape, dtype, build, count=1):
        self.id, self.kind, self.title = cid, kind, title
        self.shape, self.dtype, self.build, self.count = shape, dtype, build, count

    @property
    def weight_bytes(self):
        return self.count * int(np.prod(self.shape)) * _dtype(self.dtype).itemsize

    @property
    def label(self):
        shape = "x".join(map(str, self.shape))
        extra = f"{self.count} x " if self.count > 1 else ""
        return f"{self.title} | {self.dtype} {extra}{shape}"


_POOLS = {}


def _pool(threads):
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads)
    return _POOLS[threads]


def _floors(name, src_of, dst_of, op, threads):
    """Single-threaded and row-split threaded variants of one floor operation."""
    out = {}
    src, dst = src_of(), dst_of()
    out[f"floor {name} (1 thread)"] = (lambda: op(src, dst), None)
    if threads > 1:
        pairs = list(zip(_split_rows(src, threads), _split_rows(dst, threads)))
        pool = _pool(threads)

        def split():
            list(pool.map(lambda p: op(*p), pairs))
        out[f"floor {name} ({threads} threads)"] = (split, None)
    return out


def _mask_floor(w, threads):
    src = _bits(w)
    t = src.reshape(-1)[0]
    return _floors("np.greater", lambda: src, lambda: np.empty(w.shape, np.bool_),
                   lambda s, d: np.greater(s, t, out=d), threads)


def build_unstructured(w, threads):
    n = w.size
    k = prune_count(n)
    impls = {"aprender": (lambda: magnitude_mask(w, SPARSITY, n_threads=threads), None)}
    out = np.empty(w.shape, np.bool_)  # a caller that prunes many tensors reuses its pages
    impls["aprender out="] = (lambda: magnitude_mask(w, SPARSITY, n_threads=threads, out=out),
                              None)

    def np_argpartition():
        a = np.abs(w).reshape(-1)
        idx = np.argpartition(a, k - 1)[:k]
        keep = np.ones(n, np.bool_)
        keep[idx] = False
        return keep.reshape(w.shape)

    def np_partition():
        a = np.abs(w).reshape(-1)
        t = np.partition(a, k - 1)[k - 1]
        return (a > t).reshape(w.shape)

    impls["numpy argpartition (exact)"] = (np_argpartition, None)
    impls["numpy partition threshold"] = (np_partition, None)
    torch = _torch()
    if torch is not None:
        t = _to_torch(w)
        ones = torch.ones_like(t)
        method = torch.nn.utils.prune.L1Unstructured(SPARSITY)
        impls["torch L1Unstructured.compute_mask"] = (lambda: method.compute_mask(t, ones), None)
    impls.update(_mask_floor(w, threads))
    return impls


def build_per_row(w, threads):
    rows, cols = w.shape
    k = prune_count(cols)
    impls = {"aprender": (lambda: magnitude_mask(w, SPARSITY, per_row=True, n_threads=threads),
                          None)}

    def np_rows():
        idx = np.argpartition(np.abs(w), k - 1, axis=1)[:, :k]
        keep = np.ones(w.shape, np.bool_)
        np.put_along_axis(keep, idx, False, axis=1)
        return keep

    impls["numpy argpartition(axis=1)"] = (np_rows, None)
    torch = _torch()
    if torch is not None:
        t = _to_torch(w)

        def torch_rows():
            idx = torch.sort(t.abs(), dim=1, stable=True).indices[:, :k]
            return torch.ones(t.shape, dtype=torch.bool).scatter_(1, idx, False)

        impls["torch sort per row + scatter_"] = (torch_rows, None)
    impls.update(_mask_floor(w, threads))
    return impls


def build_nm(w, threads):
    impls = {"aprender": (lambda: magnitude_nm_mask(w, 2, 4, n_threads=threads), None)}

    def np_nm():
        g = np.abs(w).reshape(-1, 4)
        order = np.argsort(g, axis=1, kind="stable")
        keep = np.zeros(g.shape, np.bool_)
        np.put_along_axis(keep, order[:, 2:], True, axis=1)
        return keep.reshape(w.shape)

    impls["numpy argsort on (-1, 4) groups"] = (np_nm, None)
    torch = _torch()
    if torch is not None:
        t = _to_torch(w)

        def torch_nm():
            g = t.abs().view(-1, 4)
            idx = g.topk(2, dim=1).indices
            return torch.zeros(g.shape, dtype=torch.bool).scatter_(1, idx, True).view(t.shape)

        impls["torch topk + scatter_"] = (torch_nm, None)
    impls.update(_mask_floor(w, threads))
    return impls


def build_apply(w, threads):
    mask = magnitude_mask(w, SPARSITY, n_threads=threads)
    keep = mask.keep
    wa, wn = w.copy(), w.copy()  # in place: each implementation zeroes its own copy
    impls = {"aprender": (lambda: mask.apply(wa, n_threads=threads), None),
             "numpy multiply(out=w)": (lambda: np.multiply(wn, keep, out=wn), None)}
    torch = _torch()
    if torch is not None:
        wt = _to_torch(w.copy())
        kt = torch.from_numpy(keep)
        impls["torch mul_"] = (lambda: wt.mul_(kt), None)
    impls.update(_floors("np.copyto", lambda: _bits(w), lambda: np.empty_like(_bits(w)),
                         lambda s, d: np.copyto(d, s), threads))
    return impls


def build_global(ws, threads, with_torch=True):
    scores = [np.abs(w) for w in ws]  # importance scores (|w|): the input of generate_global_mask
    total = sum(s.size for s in scores)
    k = prune_count(total)
    impls = {"aprender": (lambda: generate_global_mask(scores, SPARSITY, n_threads=threads), None)}
    outs = [np.empty(s.shape, np.bool_) for s in scores]
    impls["aprender out="] = (lambda: generate_global_mask(scores, SPARSITY, n_threads=threads,
                                                           out=outs), None)

    def np_global():
        a = np.concatenate([s.reshape(-1) for s in scores])
        t = np.partition(a, k - 1)[k - 1]
        return [s > t for s in scores]

    impls["numpy concat + partition threshold"] = (np_global, None)
    torch = _torch() if with_torch else None
    if torch is not None:
        prune = torch.nn.utils.prune
        layers = []
        for w in ws:
            lin = torch.nn.utils.skip_init(torch.nn.Linear, w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(w))
            layers.append(lin)

        def reset():
            for lin, w in zip(layers, ws):
                if prune.is_pruned(lin):
                    prune.remove(lin, "weight")
                    with torch.no_grad():
                        lin.weight.copy_(torch.from_numpy(w))

        def torch_global():
            prune.global_unstructured([(lin, "weight") for lin in layers],
                                      pruning_method=prune.L1Unstructured, amount=SPARSITY)
            return [lin.weight_mask for lin in layers]

        impls["torch prune.global_unstructured"] = (torch_global, reset)
    # floor: the same single-tensor floor over each of the tensors, summed (see run_case)
    floors = [_mask_floor(w, threads) for w in ws]
    for name in floors[0]:
        fns = [f[name][0] for f in floors]
        impls[name + " x%d" % len(ws)] = (lambda fns=fns: [f() for f in fns], None)
    return impls


SHAPES_F32 = [(768, 3072), (4096, 4096), (11008, 4096)]
SHAPE_16 = (4096, 4096)
KINDS = [("unstructured", "unstructured 50% exact", build_unstructured),
         ("per_row", "per-row 50%", build_per_row),
         ("nm24", "2:4 along rows", build_nm),
         ("apply", "apply bool mask in place", build_apply)]


def all_cases(quick):
    """The cases; --quick drops 11008x4096 and the ~30 s PyTorch global_unstructured peer."""
    cases = []
    specs = [(s, "float32") for s in SHAPES_F32 if not (quick and s == (11008, 4096))]
    specs += [(SHAPE_16, "float16"), (SHAPE_16, "bfloat16")]
    for kind, title, build in KINDS:
        for shape, dt in specs:
            cid = f"{kind}-{dt}-{shape[0]}x{shape[1]}"
            cases.append(Case(cid, kind, title, shape, dt,
                              lambda threads, shape=shape, dt=dt, build=build:
                              build(make_weights(shape, dt), threads)))
    cases.append(Case("global-float32-4x4096x4096", "global", "global 50% over 4 tensors",
                      (4096, 4096), "float32",
                      lambda threads: build_global([make_weights((4096, 4096), "float32", seed=i)
                                                    for i in range(4)], threads,
                                                   with_torch=not quick), count=4))
    return cases


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def time_fn(fn, setup, quick):
    """Warm up once, then time repeats; returns (median s, min s, repeats)."""
    lo, hi, budget, slow = (1, 5, 0.25, 0.5) if quick else (3, 25, 2.0, 5.0)
    if setup:
        setup()
    t0 = time.perf_counter()
    res = fn()
    first = time.perf_counter() - t0
    del res
    samples = []
    reps = max(lo, min(hi, int(budget / max(first, 1e-6))))
    if first > slow:  # long enough that the first-call overhead does not matter: keep it
        samples.append(first)
        reps = min(reps, 2)
    for _ in range(max(0, reps - len(samples))):
        if setup:
            setup()
        t0 = time.perf_counter()
        res = fn()
        samples.append(time.perf_counter() - t0)
        del res
    return statistics.median(samples), min(samples), len(samples)


def _in_quick(case, impl):
    """--quick times 16-bit peers only where a target needs them (NumPy float16 apply): NumPy's
    float16/bfloat16 sorts and PyTorch's half-precision topk take seconds at 4096x4096."""
    if case.dtype == "float32" or impl.startswith(("aprender", "floor")):
        return True
    return case.kind == "apply" and case.dtype == "float16" and impl.startswith("numpy")


def run_case(case, threads, quick):
    impls = case.build(threads)
    rows = []
    for name, (fn, setup) in impls.items():
        if quick and not _in_quick(case, name):
            continue
        try:
            med, best, reps = time_fn(fn, setup, quick)
            err = None
        except Exception as exc:  # noqa: BLE001 - a peer that cannot handle a dtype is reported
            med = best = reps = None
            err = f"{type(exc).__name__}: {exc}"[:120]
        rows.append({"case": case.id, "kind": case.kind, "label": case.label,
                     "shape": list(case.shape), "dtype": case.dtype, "tensors": case.count,
                     "weight_bytes": case.weight_bytes, "impl": name,
                     "median_ms": None if med is None else med * 1e3,
                     "min_ms": None if best is None else best * 1e3, "repeats": reps,
                     "error": err})
    del impls
    gc.collect()
    return rows


def add_ratios(rows):
    """x_floor and peer/aprender ratios.  The floor of a case is the fastest median of any floor
    run over the same bytes (same floor operation, shape, dtype and tensor count) in this run:
    several cases time the same np.greater pass, and the fastest of them is the least disturbed
    by other load on the machine."""
    def floor_key(r):
        return (r["impl"].split(" (")[0], tuple(r["shape"]), r["dtype"], r["tensors"])

    best = {}
    for r in rows:
        if r["impl"].startswith("floor") and r["median_ms"]:
            k = floor_key(r)
            best[k] = min(best.get(k, float("inf")), r["median_ms"])
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    for case_rows in by_case.values():
        floors = [best[floor_key(r)] for r in case_rows if floor_key(r) in best]
        floor = min(floors) if floors else None
        apr = next((r["median_ms"] for r in case_rows if r["impl"] == "aprender"), None)
        for r in case_rows:
            m = r["median_ms"]
            r["floor_ms"] = floor
            r["x_floor"] = m / floor if m and floor else None
            r["x_floor_min"] = r["min_ms"] / floor if m and floor else None
            r["peer_over_aprender"] = m / apr if m and apr else None


# ------------------------------------------------------------------------------------------------
# peak memory (fresh child process)
# ------------------------------------------------------------------------------------------------


def _status_kib():
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0])
    return out


def _out_bytes(res):
    if res is None:
        return 0
    if isinstance(res, (list, tuple)):
        return sum(_out_bytes(r) for r in res)
    if isinstance(res, dict):
        return sum(_out_bytes(r) for r in res.values())
    if hasattr(res, "keep"):
        return res.keep.nbytes
    if isinstance(res, np.ndarray):
        return res.nbytes if res.base is None else 0
    if hasattr(res, "element_size"):
        return res.numel() * res.element_size()
    return 0


def _mem_child(case_ids, threads, only_aprender):
    libc = None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)   # M_MMAP_THRESHOLD: fixed, large buffers go back on free
        libc.mallopt(-1, 128 * 1024)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        libc = None
    # initialise thread pools and lazy state on tiny inputs so they are not charged to a case
    tiny = make_weights((64, 1024), "float32")
    magnitude_mask(tiny, 0.5, n_threads=threads)
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads)
        torch.from_numpy(tiny).abs().view(-1).topk(10)
    wanted = set(case_ids)
    results = []
    for case in all_cases(quick=only_aprender):
        if case.id not in wanted:
            continue
        impls = case.build(threads)
        for name, (fn, setup) in impls.items():
            if name.startswith("floor") or (only_aprender and name != "aprender"):
                continue
            rec = {"case": case.id, "impl": name, "extra_bytes": None, "out_bytes": None}
            try:
                if setup:
                    setup()
                gc.collect()
                if libc is not None:
                    libc.malloc_trim(0)
                base = _status_kib()["VmRSS"]
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
                res = fn()
                peak = _status_kib()["VmHWM"]
                rec["out_bytes"] = _out_bytes(res)
                rec["extra_bytes"] = max(0, peak - base) * 1024
                del res
            except Exception as exc:  # noqa: BLE001
                rec["error"] = f"{type(exc).__name__}: {exc}"[:120]
            results.append(rec)
        del impls
        gc.collect()
    print(json.dumps(results))


def measure_memory(cases, threads, quick):
    """{(case id, impl): record}; one fresh child per case (all cases in one child with quick)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return {}
    groups = [[c.id for c in cases]] if quick else [[c.id] for c in cases]
    out = {}
    for ids in groups:
        cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads),
               "--_mem-child", ",".join(ids)] + (["--quick"] if quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"memory child failed for {ids}: {proc.stderr.strip()[-300:]}", file=sys.stderr)
            continue
        for rec in json.loads(proc.stdout.strip().splitlines()[-1]):
            out[(rec["case"], rec["impl"])] = rec
    return out


# ------------------------------------------------------------------------------------------------
# targets and report
# ------------------------------------------------------------------------------------------------


def _get(rows, case, impl_prefix):
    for r in rows:
        if r["case"] == case and r["impl"].startswith(impl_prefix) and r["median_ms"]:
            return r
    return None


def evaluate_targets(rows, cases):
    targets = []

    def add(name, value, limit, ok, note="", value_min=None):
        if value is None:  # a case that was not run (--cases) or failed
            return
        targets.append({"target": name, "value": value, "value_min": value_min, "limit": limit,
                        "status": "n/a" if ok is None else ("PASS" if ok else "MISS"),
                        "note": note})

    # the floor is the one-thread np.greater (or the split one when faster); issue #14's bounds
    bound = {"unstructured": 2.5, "per_row": 3.0, "nm24": 1.3}
    for c in cases:
        a = _get(rows, c.id, "aprender")
        if c.kind in bound and c.dtype == "float32":
            add(f"{c.id}: aprender <= {bound[c.kind]}x floor", a and a["x_floor"],
                bound[c.kind], a and a["x_floor"] <= bound[c.kind],
                value_min=a and a["x_floor_min"])
        if c.kind == "apply":
            p = _get(rows, c.id, "numpy multiply")
            if c.dtype == "float32":
                r = a["median_ms"] / p["median_ms"] if a and p else None
                add(f"{c.id}: aprender <= 1.2x np.multiply", r, 1.2,
                    None if r is None else r <= 1.2)
            elif c.dtype == "float16":
                r = p["median_ms"] / a["median_ms"] if a and p else None
                add(f"{c.id}: aprender >= 20x faster than np.multiply", r, 20.0,
                    None if r is None else r >= 20.0, "value = numpy / aprender")
        if c.kind == "global":
            # fresh masks pay their first-touch page faults (about half the time at 4 x 64 MB);
            # callers pruning many tensors pass out= and reuse the pages
            o = _get(rows, c.id, "aprender out=")
            add(f"{c.id}: aprender out= <= 4x summed floors", o and o["x_floor"], 4.0,
                o and o["x_floor"] <= 4.0, value_min=o and o["x_floor_min"])
            sc = a.get("scratch_pct") if a else None
            add(f"{c.id}: aprender scratch memory <= 5% of weight bytes", sc, 5.0,
                None if sc is None else sc <= 5.0,
                "peak RSS growth minus the returned masks, % of weight bytes")
    # 16-bit no slower per element than float32 (same 4096x4096 shape)
    tol = 1.05
    for kind, _, _ in KINDS:
        ref = _get(rows, f"{kind}-float32-4096x4096", "aprender")
        for dt in ("float16", "bfloat16"):
            a = _get(rows, f"{kind}-{dt}-4096x4096", "aprender")
            r = a["median_ms"] / ref["median_ms"] if a and ref else None
            rm = a["min_ms"] / ref["min_ms"] if a and ref else None
            add(f"{kind}-{dt}-4096x4096: per element <= float32", r, tol,
                None if r is None else r <= tol, f"time ratio vs float32; {tol}x noise allowance",
                value_min=rm)
    return targets


def _fmt(v, spec, width):
    return f"{'-':>{width}}" if v is None else f"{v:{width}{spec}}"


def print_report(rows, targets, meta, sparse24):
    print(f"aprender {meta['aprender']} | numpy {meta['numpy']} | torch {meta['torch']} | "
          f"threads {meta['threads']} | {meta['cpu']} | quick={meta['quick']}")
    print("median ms over repeats; 'x floor' = time / floor; 'vs aprender' = time / aprender "
          "time (> 1: aprender is faster); 'extra MB' = peak RSS growth in a fresh process "
          "(scratch = minus returned masks)")
    case = None
    for r in rows:
        if r["case"] != case:
            case = r["case"]
            print(f"\n== {r['label']} ({r['weight_bytes'] / MB:.0f} MB of weights) ==")
            print(f"  {'implementation':<40}{'median ms':>11}{'min ms':>9}{'x floor':>9}"
                  f"{'vs aprender':>13}"
                  f"{'extra MB':>10}{'scratch':>9}")
        if r["error"]:
            print(f"  {r['impl']:<40}{'error: ' + r['error']}")
            continue
        xf = r["x_floor"]
        vs = None if r["impl"] == "aprender" else r["peer_over_aprender"]
        print(f"  {r['impl']:<40}{_fmt(r['median_ms'], '.2f', 11)}{_fmt(r['min_ms'], '.2f', 9)}"
              f"{_fmt(xf, '.2f', 8)}x"
              f"{_fmt(vs, '.2f', 12)}x{_fmt(r.get('extra_mb'), '.1f', 10)}"
              f"{_fmt(r.get('scratch_mb'), '.1f', 9)}")
    print("\nTargets (threads = %d; judged on medians, 'min' uses the fastest repeat)"
          % meta["threads"])
    for t in targets:
        v = f"{t['value']:.2f}"
        vm = "" if t.get("value_min") is None else f" (min {t['value_min']:.2f})"
        note = f"  [{t['note']}]" if t["note"] else ""
        print(f"  {t['status']:>4}  {t['target']:<66} {v:>7}{vm} vs limit {t['limit']}{note}")
    if sparse24:
        print("\nsparse24 (benchmarks/compare_sparse24.py)")
        keys = []
        for r in sparse24:
            keys += [k for k in r if k not in keys]
        print("  " + " | ".join(keys))
        for r in sparse24:
            cells = []
            for k in keys:
                v = r.get(k)
                cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
            print("  " + " | ".join(cells))


def run_sparse24(quick):
    try:
        try:
            from compare_sparse24 import run as run24
        except ImportError:
            from benchmarks.compare_sparse24 import run as run24
    except ImportError:
        return []
    try:
        return list(run24(quick))
    except Exception as exc:  # noqa: BLE001 - report, do not lose the main table
        print(f"compare_sparse24.run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return [{"error": f"{type(exc).__name__}: {exc}"}]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, skip 11008x4096")
    ap.add_argument("--json", metavar="PATH", help="write rows, targets and metadata as JSON")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for aprender, PyTorch and the split floors (default: OpenMP max)")
    ap.add_argument("--cases", default=None,
                    help="only cases whose id contains this text ('sparse24' runs that script)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child process")
    ap.add_argument("--_mem-child", dest="mem_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from aprender._kernels import _openmp

    threads = args.threads or max(1, _openmp.max_threads())
    if args.mem_child is not None:
        _mem_child(args.mem_child.split(","), threads, only_aprender=args.quick)
        return 0
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    cases = [c for c in all_cases(args.quick) if not args.cases or args.cases in c.id]
    rows = []
    for case in cases:
        rows += run_case(case, threads, args.quick)
    add_ratios(rows)
    mem = {} if args.no_memory else measure_memory(cases, threads, args.quick)
    for r in rows:
        rec = mem.get((r["case"], r["impl"]))
        if rec and rec.get("extra_bytes") is not None:
            r["extra_mb"] = rec["extra_bytes"] / MB
            r["scratch_mb"] = max(0, rec["extra_bytes"] - rec["out_bytes"]) / MB
            r["scratch_pct"] = 100.0 * max(0, rec["extra_bytes"] - rec["out_bytes"]) \
                / r["weight_bytes"]
    targets = evaluate_targets(rows, cases)
    sparse24 = run_sparse24(args.quick) if not args.cases or "sparse24" in args.cases else []
    meta = {"aprender": aprender.__version__, "numpy": np.__version__,
            "torch": torch.__version__ if torch is not None else None, "threads": threads,
            "quick": args.quick, "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "openmp": _openmp.openmp_enabled()}
    print_report(rows, targets, meta, sparse24)
    meta["seconds"] = time.perf_counter() - start
    print(f"\ntotal {meta['seconds']:.1f} s")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "targets": targets, "sparse24": sparse24}, fh,
                      indent=1, default=float)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
