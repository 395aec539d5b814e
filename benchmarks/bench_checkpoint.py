"""Checkpoint pruning benchmark: `aprender prune` on a generated bfloat16 checkpoint.

    python benchmarks/bench_checkpoint.py               # ~1 GB checkpoint
    python benchmarks/bench_checkpoint.py --size-mb 128 # quick run

Each case runs in its own subprocess (peak RSS: VmHWM of that child, falling back to
resource.getrusage; the file-backed pages a memory map touches count towards RSS):
  copy        shutil.copyfile of the checkpoint (the floor)
  cp          the cp command on the same file (a second floor, outside Python)
  layer-50    aprender prune --sparsity 0.5 (layer scope, unstructured)
  global-50   aprender prune --sparsity 0.5 --scope global
  nm-2:4      aprender prune --pattern 2:4 (layer scope)
  row-50      aprender prune --pattern per-row --sparsity 0.5 (magnitude)
  wanda-row   aprender prune --importance wanda --pattern per-row --sparsity 0.5 (scores
              computed chunk by chunk from the weights and a calibration file)
  wanda-2:4   aprender prune --importance wanda --pattern 2:4
  torch       torch.nn.utils.prune.global_unstructured (L1) on the same tensors, loaded with
              safetensors.torch, then saved with safetensors (if torch is installed)
Targets: aprender within 2x of the copy (issue 14; Wanda is judged against magnitude instead); peak memory under 2x the largest tensor + 200 MB;
Wanda within 1.3x of the same pattern by magnitude, with the same peak memory.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD = r"""
import json, os, resource, shutil, sys, time
sys.path.insert(0, {root!r})
case, src, dst, threads = sys.argv[1:5]
if case not in ("copy", "cp", "torch"):
    from aprender.cli import main  # imports are not timed (nor are torch's)
elif case == "torch":
    import torch, torch.nn.utils.prune as tp
    from safetensors.torch import load_file, save_file
t0 = time.perf_counter()
if case == "copy":
    shutil.copyfile(src, dst)
elif case == "cp":
    import subprocess
    subprocess.run(["cp", src, dst], check=True)
elif case == "torch":
    torch.set_num_threads(int(threads))
    sd = load_file(src)
    mods = []
    for name, t in sd.items():
        if name.endswith(".weight") and t.dim() == 2:
            m = torch.nn.Module()
            m.weight = torch.nn.Parameter(t, requires_grad=False)
            mods.append((name, m))
    tp.global_unstructured([(m, "weight") for _, m in mods], pruning_method=tp.L1Unstructured,
                           amount=0.5)
    for name, m in mods:
        tp.remove(m, "weight")
        sd[name] = m.weight.detach()
    save_file(sd, dst)
else:
    calib = os.path.join(os.path.dirname(src), "calib.safetensors")
    extra = {{"global-50": ["--sparsity", "0.5", "--scope", "global"],
              "layer-50": ["--sparsity", "0.5"],
              "nm-2:4": ["--pattern", "2:4"],
              "row-50": ["--pattern", "per-row", "--sparsity", "0.5"],
              "wanda-row": ["--pattern", "per-row", "--sparsity", "0.5", "--importance", "wanda",
                            "--calibration", calib],
              "wanda-2:4": ["--pattern", "2:4", "--importance", "wanda", "--calibration",
                            calib]}}[case]
    rc = main(["prune", src, "-o", dst, "--quiet", "--threads", threads] + extra)
    assert rc == 0, rc
wall = time.perf_counter() - t0
# VmHWM (peak RSS of this process image); ru_maxrss would carry the forking parent's peak
hwm = None
try:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
except OSError:
    pass
if hwm is None:
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"wall": wall, "maxrss_mb": hwm}}))
"""


def make_checkpoint(path, size_mb, seed=0):
    """bfloat16 tensors: a few big MLP-like matrices plus small ones; returns largest bytes."""
    from aprender import Bits16
    from aprender.io import write_safetensors

    rng = np.random.default_rng(seed)
    cols = 2048
    n_big = 8
    rows = max(8, int(size_mb * 2 ** 20 * 0.9 / n_big / cols / 2) // 8 * 8)
    tensors = {}
    for i in range(n_big):
        x = rng.standard_normal((rows, cols), dtype=np.float32)
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = Bits16(
            (x.view(np.uint32) >> 16).astype(np.uint16), "bfloat16")
        tensors[f"model.layers.{i}.input_layernorm.weight"] = Bits16(
            np.full(cols, 0x3F80, np.uint16), "bfloat16")
    x = rng.standard_normal((max(8, rows // 8), cols), dtype=np.float32)
    tensors["model.embed_tokens.weight"] = Bits16((x.view(np.uint32) >> 16).astype(np.uint16),
                                                  "bfloat16")
    write_safetensors(path, tensors, metadata={"format": "pt"})
    from aprender.pruning import ActivationStats, CalibrationContext

    ctx = CalibrationContext(num_samples=128)
    for i in range(n_big):
        ss = rng.gamma(0.5, 2.0, cols) * 1000.0  # uneven feature norms, as real activations
        ctx.add_layer_stats(f"model.layers.{i}.mlp.up_proj",
                            ActivationStats.from_arrays(ss, 128 * 512))
    ctx.save(os.path.join(os.path.dirname(path), "calib.safetensors"))
    return rows * cols * 2


def run_case(case, src, dst, threads):
    if os.path.exists(dst):
        os.unlink(dst)
    # start every case with no dirty pages left by the previous one: otherwise whichever case
    # runs later pays for the earlier ones' writeback (seen: a plain copy slowing from 0.24 s
    # to 2.3 s after a few GB of writes)
    os.sync()
    code = CHILD.format(root=ROOT)
    r = subprocess.run([sys.executable, "-c", code, case, src, dst, str(threads)],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{case} failed:\n{r.stderr}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    os.unlink(dst)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=1024, help="checkpoint size (default 1024)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=2, help="best of N runs per case")
    ap.add_argument("--no-torch", action="store_true",
                    help="skip the torch case (it holds ~20x the checkpoint in memory)")
    ap.add_argument("--dir", help="folder for the temporary checkpoint (default: system temp)")
    ap.add_argument("--cases", help="comma-separated cases to run (copy is always run)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        src = os.path.join(d, "model.safetensors")
        dst = os.path.join(d, "out.safetensors")
        t0 = time.perf_counter()
        largest = make_checkpoint(src, args.size_mb)
        size = os.path.getsize(src)
        print(f"checkpoint: {size / 2**20:.0f} MiB bfloat16, largest tensor "
              f"{largest / 2**20:.0f} MiB (generated in {time.perf_counter() - t0:.1f} s), "
              f"{args.threads} threads")
        cases = ["copy", "cp", "layer-50", "global-50", "nm-2:4", "row-50", "wanda-row",
                 "wanda-2:4"]
        if args.cases:
            cases = ["copy"] + [c for c in args.cases.split(",") if c != "copy"]
        try:
            import torch  # noqa: F401

            if not args.no_torch:
                cases.append("torch")
        except ImportError:
            pass
        run_case("copy", src, dst, args.threads)  # warm the page cache
        runs = {case: [] for case in cases}
        for _ in range(args.repeat):  # round robin, so drift in the disk hits every case alike
            for case in cases:
                runs[case].append(run_case(case, src, dst, args.threads))
        res = {case: {"wall": min(r["wall"] for r in rs), "maxrss_mb": max(r["maxrss_mb"] for r in rs)}
               for case, rs in runs.items()}
        budget = 2 * largest / 2**20 + 200
        copy = res["copy"]["wall"]
        print(f"{'case':<10} {'time s':>8} {'x copy':>7} {'MB/s':>7} {'peak RSS MiB':>13}  target")
        for case, r in res.items():
            ratio = r["wall"] / copy
            ok = ""
            if case not in ("copy", "cp", "torch"):
                limit = 2 if not case.startswith("wanda") else float("inf")
                ok = ("ok" if ratio <= limit else "SLOW") + " / " + \
                    ("ok" if r["maxrss_mb"] <= budget else "MEM")
            print(f"{case:<10} {r['wall']:8.3f} {ratio:7.2f} {size / 1e6 / r['wall']:7.0f} "
                  f"{r['maxrss_mb']:13.0f}  {ok}")
        if "torch" in res:
            for case in ("global-50", "nm-2:4"):
                print(f"torch / aprender {case}: {res['torch']['wall'] / res[case]['wall']:.2f}x")
        for w, mag in (("wanda-row", "row-50"), ("wanda-2:4", "nm-2:4")):
            if w not in res or mag not in res:
                continue
            t = res[w]["wall"] / res[mag]["wall"]
            mem = res[w]["maxrss_mb"] / res[mag]["maxrss_mb"]
            print(f"{w} / {mag}: {t:.2f}x time (target <= 1.3), {mem:.2f}x peak memory")
        print(f"memory budget: 2 x largest tensor + 200 MiB = {budget:.0f} MiB")


if __name__ == "__main__":
    main()
