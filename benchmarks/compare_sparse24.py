"""aprender 2:4 compression vs PyTorch's CPU CUTLASS conversion vs a copy floor, in one process.

``run(quick)`` returns rows {"case", "impl", "median_ms", "ratio_vs_floor", "speedup_vs_torch"};
``python benchmarks/compare_sparse24.py [--quick]`` prints them as a table.  The floor is
``np.copyto`` of the dense weight's bytes into a preallocated buffer (the compressors allocate
their outputs, so they also pay first-touch page faults the floor does not).
"""
import os
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a script from a source checkout (as compare.py does)
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from aprender import sparse24  # noqa: E402


def _median_ms(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _weight(shape, name):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape, dtype=np.float32)
    if name == "bfloat16":
        import ml_dtypes

        w = w.astype(ml_dtypes.bfloat16)
    else:
        w = w.astype(np.float16)
    return sparse24.compress(w, layout="raw", select=True).to_dense()


def _torch_of(dense, name):
    import torch

    t = torch.from_numpy(dense.view(np.int16))
    return t.view(torch.bfloat16 if name == "bfloat16" else torch.float16)


def _case_rows(case, floor, ours, theirs):
    """The rows of one case: the copy floor, aprender, and PyTorch where it was timed."""
    rows = [{"case": case, "impl": "copy floor", "median_ms": floor, "ratio_vs_floor": 1.0,
             "speedup_vs_torch": None},
            {"case": case, "impl": "aprender", "median_ms": ours, "ratio_vs_floor": ours / floor,
             "speedup_vs_torch": theirs / ours if theirs else None}]
    if theirs is not None:
        rows.append({"case": case, "impl": "torch (CPU)", "median_ms": theirs,
                     "ratio_vs_floor": theirs / floor, "speedup_vs_torch": 1.0})
    return rows


def run(quick: bool) -> list:
    try:
        import torch
        from torch.sparse._semi_structured_conversions import (
            sparse_semi_structured_from_dense_cutlass as t_from,
            sparse_semi_structured_to_dense_cutlass as t_to)
    except ImportError:
        torch = None
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (11008, 4096)]
    repeat = 3 if quick else 7
    rows = []
    for shape in shapes:
        for name in ("float16", "bfloat16"):
            dense = _weight(shape, name)
            dst = np.empty_like(dense)
            floor = _median_ms(lambda: np.copyto(dst, dense), repeat)
            tdense = _torch_of(dense, name) if torch is not None else None
            for op in ("compress", "decompress"):
                for layout in ("cutlass", "bitmask"):
                    case = f"{op} {layout} {name} {shape[0]}x{shape[1]}"
                    s = sparse24.compress(dense, layout=layout)
                    if op == "compress":
                        ours = _median_ms(lambda: sparse24.compress(dense, layout=layout), repeat)
                    else:
                        ours = _median_ms(s.to_dense, repeat)
                    theirs = None
                    if torch is not None and layout == "cutlass":
                        if op == "compress":
                            theirs = _median_ms(lambda: t_from(tdense), max(1, repeat // 2))
                        else:
                            tv, tm = t_from(tdense)
                            theirs = _median_ms(lambda: t_to(tv, tm), max(1, repeat // 2))
                    rows += _case_rows(case, floor, ours, theirs)
        # float32: PyTorch's 1:2 pair layout (one value per pair of consecutive elements)
        w = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        dense = np.where(np.arange(shape[1]) % 2 == 0, w, np.float32(0)).astype(np.float32)
        dst = np.empty_like(dense)
        floor = _median_ms(lambda: np.copyto(dst, dense), repeat)
        case = f"compress cutlass float32 {shape[0]}x{shape[1]}"
        ours = _median_ms(lambda: sparse24.compress(dense, layout="cutlass"), repeat)
        theirs = None
        if torch is not None:
            td = torch.from_numpy(dense.copy())
            theirs = _median_ms(lambda: t_from(td), max(1, repeat // 2))
        rows += _case_rows(case, floor, ours, theirs)
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    rows = run("--quick" in argv)
    print(f"{'case':<40} {'impl':<12} {'median ms':>10} {'x floor':>8} {'x faster than torch':>20}")
    for r in rows:
        sp = f"{r['speedup_vs_torch']:.1f}" if r["speedup_vs_torch"] else "-"
        print(f"{r['case']:<40} {r['impl']:<12} {r['median_ms']:>10.2f} "
              f"{r['ratio_vs_floor']:>8.2f} {sp:>20}")


if __name__ == "__main__":
    main()
