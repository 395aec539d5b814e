"""Distributed pruning benchmark: the checkpoint benchmark's tensors (bench_checkpoint.py), split
into one shard per layer, pruned in-process and on Dask LocalClusters of one and two workers.

    python benchmarks/bench_distributed.py               # ~256 MB checkpoint
    python benchmarks/bench_distributed.py --size-mb 1024

For each case (in-process with one thread and with every core; Dask workers run one
single-threaded task each): the best wall time of --repeat runs (the cluster is started before
the clock), the bytes the client received (pickled results: the global plan's per-tensor
summaries and the shards' report rows) and those bytes per selected tensor.  Every distributed
output is checked byte for byte against the in-process run.
"""
import argparse
import filecmp
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

CASES = {
    "global-50": dict(sparsity=0.5, scope="global"),
    "nm-2:4": dict(pattern="2:4"),
    "wanda-row": dict(importance="wanda", pattern="per-row", sparsity=0.5),
}


def make_sharded(folder, size_mb):
    """The benchmark checkpoint as a folder: one shard per layer, an index, a calibration."""
    from bench_checkpoint import make_checkpoint

    from aprender.io import SafetensorsFile, write_safetensors

    one = os.path.join(folder, "one.safetensors")
    make_checkpoint(one, size_mb)
    sf = SafetensorsFile(one)
    ckpt = os.path.join(folder, "ckpt")
    os.mkdir(ckpt)
    groups = {}
    for t in sf:
        key = t.name.split(".")[2] if t.name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(t)
    weight_map = {}
    for i, (key, ts) in enumerate(sorted(groups.items())):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        import numpy as np

        from aprender import Bits16
        write_safetensors(os.path.join(ckpt, name), {
            t.name: Bits16(np.array(sf.words(t.name)).reshape(t.shape), "bfloat16") for t in ts})
        weight_map.update({t.name: name for t in ts})
    with open(os.path.join(ckpt, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    os.unlink(one)
    return ckpt, os.path.join(folder, "calib.safetensors")


def same(a, b):
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all(
        filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=256)
    ap.add_argument("--dir", help="folder for the temporary checkpoint (default: system temp)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs per case")
    args = ap.parse_args()
    import distributed

    from aprender.checkpoints import prune_checkpoint as local
    from aprender.distributed import prune_checkpoint as dist

    tmp = tempfile.mkdtemp(dir=args.dir)
    try:
        src, calib = make_sharded(tmp, args.size_mb)
        size = sum(os.path.getsize(os.path.join(src, n)) for n in os.listdir(src))
        print(f"checkpoint: {size / 2**20:.0f} MiB in {len(os.listdir(src)) - 1} shards, "
              f"{os.cpu_count()} CPUs")
        print(f"{'case':<10} {'run':<9} {'wall s':>7} {'plan B':>9} {'rows B':>7} "
              f"{'plan B/tensor':>13} {'tensor B':>10}")
        for case in args.cases.split(","):
            opts = dict(CASES[case])
            if opts.get("importance") == "wanda":
                opts["calibration"] = calib
            ref = os.path.join(tmp, "ref")
            for label, nt in (("local-1t", 1), ("local", None)):  # one thread; all cores
                best = float("inf")
                for _ in range(args.repeat):
                    shutil.rmtree(ref, ignore_errors=True)
                    os.sync()
                    t0 = time.perf_counter()
                    rep = local(src, ref, n_threads=nt, **opts)
                    best = min(best, time.perf_counter() - t0)
                print(f"{case:<10} {label:<9} {best:7.2f}")
            n_sel = rep["totals"]["selected_tensors"]
            t_bytes = max(r["total"] for r in rep["tensors"]) * 2
            for workers in (1, 2):
                with distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                              processes=True, dashboard_address=":0",
                                              memory_limit=0, silence_logs=50) as cl, \
                        distributed.Client(cl) as client:
                    client.wait_for_workers(workers)
                    out = os.path.join(tmp, f"d{workers}")
                    wall = float("inf")
                    for _ in range(args.repeat):
                        shutil.rmtree(out, ignore_errors=True)
                        os.sync()
                        t0 = time.perf_counter()
                        r = dist(src, out, client=client, **opts)
                        wall = min(wall, time.perf_counter() - t0)
                rb = r["distributed"]["received_bytes"]
                assert same(ref, out), f"{case}: {workers} workers differ from the local run"
                print(f"{case:<10} {f'dask-{workers}':<9} {wall:7.2f} {rb['plan']:9d} "
                      f"{rb['shards']:7d} {rb['plan'] // n_sel:13d} {t_bytes:10d}")
                shutil.rmtree(out)
            shutil.rmtree(ref)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
