"""The ``aprender`` command line (prune, calibrate, inspect, densify): argparse, tables, exit
codes.  The work is done by :mod:`aprender.checkpoints`, :mod:`aprender.densify`,
:mod:`aprender.inspect`, :mod:`aprender.hf` and :mod:`aprender.io`.

Exit codes: 0 success, 1 failure (unreadable input, shape that does not fit the pattern, nothing
selected, I/O error, a failed ``inspect --check``), 2 usage error (bad option values), 130/143 interrupted (SIGINT/SIGTERM).
"""
import argparse
import json
import math
import os
import signal
import sys

from . import __version__
from ._threads import MAX_THREADS
from .checkpoints import DEFAULT_EXCLUDE, WARN_SPARSITY, CheckpointPruner
from .densify import densify_checkpoint
from .errors import PruningError, UnsafePathError
from .inspect import inspect_checkpoint, render
from .io.checkpoint import INDEX_NAME, Checkpoint
from .io.files import OutputTarget, display
from .io.formats import FORMATS

LEGACY_24_WARNING = ("sparse-24-bitmask is read only by compressed-tensors <= 0.14 and vLLM "
                     "before 0.19.1 (transformers 5 loads it with random weights); use the "
                     "default dense format or 'aprender densify' for today's loaders")

SELECTION_HELP = (
    "By default every 2-D floating tensor whose name ends in '.weight' is pruned, except "
    "embeddings, normalisation layers and the output head (lm_head): names matching "
    f"{DEFAULT_EXCLUDE!r} are left alone.  --include replaces the default rule (any floating "
    "tensor whose name matches one of the patterns, searched anywhere in the name); --exclude "
    "always removes matches.  Untouched tensors are copied byte for byte.")


class UsageError(Exception):
    """Bad option values: exit code 2."""


class Interrupted(BaseException):
    """SIGTERM received."""


# ----------------------------------------------------------------------------------------------
# argument parsing
# ----------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _fraction(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0 or math.isnan(v):
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return v


def _count(text, most=999_999_999):
    """A whole number from 1 to ``most`` (ASCII digits only: no 5,000-digit integers)."""
    t = text.strip()
    v = int(t) if t.isascii() and t.isdigit() and len(t) <= 9 else 0
    if not 1 <= v <= most:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {most}, got "
                                         f"{text!r}")
    return v


def _threads(text):
    return _count(text, MAX_THREADS)


def _size(text):
    """A byte count such as 512M or 4G (binary units)."""
    from .models.executor import parse_size

    try:
        return parse_size(text if len(text) <= 40 else "?")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(text):
    return _count(text, 1024)


def build_parser():
    p = _Parser(prog="aprender", description="Pruning (magnitude, Wanda, SparseGPT) for safetensors checkpoints.")
    p.add_argument("--version", action="version", version=f"aprender {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pr = sub.add_parser(
        "prune", help="prune a .safetensors file or a checkpoint folder",
        description="Prune a .safetensors file or a checkpoint folder (sharded with "
                    f"{INDEX_NAME} or not) into OUTPUT, which mirrors INPUT: a folder gets the "
                    "same shards and index, and its other files (config.json, tokenizer files) "
                    "are copied.  " + SELECTION_HELP,
        epilog="Exit codes: 0 ok, 1 failure, 2 usage error, 130/143 interrupted.")
    pr.add_argument("input", metavar="INPUT", help=".safetensors file or checkpoint folder")
    pr.add_argument("-o", "--output", metavar="OUTPUT", required=True,
                    help="output file or folder (written under a temporary name, then renamed)")
    pr.add_argument("--sparsity", type=_fraction, metavar="FRACTION",
                    help="fraction of the selected weights to prune (unstructured and per-row "
                         "patterns; implied by N:M)")
    pr.add_argument("--pattern", default=None, metavar="unstructured|per-row|N:M",
                    help="'unstructured' (the default for magnitude), 'per-row' (same fraction "
                         "in every row; the default for Wanda; 'row' is accepted as an alias) "
                         "or N:M such as 2:4 (keep N of every M along the last axis)")
    pr.add_argument("--scope", choices=("layer", "global"), default="layer",
                    help="layer: each tensor pruned to the fraction on its own (default); "
                         "global: one exact count over every selected tensor (unstructured only)")
    pr.add_argument("--importance", choices=("l1", "l2", "wanda", "sparsegpt"), default="l1",
                    help="l1/l2: magnitude (|w| and w^2 rank alike, so both give the same "
                         "mask); wanda: |w| * ||X_j||_2 from --calibration, computed chunk by "
                         "chunk while streaming (Sun et al. 2023); sparsegpt: prune and update "
                         "the remaining weights from the layer's Hessian in --calibration "
                         "('aprender calibrate --hessian'), one tensor at a time (Frantar & "
                         "Alistarh 2023)")
    pr.add_argument("--calibration", metavar="FILE",
                    help="calibration statistics from 'aprender calibrate' (for --importance "
                         "wanda and sparsegpt); a tensor 'a.b.weight' uses the statistics of "
                         "layer 'a.b'")
    pr.add_argument("--allocation", choices=("uniform", "owl"), default="uniform",
                    help="uniform: every tensor pruned to --sparsity (default); owl: layer "
                         "sparsities spread over [s - lambda, s + lambda] by their share of "
                         "outlier Wanda scores (Yin et al. 2024), same mean")
    pr.add_argument("--owl-m", type=float, default=5.0, metavar="M",
                    help="OWL: a score is an outlier above M times its layer's mean (default 5)")
    pr.add_argument("--owl-lambda", type=float, default=0.08, metavar="L",
                    help="OWL: sparsities spread over [s - L, s + L] (default 0.08)")
    pr.add_argument("--include", action="append", default=[], metavar="REGEX",
                    help="select tensors whose name matches (repeatable; replaces the default "
                         "rule)")
    pr.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                    help="leave tensors whose name matches alone (repeatable)")
    pr.add_argument("--format", choices=FORMATS, default="dense",
                    help="dense: zeros written in place (default; every loader reads it); "
                         "bitmask: kept values + packed mask + shape per pruned tensor (any "
                         "pattern, lossless, about 0.56x the bytes at 50%% in bfloat16; read by "
                         "'aprender densify' and aprender.io.load_dense); sparse-24-bitmask "
                         "(with --pattern 2:4): compressed-tensors tensors P.shape/P.compressed/"
                         "P.bitmask plus the sparsity config in config.json (X.config.json "
                         "beside a single file); read only by compressed-tensors <= 0.14 and "
                         "vLLM before 0.19.1")
    pr.add_argument("--max-tensor-sparsity", type=_fraction, metavar="F",
                    help="global scope: cap on any one tensor's pruned fraction (the overall "
                         "count stays exact)")
    pr.add_argument("--dry-run", action="store_true",
                    help="compute the masks and the report, write nothing")
    pr.add_argument("--report", metavar="PATH",
                    help="write a JSON report to PATH (never an input or inside OUTPUT; an "
                         "existing file is replaced only with --force)")
    pr.add_argument("--threads", type=_threads, metavar="N",
                    help="threads for the kernels (default: what OpenMP allows)")
    pr.add_argument("--force", action="store_true",
                    help="replace an existing OUTPUT (or --report) file or folder; never one "
                         "that holds the input, nor a device, FIFO or socket")
    pr.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    dk = pr.add_mutually_exclusive_group()
    dk.add_argument("--dask", metavar="ADDRESS",
                    help="run on the Dask cluster whose scheduler is at ADDRESS (every worker "
                         "must see INPUT and OUTPUT's folder at the same paths); the output is "
                         "byte for byte that of the local run (needs aprender[dask])")
    dk.add_argument("--dask-workers", type=_workers, metavar="N",
                    help="run on a Dask LocalCluster of N worker processes on this machine "
                         "(needs aprender[dask])")

    cal = sub.add_parser(
        "calibrate", help="collect activation statistics for calibration-aware pruning",
        description="Run calibration text through a local Hugging Face model folder (offline, "
                    "on the CPU) and save the per-layer input statistics of its Linear layers, "
                    "named as the checkpoint's weights, for 'aprender prune --importance wanda "
                    "--calibration FILE'.  Needs pip install \"aprender[calibrate]\".",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage error, 130/143 interrupted.")
    cal.add_argument("model", metavar="MODEL_DIR", help="local model folder (config, tokenizer, "
                                                        "safetensors weights)")
    cal.add_argument("--text", metavar="FILE", required=True,
                     help="UTF-8 text file: one calibration sample per non-empty line")
    cal.add_argument("-o", "--output", metavar="FILE", required=True,
                     help="calibration file to write (safetensors; see the README)")
    cal.add_argument("--samples", type=_count, default=128, metavar="N",
                     help="use the first N samples (default 128)")
    cal.add_argument("--max-length", type=_count, default=None, metavar="L",
                     help="truncate each sample to L tokens (default: 512 or the model's "
                          "max_position_embeddings if smaller; more than that is an error)")
    cal.add_argument("--batch-size", type=_count, default=8, metavar="B",
                     help="samples per forward pass (default 8)")
    cal.add_argument("--hessian", action="store_true",
                     help="also accumulate X^T X (for --importance sparsegpt): one per distinct "
                          "input, shared by the layers that read it (query/key/value), stored "
                          "in float32 (in_features^2 values each)")
    cal.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="compute dtype of the weights and hidden states (default float32)")
    cal.add_argument("--memory-budget", type=_size, default=None, metavar="SIZE",
                     help="hidden states (block inputs and outputs of every sample) kept in "
                          "memory up to SIZE bytes (e.g. 512M, 8G; default 4G); over it they "
                          "go to a scratch file next to --output, removed at once")
    cal.add_argument("--threads", type=_threads, metavar="N", help="threads for the kernels")
    cal.add_argument("--force", action="store_true", help="replace an existing output file")
    cal.add_argument("--quiet", action="store_true", help="no progress bar and no summary")

    ins = sub.add_parser("inspect", help="per-tensor shape, dtype, sparsity, N:M pattern",
                         description="List the tensors of a .safetensors file or checkpoint "
                                     "folder as a model loads them (compressed tensors read "
                                     "as one), with shape, dtype, sparsity and the N:M pattern "
                                     "every group along the last axis satisfies (N <= M/2, M "
                                     "in 4, 8, 16); the sparsity of the pruned weights apart "
                                     "from the whole checkpoint; the config's sparsity section; "
                                     "one provenance line.",
                         epilog="Exit codes: 0 ok, 1 failure (or a failed --check), 2 usage "
                                "error.")
    ins.add_argument("path", metavar="PATH")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.add_argument("--check", action="store_true",
                     help="verify the declared pattern (aprender metadata or config), count -0.0 "
                          "in the pruned tensors and flag a sparsity_config current loaders "
                          "reject; exit 1 when a check fails")

    de = sub.add_parser("densify", help="write a compressed checkpoint back as a dense one",
                        description="Turn aprender's bitmask and sparse-24-bitmask outputs, and "
                                    "compressed-tensors sparse-24-bitmask checkpoints from other "
                                    "tools, into a dense checkpoint (the sparsity_config removed "
                                    "from config.json), streamed tensor by tensor with the "
                                    "safety rules of 'prune'.",
                        epilog="Exit codes: 0 ok, 1 failure, 2 usage error, 130/143 "
                               "interrupted.")
    de.add_argument("input", metavar="INPUT", help=".safetensors file or checkpoint folder")
    de.add_argument("-o", "--output", metavar="OUTPUT", required=True,
                    help="output file or folder (written under a temporary name, then renamed)")
    de.add_argument("--threads", type=_threads, metavar="N", help="threads for the kernels")
    de.add_argument("--force", action="store_true",
                    help="replace an existing OUTPUT; never one that holds the input")
    de.add_argument("--quiet", action="store_true", help="print nothing on success")
    return p


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------

def _fmt_table(headers, rows, right=()):
    """A plain-text table; every cell passes through display() (untrusted names)."""
    headers = [display(str(h)) for h in headers]
    rows = [[display(str(c)) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    lines = []
    for row in [headers] + rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if row is headers:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(report):
    rows = []
    for r in report["tensors"]:
        flag = " !" if r["sparsity"] > WARN_SPARSITY else ""
        rows.append([r["name"], "x".join(map(str, r["shape"])), r["dtype"],
                     f"{r['kept']}/{r['total']}", f"{r['sparsity']:.2%}{flag}"])
    print(_fmt_table(["tensor", "shape", "dtype", "kept/total", "sparsity"], rows,
                     right=(3, 4)))
    t = report["totals"]
    tp = t["throughput_mb_s"]
    print(f"total: {t['kept']}/{t['selected_elements']} kept in {t['selected_tensors']} pruned "
          f"tensors, sparsity {t['sparsity']:.2%} ({t['overall_sparsity_of_checkpoint']:.2%} of "
          f"all {t['all_elements']} elements); {len(report['untouched'])} tensors untouched")
    print(f"time: {t['wall_s']:.2f} s, {t['bytes'] / 1e6:.1f} MB"
          + (f" at {tp:.0f} MB/s" if tp else "")
          + ("  (dry run: nothing written)" if report["dry_run"]
             else f" -> {display(report['output'])}"))
    print(f"selection: {report['selection']['rule']}")
    for w in report["warnings"]:
        print(f"! warning: {display(w)}")


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------

def run_inspect(args):
    report = inspect_checkpoint(args.path, check=args.check)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report, _fmt_table))
    return 0 if report.get("ok", True) else 1


def run_densify(args):
    if args.output == "":
        raise UsageError("OUTPUT is empty")
    rep = densify_checkpoint(args.input, args.output, force=args.force, n_threads=args.threads)
    if not args.quiet:
        kinds = ", ".join(f"{v} {k}" for k, v in rep["decoded"].items()) or "none compressed"
        print(f"{rep['tensors']} tensors ({kinds}); {rep['bytes_read'] / 1e6:.1f} MB -> "
              f"{rep['bytes_written'] / 1e6:.1f} MB in {rep['wall_s']:.2f} s -> "
              f"{display(rep['output'])}")
    return 0


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------

def _on_sigterm(signum, frame):
    raise Interrupted()


def _progress():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="pruning", leave=False)


def run_prune(args):
    if args.output == "" or args.report == "":
        raise UsageError("OUTPUT is empty" if args.output == "" else "--report is empty")
    tty = sys.stdout.isatty() and not args.quiet
    bar = _progress() if tty else None

    def progress(nbytes, total):
        if bar.total is None:
            bar.total = total
        bar.update(nbytes)
    dask = getattr(args, "dask", None) is not None or getattr(args, "dask_workers", None)
    if dask:
        from .distributed import DistributedPruner, dask_client
    try:
        if dask:  # the options are checked before a cluster is started
            pruner = DistributedPruner(args, None, progress if bar is not None else None)
        else:
            pruner = CheckpointPruner(args, progress=progress if bar is not None else None)
    except PruningError as exc:  # option values
        raise UsageError(str(exc)) from None
    try:
        if dask:
            with dask_client(args.dask, args.dask_workers) as client:
                pruner.client = client
                report = pruner.run()
        else:
            report = pruner.run()
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        print_table(report)
    for w in report["warnings"]:
        print(f"aprender: warning: {display(w)}", file=sys.stderr)
    if args.format == "sparse-24-bitmask" and not args.dry_run:
        print(f"aprender: warning: {LEGACY_24_WARNING}", file=sys.stderr)
    return 0


def run_calibrate(args):
    from .hf import calibrate_folder, read_text_samples

    if args.output == "":
        raise UsageError("--output is empty")
    ckpt = Checkpoint(args.model)
    OutputTarget(args.output, ckpt.inputs + [args.text], force=args.force, what="--output")
    samples = read_text_samples(args.text, args.samples)
    options = {}
    if args.memory_budget is not None:
        options["memory_budget"] = args.memory_budget
    ctx, left_out = calibrate_folder(args.model, samples, max_length=args.max_length,
                                     batch_size=args.batch_size, hessian=args.hessian,
                                     dtype=args.dtype, scratch_near=args.output,
                                     progress=sys.stderr.isatty() and not args.quiet,
                                     n_threads=args.threads, **options)
    ctx.save(args.output)
    if not args.quiet:
        print(f"{len(ctx.layer_names)} layers, {len(ctx.block_stats)} blocks, "
              f"{len(ctx.expert_stats)} experts, {ctx.num_samples} samples -> "
              f"{display(args.output)}")
        if left_out:
            print(f"left out (no weight of that name and shape in the checkpoint): "
                  f"{display(', '.join(left_out))}")
    return 0


def _error(message):
    print(f"aprender: error: {display(str(message))}", file=sys.stderr)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    old = None
    try:
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        pass
    try:
        try:
            if args.command == "inspect":
                return run_inspect(args)
            if args.command == "calibrate":
                return run_calibrate(args)
            if args.command == "densify":
                return run_densify(args)
            return run_prune(args)
        finally:
            sys.stdout.flush()
    except (UsageError, UnsafePathError) as exc:
        _error(exc)
        return 2
    except PruningError as exc:
        _error(exc)
        return 1
    except ImportError as exc:  # an optional extra is missing: the message names it
        _error(exc)
        return 1
    except BrokenPipeError:
        # the reader went away (``aprender inspect f | head``): no traceback, no more output
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except OSError as exc:
        _error(f"{exc.filename + ': ' if isinstance(exc.filename, str) else ''}"
               f"{exc.strerror or exc}")
        return 1
    except KeyboardInterrupt:
        print("aprender: interrupted; partial output removed", file=sys.stderr)
        return 130
    except Interrupted:
        print("aprender: terminated; partial output removed", file=sys.stderr)
        return 143
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
