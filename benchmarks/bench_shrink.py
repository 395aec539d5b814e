"""`aprender shrink` on a generated multi-GB checkpoint: time against a file copy, peak RSS.

    python benchmarks/bench_shrink.py                 # Llama-like, 24 blocks, ~2.4 GB bf16
    python benchmarks/bench_shrink.py --layers 4      # a smaller one (quick look)
    python benchmarks/bench_shrink.py --repeat 3      # best of three runs per case

The checkpoint is bench_calibrate.py's generated Llama (random bfloat16 weights, hidden 2048,
MLP 5632, 16 heads / 4 KV heads, vocab 32000, one shard per four blocks, written with
aprender's safetensors writer).  The calibration file is written with the format-2 API of
aprender.pruning.calibration: block statistics (cosine sums) for every block and input
statistics (sums of squares, no Hessian: ``--hessian`` adds them, for compensation) of every
down and output projection.  Each case runs in a fresh child process; its peak RSS is the
child's ``VmHWM``:

* ``copy``: ``shutil.copytree`` of the model folder (the floor);
* ``shrink-calib``: ``aprender shrink --mlp 0.25 --heads 0.25 --drop-layers 2 --calibration``;
* ``shrink-magnitude``: ``aprender shrink --mlp 0.25 --heads 0.25`` (no calibration: widths by
  magnitude; dropping layers needs block statistics, so none are dropped).

The page cache is not dropped between cases (that needs privileges): every case after the
first reads a warm cache, so the first, untimed, pass warms it.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for p in (_ROOT, _HERE):
    if p not in sys.path:  # run as a script from a source checkout
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

from bench_calibrate import _peak_rss_mib, _size, make_llama  # noqa: E402

CASES = {
    "copy": None,
    "shrink-calib": ["--mlp", "0.25", "--heads", "0.25", "--drop-layers", "2",
                     "--calibration", "CALIB"],
    "shrink-magnitude": ["--mlp", "0.25", "--heads", "0.25"],
}


def make_calibration(folder, path, hessian=False, seed=0):
    """A format-2 calibration file for the generated model: block statistics of every block,
    input statistics of every down and output projection (random, seeded)."""
    from aprender.io.checkpoint import Checkpoint
    from aprender.pruning.calibration import ActivationStats, CalibrationContext

    rng = np.random.default_rng(seed)
    ckpt = Checkpoint(folder)
    ctx, tokens = CalibrationContext(), 4096
    blocks = set()
    for _, t in ckpt.items():
        if t.name.endswith(("mlp.down_proj.weight", "self_attn.o_proj.weight")):
            d = t.shape[1]
            ss = rng.uniform(0.5, 2.0, d) * tokens
            h = None
            if hessian:
                x = rng.standard_normal((2 * d, d))
                h = x.T @ x
            ctx.add_layer_stats(t.name[:-len(".weight")],
                                ActivationStats.from_arrays(ss, tokens, hessian=h))
            blocks.add(t.name.split(".")[2])
    for b in sorted(blocks, key=int):
        ctx.add_block_stats(f"model.layers.{b}", float(rng.uniform(0.5, 0.99)) * tokens, tokens)
    ctx.num_samples = 32
    ctx.save(path)


def _child(case, src, dst, calib, threads):
    """One measured run in this (fresh) process; prints a JSON line."""
    from aprender.cli import main as cli  # imports are not timed

    t0 = time.perf_counter()
    if case == "copy":
        shutil.copytree(src, dst)
    else:
        args = [calib if a == "CALIB" else a for a in CASES[case]]
        rc = cli(["shrink", src, "-o", dst, "--quiet", "--threads", str(threads)] + args)
        if rc:
            raise SystemExit(rc)
    seconds = time.perf_counter() - t0
    print(json.dumps({"case": case, "seconds": seconds, "peak_rss_mib": _peak_rss_mib()}))


def _measure(case, src, dst, calib, threads):
    shutil.rmtree(dst, ignore_errors=True)
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, "--src", src,
                        "--dst", dst, "--calib", calib, "--threads", str(threads)],
                       capture_output=True, text=True)
    out = {"case": case, "error": (r.stderr.strip().splitlines() or ["?"])[-1]} \
        if r.returncode else json.loads(r.stdout.strip().splitlines()[-1])
    if not r.returncode and case != "copy":
        out["output"] = _size(dst)
    shutil.rmtree(dst, ignore_errors=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=2, help="runs per case; the best is shown")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hessian", action="store_true",
                    help="the calibration file also holds Hessians (compensation runs)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.child, args.src, args.dst, args.calib, args.threads)
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r} (cases: {', '.join(CASES)})")
    with tempfile.TemporaryDirectory(prefix="bench-shrink-") as tmp:
        src, dst = os.path.join(tmp, "llama"), os.path.join(tmp, "out")
        calib = os.path.join(tmp, "calib.safetensors")
        t0 = time.perf_counter()
        make_llama(src, args.layers)
        make_calibration(src, calib, hessian=args.hessian)
        print(f"generated {_size(src)} (+ a {os.path.getsize(calib) / 2 ** 20:.1f} MiB "
              f"calibration file) in {time.perf_counter() - t0:.0f} s")
        _measure("copy", src, dst, calib, args.threads)  # warms the page cache; not shown
        best = {}
        for _ in range(args.repeat):
            for case in cases:
                r = _measure(case, src, dst, calib, args.threads)
                old = best.get(case)
                if old is None or "error" in old or ("error" not in r and
                                                     r["seconds"] < old["seconds"]):
                    r["peak_rss_mib"] = max(r.get("peak_rss_mib", 0),
                                            (old or {}).get("peak_rss_mib", 0))
                    best[case] = r
        floor = best.get("copy", {}).get("seconds")
        print(f"\nLlama-like, {args.layers} blocks; best of {args.repeat} runs per case "
              "(peak RSS: the highest of those runs)")
        print(f"{'case':<18}{'seconds':>9}{'x copy':>8}{'peak RSS MiB':>14}  output")
        for case in cases:
            r = best[case]
            if "error" in r:
                print(f"{case:<18} error: {r['error']}")
                continue
            ratio = f"{r['seconds'] / floor:.2f}" if floor else "-"
            print(f"{case:<18}{r['seconds']:>9.2f}{ratio:>8}{r['peak_rss_mib']:>14.0f}  "
                  f"{r.get('output', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
