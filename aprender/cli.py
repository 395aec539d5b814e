"""The ``aprender`` command line (prune, calibrate, inspect, densify, shrink): argparse, tables,
exit codes.  The work is done by :mod:`aprender.checkpoints`, :mod:`aprender.densify`,
:mod:`aprender.shrink`,
:mod:`aprender.inspect`, :mod:`aprender.hf` and :mod:`aprender.io`.

Exit codes: 0 success, 1 failure (unreadable input, shape that does not fit the pattern, nothing
selected, I/O error, a failed ``inspect --check``), 2 usage error (bad option values), 130/143 interrupted (SIGINT/SIGTERM).
"""
import argparse
import json
import math
import os
import re
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
    "Which tensors: by default every 2-D floating tensor whose name ends in '.weight', except "
    "embeddings (embed, wte, wpe, shared), normalisation layers (norm, ln_) and output heads "
    "(lm_head, output, head, classifier).  --include REGEX selects instead the 2-D floating "
    "tensors whose name matches (searched anywhere in the name; 1-D tensors such as norms and "
    "biases only with --include-1d); --exclude REGEX always removes matches.  Untouched tensors "
    "are copied byte for byte.")

PRUNE_EXAMPLES = """examples:
  aprender prune model.safetensors -o pruned.safetensors --sparsity 0.5
  aprender prune llama/ -o llama-24/ --pattern 2:4
  aprender prune llama/ -o llama-w/ --importance wanda --calibration calib.safetensors --sparsity 0.5
  aprender prune llama/ -o llama-s/ --importance sparsegpt --calibration calib.safetensors --sparsity 0.5
  aprender prune llama/ -o llama-g/ --sparsity 0.6 --scope global --max-tensor-sparsity 0.9
  aprender prune llama/ -o llama-bm/ --sparsity 0.5 --format bitmask --dry-run --report r.json

Exit codes: 0 ok, 1 failure, 2 usage error, 130/143 interrupted."""

CALIBRATE_EXAMPLES = """examples:
  aprender calibrate llama/ --text calib.txt -o calib.safetensors
  aprender calibrate llama/ --text calib.txt -o calib.safetensors --hessian --samples 256

Exit codes: 0 ok, 1 failure, 2 usage error, 130/143 interrupted."""

INSPECT_EXAMPLES = """examples:
  aprender inspect model.safetensors
  aprender inspect llama-24/ --check
  aprender inspect llama-24/ --json > report.json

Exit codes: 0 ok, 1 failure (or a failed --check), 2 usage error."""

DENSIFY_EXAMPLES = """examples:
  aprender densify llama-bm/ -o llama-dense/
  aprender densify model-24.safetensors -o model.safetensors --force

Exit codes: 0 ok, 1 failure, 2 usage error, 130/143 interrupted."""

SHRINK_EXAMPLES = """examples:
  aprender shrink llama/ -o llama-s/ --calibration calib.safetensors --drop-layers 4
  aprender shrink llama/ -o llama-s/ --calibration calib.safetensors --mlp 0.25 --heads 0.25
  aprender shrink qwen3-moe/ -o qwen3-moe-s/ --calibration calib.safetensors --experts 0.5
  aprender shrink llama/ -o llama-s/ --mlp 0.5 --round-to 256 --no-compensate --report r.json

Exit codes: 0 ok, 1 failure, 2 usage error, 130/143 interrupted."""


class UsageError(Exception):
    """Bad option values: exit code 2."""


class Interrupted(BaseException):
    """SIGTERM received."""


# ----------------------------------------------------------------------------------------------
# argument parsing
# ----------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, with a suggestion for a mistyped option
        self.exit(2, f"{self.prog}: error: {message}{_suggestion(self, message)}\n")


def _option_strings(parser):
    """Every option string of ``parser`` and of its subcommands' parsers."""
    out = set()
    for action in parser._actions:
        out.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _option_strings(sub)
    return out


def _suggestion(parser, message):
    """"; did you mean --sparsity?" for an unrecognized --sparsty (argparse before Python 3.12
    never suggests)."""
    import difflib

    if "unrecognized arguments:" not in message and "invalid choice:" not in message:
        return ""
    if "invalid choice:" in message:  # a mistyped subcommand
        word = message.split("invalid choice:", 1)[1].split("(")[0].strip().strip("'")
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        choices = list(subs[0].choices) if subs else []
    else:
        words = [w for w in message.split("unrecognized arguments:", 1)[1].split()
                 if w.startswith("--")]
        if not words:
            return ""
        word, choices = words[0].split("=")[0], sorted(_option_strings(parser))
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


class _Help(argparse.HelpFormatter):
    """Wraps descriptions as usual; keeps the line breaks of an epilog of examples."""

    def _fill_text(self, text, width, indent):
        if text.startswith(("examples:", "Run 'aprender COMMAND")):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


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


def _dask_address(text):
    """A scheduler address checked before anything starts (no import of Dask here)."""
    from .distributed import parse_address

    try:
        return parse_address(text)
    except PruningError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser():
    p = _Parser(prog="aprender", formatter_class=_Help,
                description="Pruning (magnitude, Wanda, SparseGPT) for safetensors checkpoints.",
                epilog="Run 'aprender COMMAND --help' for a command's options and examples.")
    p.add_argument("--version", action="version", version=f"aprender {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    pr = sub.add_parser(
        "prune", help="prune a .safetensors file or a checkpoint folder",
        description="Prune a .safetensors file or a checkpoint folder (sharded with "
                    f"{INDEX_NAME} or not) into OUTPUT, which mirrors INPUT: a folder gets the "
                    "same shards and index, and its other files (config.json, tokenizer files) "
                    "are copied.  " + SELECTION_HELP,
        epilog=PRUNE_EXAMPLES, formatter_class=_Help)
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
                         "sparsities over an interval of width 2*lambda around --sparsity, by "
                         "their share of outlier Wanda scores (Yin et al. 2024), the same total")
    pr.add_argument("--owl-m", type=float, default=5.0, metavar="M",
                    help="OWL: a score is an outlier above M times its layer's mean (default 5)")
    pr.add_argument("--owl-lambda", type=float, default=0.08, metavar="L",
                    help="OWL: the layer sparsities span an interval of width 2L (default 0.08)")
    pr.add_argument("--include", action="append", default=[], metavar="REGEX",
                    help="select the 2-D floating tensors whose name matches (repeatable; "
                         "replaces the '*.weight' name rule; embeddings, norms and heads stay "
                         "excluded unless --no-default-exclude)")
    pr.add_argument("--no-default-exclude", dest="default_exclude", action="store_false",
                    help="drop the default exclusions (embeddings, norms, output heads) and the "
                         "2-D requirement: every floating tensor --include matches (every "
                         "floating tensor without --include) is pruned")
    pr.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                    help="leave tensors whose name matches alone (repeatable)")
    pr.add_argument("--format", choices=FORMATS, default="dense",
                    help="dense: zeros written in place (default; every loader reads it); "
                         "bitmask: kept values + packed mask + shape per pruned tensor (any "
                         "pattern, lossless, about 0.56x the bytes at 50%% in bfloat16; read by "
                         "'aprender densify' and aprender.io.load_dense only: a folder keeps "
                         "config.json as config.aprender-bitmask.json, so other loaders refuse "
                         "it); sparse-24-bitmask "
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
    dk.add_argument("--dask", metavar="ADDRESS", type=_dask_address,
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
        epilog=CALIBRATE_EXAMPLES, formatter_class=_Help)
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
                         epilog=INSPECT_EXAMPLES, formatter_class=_Help)
    ins.add_argument("path", metavar="PATH", help=".safetensors file or checkpoint folder (any "
                                                  "format aprender writes or reads)")
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
                        epilog=DENSIFY_EXAMPLES, formatter_class=_Help)
    de.add_argument("input", metavar="INPUT", help=".safetensors file or checkpoint folder")
    de.add_argument("-o", "--output", metavar="OUTPUT", required=True,
                    help="output file or folder (written under a temporary name, then renamed)")
    de.add_argument("--threads", type=_threads, metavar="N", help="threads for the kernels")
    de.add_argument("--force", action="store_true",
                    help="replace an existing OUTPUT; never one that holds the input")
    de.add_argument("--quiet", action="store_true", help="print nothing on success")
    sh = sub.add_parser(
        "shrink", help="remove layers, MLP channels, attention heads or MoE experts",
        description="Write a smaller standard Hugging Face checkpoint: whole transformer "
                    "layers, MLP intermediate channels, key/value head groups (with their query "
                    "heads) and routed MoE experts removed, config.json edited to match; "
                    "streamed tensor by tensor with the safety rules of 'prune'.  Families: "
                    "Llama, Qwen2, Qwen3, Mistral, Gemma 3, Phi-3, Qwen3-MoE, Mixtral, BERT "
                    "(layers and MLP).  See docs/shrink.md.",
        epilog=SHRINK_EXAMPLES, formatter_class=_Help)
    sh.add_argument("input", metavar="MODEL_DIR", help="model folder (config.json, shards)")
    sh.add_argument("-o", "--output", metavar="OUT_DIR", required=True,
                    help="output folder (written under a temporary name, then renamed)")
    sh.add_argument("--calibration", metavar="FILE",
                    help="statistics from 'aprender calibrate': block influence (needed by "
                         "--drop-layers), input norms (activation-aware channel and head "
                         "scores; magnitude only without), REAP expert statistics (needed by "
                         "--experts), Hessians (compensation)")
    sh.add_argument("--drop-layers", type=int, default=0, metavar="K",
                    help="remove the K layers of least block influence (ShortGPT)")
    sh.add_argument("--mlp", type=_fraction, default=0.0, metavar="F",
                    help="remove the fraction F of MLP intermediate channels in every layer "
                         "(dense MLPs, and each expert's MLP in MoE layers)")
    sh.add_argument("--heads", type=_fraction, default=0.0, metavar="F",
                    help="remove the fraction F of key/value head groups in every layer, each "
                         "with its query heads")
    sh.add_argument("--experts", type=_fraction, default=0.0, metavar="F",
                    help="remove the fraction F of routed experts in every MoE layer (REAP)")
    sh.add_argument("--round-to", type=_count, default=None, metavar="N",
                    help="round kept MLP widths up to a multiple of N (default 64: GPU GEMM "
                         "and quantisation-block alignment; see docs/shrink.md)")
    sh.add_argument("--no-compensate", action="store_true",
                    help="only slice: no least-squares refit of the down/output projections")
    sh.add_argument("--report", metavar="PATH", help="write the JSON report to PATH")
    sh.add_argument("--force", action="store_true",
                    help="replace an existing OUTPUT (or --report); never one that holds the "
                         "input")
    sh.add_argument("--threads", type=_threads, metavar="N", help="threads for the kernels")
    sh.add_argument("--quiet", action="store_true", help="no progress bar and no table")
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
    """The summary table of a prune run (warnings go to stderr, once, from the caller)."""
    alloc = report.get("allocation") or {}
    ratios = alloc.get("outlier_ratio") if alloc.get("method") == "owl" else None
    rows = []
    for r in report["tensors"]:
        flag = " !" if r["sparsity"] > WARN_SPARSITY else ""
        row = [r["name"], "x".join(map(str, r["shape"])), r["dtype"],
               f"{r['kept']}/{r['total']}", f"{r['sparsity']:.2%}{flag}"]
        if ratios is not None:
            row.append(f"{ratios.get(r['name'], float('nan')):.4f}")
        rows.append(row)
    headers = ["tensor", "shape", "dtype", "kept/total", "sparsity"]
    print(_fmt_table(headers + (["OWL outlier ratio"] if ratios is not None else []), rows,
                     right=(3, 4, 5)))
    t = report["totals"]
    tp = t["throughput_mb_s"]
    how = f"{report.get('pattern', '?')}, {report.get('importance', '?')}" \
        + (f", {report['scope']} scope" if report.get("scope") == "global" else "") \
        + (f", OWL m={alloc['m']:g} lambda={alloc['lambda']:g}" if ratios is not None else "")
    print(f"total ({how}): {t['kept']}/{t['selected_elements']} kept in "
          f"{t['selected_tensors']} pruned tensors, sparsity {t['sparsity']:.2%} "
          f"({t['overall_sparsity_of_checkpoint']:.2%} of all {t['all_elements']} elements); "
          f"{len(report['untouched'])} tensors untouched")
    print(f"time: {t['wall_s']:.2f} s, {t['bytes'] / 1e6:.1f} MB"
          + (f" at {tp:.0f} MB/s" if tp else "")
          + ("  (dry run: nothing written)" if report["dry_run"]
             else f" -> {display(report['output'])}"))
    print(f"selection: {report['selection']['rule']}")


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
    # MB (10**6 bytes), the unit of every other figure aprender prints
    return tqdm(unit="B", unit_scale=True, unit_divisor=1000, desc="pruning", leave=False)


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
    try:
        if dask:  # the options are checked before a cluster is started (by run)
            from .distributed import DistributedPruner

            pruner = DistributedPruner(args, None, progress if bar is not None else None,
                                       address=args.dask, workers=args.dask_workers)
        else:
            pruner = CheckpointPruner(args, progress=progress if bar is not None else None)
    except PruningError as exc:  # option values
        raise UsageError(str(exc)) from None
    try:
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
    ctx.save(args.output, force=args.force)
    if not args.quiet:
        print(f"{len(ctx.layer_names)} layers, {len(ctx.block_stats)} blocks, "
              f"{len(ctx.expert_stats)} experts, {ctx.num_samples} samples -> "
              f"{display(args.output)}")
        if left_out:
            print(f"left out (no weight of that name and shape in the checkpoint): "
                  f"{display(', '.join(left_out))}")
    return 0


def run_shrink(args):
    from .shrink import DEFAULT_ROUND_TO, check_options, shrink_checkpoint

    if args.output == "" or args.report == "":
        raise UsageError("OUTPUT is empty" if args.output == "" else "--report is empty")
    round_to = DEFAULT_ROUND_TO if args.round_to is None else args.round_to
    try:
        check_options(args.drop_layers, args.mlp, args.heads, args.experts, round_to)
    except PruningError as exc:
        raise UsageError(re.sub(r"\b(drop_layers|mlp|heads|experts|round_to)\b",
                                lambda m: "--" + m.group(1).replace("_", "-"), str(exc))) \
            from None
    bar = _progress() if sys.stdout.isatty() and not args.quiet else None

    def progress(nbytes, total):
        if bar.total is None:
            bar.total = total
        bar.update(nbytes)
    try:
        rep = shrink_checkpoint(args.input, args.output, calibration=args.calibration,
                                drop_layers=args.drop_layers, mlp=args.mlp, heads=args.heads,
                                experts=args.experts, round_to=round_to,
                                compensate=not args.no_compensate, report=args.report,
                                force=args.force, n_threads=args.threads,
                                progress=progress if bar is not None else False)
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        print_shrink(rep)
    for w in rep.get("warnings", []):
        print(f"aprender: warning: {display(w)}", file=sys.stderr)
    return 0


def print_shrink(rep):
    rows = [[k, "(absent)" if a is None else json.dumps(a), json.dumps(b)]
            for k, (a, b) in rep["config_changes"].items()]
    print(_fmt_table(["config.json", "before", "after"], rows))
    print(f"parameters: {rep['parameters_before']} -> {rep['parameters_after']} "
          f"({1 - rep['parameters_after'] / max(rep['parameters_before'], 1):.2%} removed); "
          f"bytes: {rep['bytes_before'] / 1e6:.1f} MB -> {rep['bytes_after'] / 1e6:.1f} MB")
    for axis, how in rep["criteria"].items():
        print(f"{axis}: {how}")
    print("compensated: " + (f"{len(rep['compensated_tensors'])} projections" if
                             rep["compensated"] else
                             f"no ({rep.get('not_compensated_because', 'nothing sliced')})"))
    print(f"{rep['family']} -> {display(rep['output'])} in {rep['wall_s']:.2f} s")


def _error(message):
    print(f"aprender: error: {display(str(message))}", file=sys.stderr)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare 'aprender': what it can do, as a usage error
        parser.print_help(sys.stderr)
        return 2
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
            if args.command == "shrink":
                return run_shrink(args)
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
