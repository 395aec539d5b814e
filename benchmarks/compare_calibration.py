"""Calibration statistics and Wanda scores: aprender vs NumPy vs PyTorch vs a read floor, in one
process.

    python benchmarks/compare_calibration.py            # (8192, 4096) and (2048, 11008)
    python benchmarks/compare_calibration.py --quick    # (8192, 4096) bfloat16 only, fewer repeats
    python benchmarks/compare_calibration.py --threads 2

``run(quick, threads)`` returns rows {"case", "impl", "median_ms", "min_ms", "speedup"} where
speedup is the NumPy baseline's median over the row's median.  Cases:

* ``sum_squares``: the per-feature float64 sum of squares of a batch of activations
  (``ActivationStats.update``), against ``(x.astype(np.float64) ** 2).sum(0)`` (the baseline, the
  target being >= 3x on (8192, 4096) bfloat16), torch in float64 (``t.double().pow(2).sum(0)``)
  and float32 (``t.float().pow(2).sum(0)``, what most Wanda code does), and a read floor:
  ``np.count_nonzero`` over the same bytes (one read, no arithmetic).
* ``wanda_scores``: ``WandaImportance.compute`` (scores and their statistics) against NumPy
  ``np.abs(w.astype(np.float32)) * scale`` and torch ``w.abs().float() * scale``.

Timing: one warm-up, then the median (and minimum) of ``repeats`` ``time.perf_counter`` deltas.
"""
import argparse
import os
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from aprender.pruning import ActivationStats, WandaImportance, wanda_scale  # noqa: E402


def _times(fn, repeat):
    fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3, min(out) * 1e3


def _array(shape, dtype, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    if dtype == "bfloat16":
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16)
    return x.astype(dtype)


def _torch_of(x):
    try:
        import torch
    except ImportError:
        return None, None
    if x.dtype.name == "bfloat16":
        return torch, torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch, torch.from_numpy(x)


def run(quick=False, threads=None):
    cases = [((8192, 4096), "bfloat16")] if quick else \
        [((8192, 4096), d) for d in ("bfloat16", "float16", "float32")] + \
        [((2048, 11008), "bfloat16")]
    repeat = 5 if quick else 11
    rows = []
    for shape, dtype in cases:
        x = _array(shape, dtype)
        torch, t = _torch_of(x)
        label = f"sum_squares {shape[0]}x{shape[1]} {dtype}"
        st = ActivationStats(shape[1])
        impls = [
            ("numpy (x.astype(f64)**2).sum(0)", lambda: (x.astype(np.float64) ** 2).sum(0)),
            ("aprender ActivationStats.update", lambda: st.update(x, n_threads=threads)),
        ]
        if torch is not None:
            impls += [("torch t.double().pow(2).sum(0)", lambda: t.double().pow(2).sum(0)),
                      ("torch t.float().pow(2).sum(0)", lambda: t.float().pow(2).sum(0))]
        raw = x.view(np.uint8)
        impls.append(("floor: np.count_nonzero (read once)", lambda: np.count_nonzero(raw)))
        rows += _measure(label, impls, repeat)

        w = _array((shape[1], shape[1]) if quick else (4096, shape[1]), dtype, seed=1)
        stats = ActivationStats(shape[1]).update(x[:256])
        scale = wanda_scale(stats)
        tw = _torch_of(w)[1]
        label = f"wanda_scores {w.shape[0]}x{w.shape[1]} {dtype}"
        impls = [
            ("numpy np.abs(w.astype(f32)) * scale",
             lambda: np.abs(w.astype(np.float32)) * scale),
            ("aprender WandaImportance.compute",
             lambda: WandaImportance().compute(w, stats, n_threads=threads)),
        ]
        if torch is not None:
            ts = torch.from_numpy(scale)
            impls.append(("torch w.abs().float() * scale", lambda: tw.abs().float() * ts))
        rows += _measure(label, impls, repeat)
    return rows


def _measure(label, impls, repeat):
    rows = []
    base = None
    for name, fn in impls:
        med, mn = _times(fn, repeat)
        if base is None:
            base = med
        rows.append({"case": label, "impl": name, "median_ms": med, "min_ms": mn,
                     "speedup": base / med})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    rows = run(args.quick, args.threads)
    width = max(len(r["impl"]) for r in rows)
    case = None
    for r in rows:
        if r["case"] != case:
            case = r["case"]
            print(f"\n{case}")
            print(f"  {'implementation':<{width}}  {'median ms':>10}  {'min ms':>8}  "
                  f"{'vs numpy':>8}")
        print(f"  {r['impl']:<{width}}  {r['median_ms']:>10.2f}  {r['min_ms']:>8.2f}  "
              f"{r['speedup']:>7.2f}x")


if __name__ == "__main__":
    main()
