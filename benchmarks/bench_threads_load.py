"""Default threads against one thread, with a CPU-burning neighbour on every core.

    python benchmarks/bench_threads_load.py                 # all cases, 3 alternating rounds
    python benchmarks/bench_threads_load.py --rounds 5 --width 2048
    python benchmarks/bench_threads_load.py --no-load       # the same cases on an idle machine

A user's machine is rarely idle.  Thread pools that spin while they wait (OpenMP teams, OpenBLAS
servers, torch's intra-op pool) lose badly to a neighbour that wants the same cores, and worse
when two of them are awake at once.  This script starts one busy-loop process per CPU (killed
when it ends, also on error), then times each case in a fresh child process with the default
thread count and with one thread, alternating, and prints the medians and their ratio
(default / one: above 1 means the default is slower than a single thread).

Cases (the child times the call only; imports and data generation are excluded):

* ``sparsegpt-api``: ``aprender.sparsegpt`` on one ``--width`` x ``--width`` float32 layer,
  Hessian ``XᵀX`` of 2 x width random tokens, 50 % unstructured.
* ``calibrate``: ``aprender calibrate --hessian`` of a generated Llama (random bfloat16
  weights, hidden 512, 2 blocks) over 32 lines of 64 words.
* ``prune-wanda`` / ``prune-sparsegpt``: ``aprender prune --importance wanda|sparsegpt`` of that
  checkpoint from that calibration file, 50 %.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, _ROOT)
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

VOCAB = 1000

_CHILD = r"""
import sys, time, json
import numpy as np
case, threads, folder, width = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
nt = None if threads == "default" else int(threads)
from aprender.pruning.reconstruct import sparsegpt
from aprender import cli
if case == "sparsegpt-api":
    rng = np.random.default_rng(0)
    w = rng.standard_normal((width, width), dtype=np.float32)
    x = rng.standard_normal((2 * width, width), dtype=np.float32)
    h = x.T @ x
    t0 = time.perf_counter()
    sparsegpt(w, h, 0.5, n_threads=nt)
else:
    import torch, transformers  # noqa: F401 - imports are not timed
    opts = [] if nt is None else ["--threads", str(nt)]
    model, cal = folder + "/model", folder + "/cal.safetensors"
    if case == "calibrate":
        argv = ["calibrate", model, "--text", folder + "/text.txt", "-o", cal + "." + threads,
                "--samples", "32", "--hessian", "--quiet", "--force"]
    else:
        argv = ["prune", model, "-o", folder + "/out-" + threads, "--sparsity", "0.5",
                "--importance", case.split("-")[1], "--calibration", cal, "--quiet", "--force"]
    t0 = time.perf_counter()
    rc = cli.main(argv + opts)
    if rc:
        raise SystemExit(f"{case}: exit {rc}")
print(json.dumps({"s": time.perf_counter() - t0}))
"""


def _prepare(folder):
    from bench_calibrate import make_llama
    import numpy as np

    make_llama(os.path.join(folder, "model"), 2, hidden=512, inter=1376, heads=8, kv=2,
               vocab=VOCAB)
    rng = np.random.default_rng(1)
    with open(os.path.join(folder, "text.txt"), "w") as f:
        for _ in range(32):
            f.write(" ".join(f"w{i}" for i in rng.integers(0, VOCAB - 2, size=64)) + "\n")
    from aprender import cli
    rc = cli.main(["calibrate", os.path.join(folder, "model"), "--text",
                   os.path.join(folder, "text.txt"), "-o",
                   os.path.join(folder, "cal.safetensors"), "--samples", "32", "--hessian",
                   "--quiet"])
    if rc:
        raise SystemExit("preparing the calibration file failed")


def _run(case, threads, folder, width):
    env = dict(os.environ)
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _CHILD, case, threads, folder, str(width)],
                         env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"{case} ({threads}) failed:\n{out.stderr[-2000:]}")
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])["s"]


def _neighbours(n):
    """n busy-loop processes (one per CPU), in their own process group each."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                             stdin=subprocess.DEVNULL, start_new_session=True)
            for _ in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    ap.add_argument("--width", type=int, default=1024, help="the SparseGPT layer's size")
    ap.add_argument("--cases", default="sparsegpt-api,calibrate,prune-wanda,prune-sparsegpt")
    ap.add_argument("--no-load", dest="load", action="store_false",
                    help="no busy neighbours (an idle-machine baseline)")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory() as folder:
        if any(c != "sparsegpt-api" for c in cases):
            _prepare(folder)
        procs = _neighbours(cpus) if args.load else []
        try:
            print(f"{'case':<18}{'default s':>11}{'1 thread s':>12}{'ratio':>8}   "
                  f"({len(procs)} busy neighbours on {cpus} CPUs, {args.rounds} rounds)")
            for case in cases:
                t = {"default": [], "1": []}
                for r in range(args.rounds):
                    order = ("default", "1") if r % 2 == 0 else ("1", "default")
                    for th in order:
                        t[th].append(_run(case, th, folder, args.width))
                d, o = statistics.median(t["default"]), statistics.median(t["1"])
                print(f"{case:<18}{d:>11.3f}{o:>12.3f}{d / o:>8.2f}", flush=True)
        finally:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()


if __name__ == "__main__":
    main()
