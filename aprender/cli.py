"""The ``aprender`` command line: ``aprender prune`` and ``aprender inspect`` for safetensors.

Checkpoints are streamed: one tensor is memory-mapped at a time, so peak memory stays a small
multiple of the largest tensor whatever the checkpoint size.  Output goes to a temporary name
next to the target and is renamed into place only when complete.

Exit codes: 0 success, 1 failure (unreadable input, shape that does not fit the pattern, nothing
selected, I/O error), 2 usage error (bad option values), 130/143 interrupted (SIGINT/SIGTERM).
"""
import argparse
import json
import math
import os
import re
import signal
import sys
import time

import numpy as np

from . import __version__
from ._validation import resolve_threads
from .errors import InvalidPatternError, PruningError, UnsafePathError
from .io.checkpoint import Checkpoint, CheckpointWriter
from .io.export import bitmask_tensors, masked_chunks
from .io.files import OutputTarget, atomic_write_text, display
from .io.safetensors import FLOAT_DTYPES
from .pruning.mask import SparsityPattern, layer_magnitude_mask
from .pruning.streaming import GlobalPlan

INDEX_NAME = "model.safetensors.index.json"

CHUNK = 1 << 22  # elements per inspect chunk
MAX_THREADS = 4096
WARN_SPARSITY = 0.95

DEFAULT_INCLUDE = r"(^|\.)weight$  (2-D floating tensors only)"
DEFAULT_EXCLUDE = (r"embed|(^|\.)(wte|wpe|shared)\.|norm|(^|\.)ln_|lm_head|"
                   r"(^|\.)(output|head|classifier)\.weight$")

SELECTION_HELP = (
    "By default every 2-D floating tensor whose name ends in '.weight' is pruned, except "
    "embeddings, normalisation layers and the output head (lm_head): names matching "
    f"{DEFAULT_EXCLUDE!r} are left alone.  --include replaces the default rule (any floating "
    "tensor whose name matches one of the patterns, searched anywhere in the name); --exclude "
    "always removes matches.  Untouched tensors are copied byte for byte.")


class UsageError(Exception):
    """Bad option values: exit code 2."""


class Failure(Exception):
    """The command could not complete: exit code 1."""


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


def _threads(text):
    t = text.strip()
    v = int(t) if t.isascii() and t.isdigit() and len(t) <= 6 else 0
    if not 1 <= v <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {MAX_THREADS}, got "
                                         f"{text!r}")
    return v


def build_parser():
    p = _Parser(prog="aprender", description="Magnitude pruning for safetensors checkpoints.")
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
    pr.add_argument("--pattern", default="unstructured", metavar="unstructured|per-row|N:M",
                    help="'unstructured' (default), 'per-row' (same fraction in every row, "
                         "Wanda grouping; 'row' is accepted as an alias) or N:M such as 2:4 "
                         "(keep N of every M along the last axis)")
    pr.add_argument("--scope", choices=("layer", "global"), default="layer",
                    help="layer: each tensor pruned to the fraction on its own (default); "
                         "global: one exact count over every selected tensor (unstructured only)")
    pr.add_argument("--importance", choices=("l1", "l2"), default="l1",
                    help="magnitude score; |w| and w^2 rank alike, so both give the same mask "
                         "(recorded in the metadata)")
    pr.add_argument("--include", action="append", default=[], metavar="REGEX",
                    help="select tensors whose name matches (repeatable; replaces the default "
                         "rule)")
    pr.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                    help="leave tensors whose name matches alone (repeatable)")
    pr.add_argument("--format", choices=("dense", "sparse-24-bitmask"), default="dense",
                    help="dense: zeros written in place (default); sparse-24-bitmask (with "
                         "--pattern 2:4): compressed-tensors tensors P.shape/P.compressed/"
                         "P.bitmask (P: the name without '.weight'), plus the sparsity config "
                         "in config.json for a folder")
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

    ins = sub.add_parser("inspect", help="per-tensor shape, dtype, zero fraction, N:M pattern",
                         description="List every tensor of a .safetensors file or checkpoint "
                                     "folder with its shape, dtype, fraction of zeros and the "
                                     "sparsest N:M pattern (M in 4, 8, 16) it satisfies.")
    ins.add_argument("path", metavar="PATH")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _compile(patterns, flag):
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise UsageError(f"invalid {flag} regular expression {p!r}: {exc}") from None
    return out


def select(ckpt, include, exclude):
    selected, skipped = [], []
    for shard, t in ckpt.items():
        if include:
            hit = any(r.search(t.name) for r in include)
            if hit and not t.is_float:
                skipped.append({"name": t.name, "reason": f"matched --include but dtype {t.dtype}"})
                hit = False
            if hit and len(t.shape) == 0:
                skipped.append({"name": t.name, "reason": "scalar"})
                hit = False
        else:
            hit = (t.is_float and len(t.shape) == 2 and re.search(r"(^|\.)weight$", t.name)
                   and not re.search(DEFAULT_EXCLUDE, t.name))
        if hit and any(r.search(t.name) for r in exclude):
            hit = False
        if hit:
            selected.append((shard, t))
    return selected, skipped


class Pruner:
    def __init__(self, args):
        self.args = args
        try:
            text = args.pattern.strip()
            # 'row' was this option's first name for per-row (Wanda) grouping
            self.pattern = SparsityPattern.parse("per-row" if text.lower() == "row" else text)
            if not (self.pattern.is_unstructured or self.pattern.is_per_row
                    or self.pattern.is_nm):
                raise InvalidPatternError(f"--pattern {args.pattern!r}: use 'unstructured', "
                                          "'per-row' or N:M such as '2:4'")
            self.sparsity = self.pattern.resolve_sparsity(args.sparsity)
        except PruningError as exc:
            raise UsageError(str(exc)) from None
        p = self.pattern
        if p.is_nm and p.axis not in (-1, 1):
            raise UsageError(f"--pattern {args.pattern!r}: N:M runs along the last axis here")
        if args.scope == "global" and not p.is_unstructured:
            raise UsageError("--scope global needs --pattern unstructured")
        if args.format == "sparse-24-bitmask" and not (p.is_nm and (p.n, p.m) == (2, 4)):
            raise UsageError("--format sparse-24-bitmask needs --pattern 2:4")
        if args.max_tensor_sparsity is not None and args.scope != "global":
            raise UsageError("--max-tensor-sparsity needs --scope global")
        self.include = _compile(args.include, "--include")
        self.exclude = _compile(args.exclude, "--exclude")
        self.nt = resolve_threads(args.threads)
        self.quiet = args.quiet
        self.tty = sys.stdout.isatty() and not args.quiet

    @property
    def pattern_text(self):
        return str(self.pattern.n) + ":" + str(self.pattern.m) if self.pattern.is_nm else \
            ("per-row" if self.pattern.is_per_row else "unstructured")

    def _check_paths(self, ckpt):
        """Every path that will be written is checked against every input before any work."""
        a = self.args
        self.target = None
        if not a.dry_run:
            self.target = OutputTarget(a.output, ckpt.inputs, force=a.force,
                                       kind="dir" if ckpt.is_dir else "file")
        if a.report:
            avoid = [] if a.dry_run else [("OUTPUT", a.output)]
            OutputTarget(a.report, ckpt.inputs, force=a.force, what="--report", avoid=avoid)

    def run(self):
        a = self.args
        t0 = time.perf_counter()
        if a.output == "" or (a.report is not None and a.report == ""):
            raise UsageError("OUTPUT is empty" if a.output == "" else "--report is empty")
        ckpt = Checkpoint(a.input)
        self._check_paths(ckpt)
        selected, skipped = select(ckpt, self.include, self.exclude)
        if not selected:
            raise Failure(f"{display(a.input)}: no tensor matches the selection"
                          + (f" (--include {a.include})" if a.include else "")
                          + (f" (--exclude {a.exclude})" if a.exclude else ""))
        if self.pattern.is_nm:
            for shard, t in selected:
                if t.shape[-1] % self.pattern.m:
                    raise Failure(f"{display(ckpt.shard_path(shard))}: tensor {t.name!r} of "
                                  f"shape {list(t.shape)}: last dimension is not divisible by "
                                  f"{self.pattern.m} (pattern {self.pattern_text})")
        self.ckpt = ckpt
        self.sel_index = {(s, t.name): i for i, (s, t) in enumerate(selected)}
        if a.scope == "global":
            self.plan = GlobalPlan([(ckpt.files[s], t, f"{display(ckpt.shard_path(s))}: tensor "
                                    f"{t.name!r}") for s, t in selected],
                                   self.sparsity, a.max_tensor_sparsity, self.nt)
        self.rows = []
        total_bytes = sum(t.nbytes for _, t in ckpt.items())
        self.bar = _progress(total_bytes) if self.tty else None
        try:
            if a.dry_run:
                for shard, t in ckpt.items():
                    if (shard, t.name) in self.sel_index:
                        self._row(shard, t, self._keep(shard, t))
                    self._tick(t.nbytes)
            else:
                self._write_all()
        finally:
            if self.bar is not None:
                self.bar.close()
        report = self._report(skipped, total_bytes, time.perf_counter() - t0)
        if a.report:
            atomic_write_text(a.report, json.dumps(report, indent=2) + "\n")
        if not self.quiet:
            print_table(report)
        for w in report["warnings"]:
            print(f"aprender: warning: {display(w)}", file=sys.stderr)
        return 0

    # -- per tensor --------------------------------------------------------------------------
    def _keep(self, shard, t):
        i = self.sel_index[(shard, t.name)]
        if self.args.scope == "global":
            return self.plan.keep(i)
        arr = self.ckpt.files[shard].array(t.name)
        try:
            mask = layer_magnitude_mask(arr, self.pattern, self.sparsity, n_threads=self.nt)
        except PruningError as exc:
            raise Failure(f"{display(self.ckpt.shard_path(shard))}: tensor {t.name!r}: "
                          f"{exc}") from None
        return mask.keep.reshape(-1).view(np.uint8)

    def _row(self, shard, t, keep):
        kept = int(np.count_nonzero(keep))
        self.rows.append({"name": t.name, "file": shard, "shape": list(t.shape),
                          "dtype": t.dtype, "total": t.size, "kept": kept,
                          "sparsity": (t.size - kept) / t.size if t.size else 0.0})

    # -- output ------------------------------------------------------------------------------
    def _write_all(self):
        ckpt = self.ckpt
        writer = CheckpointWriter(ckpt, self.target.path, pause_hook=_test_pause_hook())
        try:
            for s in ckpt.shards:
                self._write_shard(writer, s)
            if ckpt.is_dir:
                writer.copy_others()
                writer.write_index(rebuild=self.args.format != "dense")
                if self.args.format != "dense":
                    cfg = writer.read_output_json("config.json")
                    if isinstance(cfg, dict):
                        writer.write_json("config.json", self._update_config(cfg))
            writer.commit()
        except BaseException as exc:
            writer.abort()
            if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
                # never name the temporary output: say what the user asked for
                why = exc.strerror or str(exc)
                raise Failure(f"{display(self.target.path)}: cannot write ({why})") from None
            raise

    def _write_shard(self, writer, shard):
        sf = self.ckpt.files[shard]
        bitmask = self.args.format != "dense"
        planned = None if bitmask else {t.name: (t.dtype, t.shape, t.nbytes) for t in sf}
        out = writer.shard(shard, self._metadata(sf.metadata), planned)
        for t in sf:
            if (shard, t.name) not in self.sel_index:
                out.copy(sf, t)
            else:
                keep = self._keep(shard, t)
                self._row(shard, t, keep)
                if bitmask:
                    for name, code, shape, arr in bitmask_tensors(sf.words(t.name), keep, t,
                                                                  self.nt):
                        out.add(name, code, shape, [arr], arr.nbytes)
                else:
                    out.add(t.name, t.dtype, t.shape, masked_chunks(sf, t, keep, self.nt),
                            t.nbytes)
                del keep
            self._tick(t.nbytes)
        out.close()

    def _update_config(self, cfg):
        pruned = sum(r["total"] - r["kept"] for r in self.rows)
        total = sum(r["total"] for r in self.rows)
        sparsity_config = {
            "format": "sparse-24-bitmask",
            "global_sparsity": pruned / total if total else 0.0,
            "registry_requires_subclass": False,
            "sparsity_structure": "2:4",
            "targets": sorted({r["name"][:-len(".weight")] if r["name"].endswith(".weight")
                               else r["name"] for r in self.rows}),
            "ignore": [],
        }
        qc = cfg.get("quantization_config")
        if not isinstance(qc, dict):
            qc = {"quant_method": "compressed-tensors", "format": "dense"}
        qc["sparsity_config"] = sparsity_config
        cfg["quantization_config"] = qc
        return cfg

    def _metadata(self, metadata):
        meta = dict(metadata)
        meta["aprender"] = json.dumps({
            "version": __version__,
            "pattern": self.pattern_text,
            "sparsity": self.sparsity,
            "scope": self.args.scope,
            "importance": self.args.importance,
            "format": self.args.format,
            "max_tensor_sparsity": self.args.max_tensor_sparsity,
            "selection": {"include": self.args.include or [DEFAULT_INCLUDE],
                          "exclude": (self.args.exclude if self.args.include
                                      else [DEFAULT_EXCLUDE] + self.args.exclude)},
        }, separators=(",", ":"))
        return meta

    def _tick(self, nbytes):
        if self.bar is not None:
            self.bar.update(nbytes)

    # -- report ------------------------------------------------------------------------------
    def _report(self, skipped, total_bytes, wall):
        rows = self.rows
        total = sum(r["total"] for r in rows)
        kept = sum(r["kept"] for r in rows)
        warnings = [f"tensor {r['name']!r} pruned to {r['sparsity']:.2%} (above "
                    f"{WARN_SPARSITY:.0%})" for r in rows if r["sparsity"] > WARN_SPARSITY]
        all_elems = sum(t.size for _, t in self.ckpt.items())
        return {
            "aprender": __version__,
            "input": os.path.abspath(self.args.input),
            "output": None if self.args.dry_run else os.path.abspath(self.args.output),
            "dry_run": self.args.dry_run,
            "pattern": self.pattern_text,
            "sparsity": self.sparsity,
            "scope": self.args.scope,
            "importance": self.args.importance,
            "format": self.args.format,
            "max_tensor_sparsity": self.args.max_tensor_sparsity,
            "threads": self.nt,
            "selection": {
                "rule": ("--include" if self.args.include else
                         "default: 2-D floating '*.weight' tensors; embeddings, norms and the "
                         "output head (lm_head) left alone"),
                "include": self.args.include or [DEFAULT_INCLUDE],
                "exclude": (self.args.exclude if self.args.include
                            else [DEFAULT_EXCLUDE] + self.args.exclude),
                "skipped": skipped,
            },
            "tensors": rows,
            "untouched": [t.name for s, t in self.ckpt.items()
                          if (s, t.name) not in self.sel_index],
            "totals": {
                "selected_tensors": len(rows),
                "selected_elements": total,
                "kept": kept,
                "pruned": total - kept,
                "sparsity": (total - kept) / total if total else 0.0,
                "all_elements": all_elems,
                "overall_sparsity_of_checkpoint": (total - kept) / all_elems if all_elems else 0.0,
                "bytes": total_bytes,
                "wall_s": wall,
                "throughput_mb_s": total_bytes / 1e6 / wall if wall > 0 else None,
            },
            "warnings": warnings,
        }


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

def _zero_words(words, code):
    if code in ("BF16", "F16"):
        return (words & np.uint16(0x7FFF)) == 0
    if code in ("F32", "F64"):
        return words.view(np.float32 if code == "F32" else np.float64) == 0
    return words == 0


def inspect_tensor(sf, t):
    words = sf.words(t.name)
    n = t.size
    zeros = 0
    last = t.shape[-1] if t.shape else 0
    ms = [m for m in (4, 8, 16) if last and last % m == 0]
    worst = {m: 0 for m in ms}
    step = max(16, (CHUNK // 16) * 16)
    for a in range(0, n, step):
        z = _zero_words(words[a:a + step], t.dtype)
        zeros += int(np.count_nonzero(z))
        for m in ms:
            nz = m - z.reshape(-1, m).sum(axis=1, dtype=np.int64)
            if nz.size:
                worst[m] = max(worst[m], int(nz.max()))
    nm = None
    if n and t.dtype in FLOAT_DTYPES:
        best = None
        for m in ms:
            if worst[m] < m:
                ratio = worst[m] / m
                if best is None or ratio < best[0]:
                    best = (ratio, f"{worst[m]}:{m}")
        nm = best[1] if best else None
    return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "total": n,
            "zeros": zeros, "zero_fraction": zeros / n if n else 0.0, "nm": nm}


def run_inspect(args):
    ckpt = Checkpoint(args.path)
    rows = []
    for shard, t in ckpt.items():
        r = inspect_tensor(ckpt.files[shard], t)
        r["file"] = shard
        rows.append(r)
    if args.json:
        meta = {s: ckpt.files[s].metadata for s in ckpt.shards}
        print(json.dumps({"tensors": rows, "metadata": meta}, indent=2))
        return 0
    print(_fmt_table(["tensor", "shape", "dtype", "zeros", "N:M"],
                     [[r["name"], "x".join(map(str, r["shape"])) or "scalar", r["dtype"],
                       f"{r['zero_fraction']:.2%}", r["nm"] or "-"] for r in rows], right=(3,)))
    total = sum(r["total"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    print(f"{len(rows)} tensors, {total} elements, {zeros / total if total else 0:.2%} zeros")
    for s in ckpt.shards:
        if "aprender" in ckpt.files[s].metadata:
            print(f"{display(s)}: pruned by aprender: "
                  f"{display(ckpt.files[s].metadata['aprender'])}")
    return 0


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------

def _on_sigterm(signum, frame):
    raise Interrupted()


def _progress(total_bytes):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                desc="pruning", leave=False)


PAUSE_ENV = "APRENDER_TEST_PAUSE_AFTER_SHARD"


def _test_pause_hook():
    """Test-only: with APRENDER_TEST_PAUSE_AFTER_SHARD=1 the writer stops after its first shard,
    says so on stderr and waits for a signal, so signal tests need no timing."""
    if os.environ.get(PAUSE_ENV) != "1":
        return None

    def pause():
        print("aprender-test: paused", file=sys.stderr, flush=True)
        while True:
            time.sleep(0.05)
    return pause


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
            return Pruner(args).run()
        finally:
            sys.stdout.flush()
    except (UsageError, UnsafePathError) as exc:
        _error(exc)
        return 2
    except (Failure, PruningError) as exc:
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
