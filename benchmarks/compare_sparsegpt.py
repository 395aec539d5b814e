"""SparseGPT on one layer: aprender vs a straightforward torch-CPU implementation of the same
algorithm, time and memory, each in a fresh process.

    python benchmarks/compare_sparsegpt.py                 # 4096 x 4096 float32, 50 % and 2:4
    python benchmarks/compare_sparsegpt.py --size 1024     # smaller, quicker
    python benchmarks/compare_sparsegpt.py --threads 2

The torch implementation (``torch_sparsegpt`` below) is the algorithm as the paper's code runs
it, with the same numerics as aprender's: the damped Hessian factorised in float64 (Cholesky,
``cholesky_inverse``, upper Cholesky), the weights updated in float32, blocks of 128 columns
with the block's mask from ``w² / U[j, j]²`` (``topk`` for the exact count), a Python loop over
the columns of a block, and the lazy update ``W[:, c1:] -= E @ U[c0:c1, c1:]`` after each block.

Each implementation runs in its own subprocess (same inputs from a fixed seed); the peak
resident memory it adds over the inputs is read from ``/proc/self/status`` (VmHWM minus the
resident size after the inputs are built).  Timing: the median of ``--repeat`` runs after one
warm-up on a small layer (imports, BLAS buffers); the peak of the first full-size run is
the one reported (it includes first-touch allocations).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402


def inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2 * n, n), dtype=np.float32)
    x[:, 1:] += 0.5 * x[:, :-1]  # correlated inputs, as activations are
    h = x.T @ x
    w = rng.standard_normal((n, n), dtype=np.float32)
    return w, h


def torch_sparsegpt(torch, w, h, sparsity, n=0, m=0, block=128, percdamp=0.01):
    """SparseGPT in torch on the CPU (see the module text)."""
    W = w.clone().float()
    rows, cols = W.shape
    H = h.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True).float()
    del H, L, Hinv
    keep = torch.ones_like(W, dtype=torch.bool)
    for c0 in range(0, cols, block):
        c1 = min(cols, c0 + block)
        W1 = W[:, c0:c1].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[c0:c1, c0:c1]
        d = torch.diag(U1)
        if not m:
            sal = W1 ** 2 / d.reshape(1, -1) ** 2
            k = int(round(sparsity * sal.numel()))
            k1 = torch.ones(sal.numel(), dtype=torch.bool)
            if k:
                k1[torch.topk(sal.reshape(-1), k, largest=False).indices] = False
            keep1 = k1.reshape(sal.shape)
        else:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        for i in range(c1 - c0):
            if m and i % m == 0:
                sal = W1[:, i:i + m] ** 2 / d[i:i + m].reshape(1, -1) ** 2
                idx = torch.topk(sal, m - n, dim=1, largest=False).indices
                keep1[:, i:i + m].scatter_(1, idx, False)
            col = W1[:, i]
            q = torch.where(keep1[:, i], col, torch.zeros_like(col))
            e = (col - q) / U1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            E1[:, i] = e
        W[:, c0:c1] = W1
        keep[:, c0:c1] = keep1
        W[:, c1:] -= E1.matmul(U[c0:c1, c1:])
    return W, keep


def _rss_kb(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_hwm():
    try:  # writing 5 to clear_refs resets VmHWM to the current resident size (Linux)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def child(impl, size, pattern, repeat, threads):
    w, h = inputs(size)
    sparsity = 0.5
    if impl == "torch":
        import torch

        torch.set_num_threads(threads)
        tw, th = torch.from_numpy(w), torch.from_numpy(h)
        nm = (2, 4) if pattern == "2:4" else (0, 0)

        def run():
            return torch_sparsegpt(torch, tw, th, sparsity, *nm)
    else:
        from aprender.pruning import sparsegpt

        def run():
            return sparsegpt(w, h, None if pattern == "2:4" else sparsity, pattern=pattern,
                             n_threads=threads)
    small_w, small_h = inputs(256, seed=1)  # imports, BLAS buffers and thread pools first
    if impl == "torch":
        torch_sparsegpt(torch, torch.from_numpy(small_w), torch.from_numpy(small_h), sparsity,
                        *nm)
    else:
        sparsegpt(small_w, small_h, None if pattern == "2:4" else sparsity, pattern=pattern,
                  n_threads=threads)
    del small_w, small_h
    base = _rss_kb("VmRSS")
    _reset_hwm()
    t0 = time.perf_counter()
    out = run()
    first = time.perf_counter() - t0
    peak = _rss_kb("VmHWM") - base
    del out
    times = [first]
    for _ in range(repeat - 1):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"impl": impl, "pattern": pattern, "median_s": statistics.median(times),
                      "min_s": min(times), "peak_extra_mb": peak / 1024}))


def run(size=4096, repeat=3, threads=None, patterns=("unstructured", "2:4")):
    threads = threads or len(os.sched_getaffinity(0))
    rows = []
    for pattern in patterns:
        for impl in ("aprender", "torch"):
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", impl,
                                  "--size", str(size), "--pattern", pattern, "--repeat",
                                  str(repeat), "--threads", str(threads)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--pattern", default=None)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.size, a.pattern, a.repeat, a.threads)
        return
    n = a.size
    wmb = n * n * 4 / 2**20
    print(f"SparseGPT, {n} x {n} float32 weights and Hessian (W = H = {wmb:.0f} MiB), "
          f"{a.threads or len(os.sched_getaffinity(0))} threads, median of {a.repeat}")
    rows = run(n, a.repeat, a.threads, (a.pattern,) if a.pattern else ("unstructured", "2:4"))
    print(f"{'pattern':<13}{'impl':<10}{'median s':>10}{'min s':>9}{'peak extra MiB':>16}"
          f"{'torch / aprender':>18}")
    by = {(r["pattern"], r["impl"]): r for r in rows}
    for r in rows:
        ratio = by[(r["pattern"], "torch")]["median_s"] / r["median_s"]
        print(f"{r['pattern']:<13}{r['impl']:<10}{r['median_s']:>10.2f}{r['min_s']:>9.2f}"
              f"{r['peak_extra_mb']:>16.0f}{ratio:>18.2f}")
    print(f"memory bound for aprender: output ({wmb:.0f} MiB weights + {wmb / 4:.0f} MiB mask) "
          f"+ W + H + 2 blocks = {2 * wmb + wmb / 4 + wmb + 2 * n * 128 * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
