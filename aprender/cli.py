"""The ``aprender`` command line: ``aprender prune`` and ``aprender inspect`` for safetensors.

Checkpoints are streamed: one tensor is memory-mapped at a time, so peak memory stays a small
multiple of the largest tensor whatever the checkpoint size.  Output goes to a temporary name
next to the target and is renamed into place only when complete.

Exit codes: 0 success, 1 failure (unreadable input, shape that does not fit the pattern, nothing
selected, I/O error), 2 usage error (bad option values), 130/143 interrupted (SIGINT/SIGTERM).
"""
import argparse
import errno
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time

import numpy as np

from . import __version__
from ._validation import (BF16, F16, Bits16, as_floats, decode16, prune_count, raise_nonfinite,
                          resolve_threads)
from .io.safetensors import (FLOAT_DTYPES, CheckpointError, SafetensorsFile, dtype_code,
                             encode_header, write_all)
from .errors import PruningError

INDEX_NAME = "model.safetensors.index.json"
CHUNK = 1 << 22  # elements per write chunk (zeroing a copy of a memory-mapped tensor)
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


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
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
                    help="fraction of the selected weights to prune (unstructured and row "
                         "patterns; implied by N:M)")
    pr.add_argument("--pattern", default="unstructured", metavar="unstructured|row|N:M",
                    help="'unstructured' (default), 'row' (same fraction in every row, Wanda "
                         "grouping) or N:M such as 2:4 (keep N of every M along the last axis)")
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
    pr.add_argument("--report", metavar="PATH", help="write a JSON report to PATH")
    pr.add_argument("--threads", type=_positive_int, metavar="N",
                    help="threads for the kernels (default: what OpenMP allows)")
    pr.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    pr.add_argument("--quiet", action="store_true", help="no progress bar and no table")

    ins = sub.add_parser("inspect", help="per-tensor shape, dtype, zero fraction, N:M pattern",
                         description="List every tensor of a .safetensors file or checkpoint "
                                     "folder with its shape, dtype, fraction of zeros and the "
                                     "sparsest N:M pattern (M in 4, 8, 16) it satisfies.")
    ins.add_argument("path", metavar="PATH")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def parse_pattern(text):
    """('unstructured'|'row', None, None) or ('nm', n, m); UsageError otherwise."""
    t = text.strip().lower()
    if t in ("unstructured", "row"):
        return t, None, None
    mt = re.fullmatch(r"(\d+):(\d+)", t)
    if not mt:
        raise UsageError(f"invalid --pattern {text!r}: use 'unstructured', 'row' or N:M such as "
                         "'2:4'")
    n, m = int(mt.group(1)), int(mt.group(2))
    if not 1 <= n <= m or m > 1024:
        raise UsageError(f"invalid --pattern {text!r}: N:M needs 1 <= N <= M <= 1024")
    return "nm", n, m


def _compile(patterns, flag):
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise UsageError(f"invalid {flag} regular expression {p!r}: {exc}") from None
    return out


# ----------------------------------------------------------------------------------------------
# checkpoint layout
# ----------------------------------------------------------------------------------------------

class Checkpoint:
    """A single file or a folder: shards (relative name -> path) and other files to copy."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.is_dir = os.path.isdir(self.path)
        self.index = None
        self.others = []
        if not os.path.exists(self.path):
            raise Failure(f"{self.path}: no such file or directory")
        if self.is_dir:
            names = sorted(os.listdir(self.path))
            idx = os.path.join(self.path, INDEX_NAME)
            if os.path.isfile(idx):
                try:
                    with open(idx, encoding="utf-8") as f:
                        self.index = json.load(f)
                    weight_map = self.index["weight_map"]
                    shards = list(dict.fromkeys(weight_map.values()))
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise Failure(f"{idx}: unreadable index ({exc})") from None
                for s in shards:
                    if not os.path.isfile(os.path.join(self.path, s)):
                        raise Failure(f"{os.path.join(self.path, s)}: shard listed in "
                                      f"{INDEX_NAME} is missing")
            else:
                shards = [n for n in names if n.endswith(".safetensors")
                          and os.path.isfile(os.path.join(self.path, n))]
            if not shards:
                raise Failure(f"{self.path}: no .safetensors files in this folder")
            skip = set(shards) | {INDEX_NAME}
            self.others = [n for n in names if n not in skip]
            self.shards = shards
        else:
            self.shards = [os.path.basename(self.path)]
        self.files = {}
        for s in self.shards:
            self.files[s] = SafetensorsFile(self.shard_path(s))  # CheckpointError -> exit 1
        if self.index is not None:
            for name, s in self.index["weight_map"].items():
                if name not in self.files[s]:
                    raise Failure(f"{self.shard_path(s)}: tensor {name!r} listed in {INDEX_NAME} "
                                  "is missing")

    def shard_path(self, shard):
        return os.path.join(self.path, shard) if self.is_dir else self.path

    def items(self):
        """(shard, TensorInfo) in shard order, then data order."""
        for s in self.shards:
            for t in self.files[s]:
                yield s, t


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


# ----------------------------------------------------------------------------------------------
# mask planning
# ----------------------------------------------------------------------------------------------

def _kernel_source(sf, t, common):
    """A zero-arg callable returning the flat kernel array of tensor t: the mapped words for
    16-bit floats, the mapped float32/float64 array, or (mixed dtypes) a float32/float64 copy."""
    def load(sequential=False):
        w = sf.words(t.name, populate=sequential)
        if common is None:
            if t.dtype in ("F16", "BF16"):
                return w
            return w.view(np.float32 if t.dtype == "F32" else np.float64)
        return _to_float(w, t.dtype, common)
    return load


def _to_float(w, code, dt):
    if code in ("BF16", "F16"):
        return decode16(w, BF16 if code == "BF16" else F16).astype(dt, copy=False)
    return w.view(np.float32 if code == "F32" else np.float64).astype(dt, copy=False)


def _inf16(codes):
    if codes == {"BF16"}:
        return 0x7F80
    if codes == {"F16"}:
        return 0x7C00
    return 0


class GlobalPlan:
    """Exact global selection: per tensor, a threshold key and how many keys equal to it to
    prune, decided before anything is written."""

    def __init__(self, ckpt, selected, sparsity, cap, nt, progress):
        from ._kernels import select as _select

        self.select = _select
        codes = {t.dtype for _, t in selected}
        self.common = None if len(codes) == 1 else ("float64" if "F64" in codes else "float32")
        self.inf16 = _inf16(codes) if self.common is None else 0
        self.sources = [_kernel_source(ckpt.files[s], t, self.common) for s, t in selected]
        self.sizes = [t.size for _, t in selected]
        self.names = [t.name for _, t in selected]
        self.nt = nt
        total = sum(self.sizes)
        self.k = prune_count(sparsity, total)
        self.plan = [None] * len(selected)  # (thresh, r) or ("fill", value)
        self.ckpt, self.selected = ckpt, selected
        self.running = None
        self.scratch = None
        if cap is None:
            self._solve(list(range(len(selected))), self.k, progress, count=False)
        else:
            self._capped(cap, progress)

    def _solve(self, idx, k, progress, count=True):
        """Plan tensors idx to prune exactly k in all; returns per-tensor pruned counts when
        count (a counting pass) else None."""
        total = sum(self.sizes[i] for i in idx)
        if k <= 0 or k >= total:
            for i in idx:  # nothing to select, but NaN/inf still refuse, as everywhere
                x = self.sources[i](sequential=True)
                if x.size and self.select.range_pass(x, 0, 0, 1, self.inf16, 0, self.nt)[2]:
                    self._raise_nonfinite([i])
                self.plan[i] = ("fill", 1 if k <= 0 else 0)
            return {i: (0 if k <= 0 else self.sizes[i]) for i in idx}
        srcs = [self.sources[i] for i in idx]
        if progress:
            progress(f"selecting over {len(idx)} tensors")
        thresh, below, bad, _ = self.select.find_threshold(srcs, [self.sizes[i] for i in idx], k,
                                                           1, self.inf16, self.nt)
        if bad:
            self._raise_nonfinite(idx)
        r = k - below
        if len(idx) == 1 and not count:
            self.plan[idx[0]] = (thresh, r)
            return None
        if not count:
            # tensors are written in this order: the remaining count is tracked while writing
            for i in idx:
                self.plan[i] = (thresh, None)
            self.running = r
            return None
        counts = {}
        for i in idx:
            self.plan[i] = (thresh, r)
            x = self.sources[i](sequential=True)
            out = np.empty(x.shape[0], np.uint8)
            eq = self.select.write_pass(x, thresh, r, 1, out, self.nt)
            counts[i] = x.shape[0] - int(np.count_nonzero(out))
            r -= eq
            del x, out
        return counts

    def _capped(self, cap, progress):
        caps = [int(math.floor(cap * n + 1e-9)) for n in self.sizes]
        if self.k > sum(caps):
            raise Failure(f"cannot prune {self.k} weights when --max-tensor-sparsity={cap} "
                          f"allows at most {sum(caps)}")
        fixed = {}
        while True:
            free = [i for i in range(len(self.sizes)) if i not in fixed]
            counts = self._solve(free, self.k - sum(fixed.values()), progress)
            over = [i for i in free if counts[i] > caps[i]]
            if not over:
                break
            for i in over:
                fixed[i] = caps[i]
        for i, c in fixed.items():
            self._solve([i], c, None, count=False)

    def _raise_nonfinite(self, idx):
        for i in idx:
            shard, t = self.selected[i]
            arr = self.ckpt.files[shard].array(t.name)
            f = as_floats(arr, t.name)
            scratch = np.empty(f.size, np.uint8)
            if f.size and self.select.fill_pass(f.kernel.reshape(-1), 1, 1, f.inf16, scratch,
                                                self.nt):
                raise_nonfinite(f, f"{shard}: tensor {t.name!r}")
        raise Failure("non-finite weights among the selected tensors")

    def keep(self, i):
        """Flat uint8 keep-mask of selected tensor i (call once per tensor, in order)."""
        p = self.plan[i]
        n = self.sizes[i]
        if self.scratch is None:  # one keep buffer for every tensor (reused, never reallocated)
            self.scratch = np.empty(max(self.sizes), np.uint8)
        out = self.scratch[:n]
        if p[0] == "fill":
            out[:] = p[1]
            return out
        thresh, r = p
        x = self.sources[i](sequential=True)
        if r is None:
            self.running -= self.select.write_pass(x, thresh, self.running, 1, out, self.nt)
        else:
            self.select.write_pass(x, thresh, r, 1, out, self.nt)
        return out


def layer_keep(arr, shard, t, kind, sparsity, n, m, nt):
    """Per-tensor mask (flat uint8) for layer scope."""
    from .pruning.mask import layer_magnitude_mask

    try:
        mask = layer_magnitude_mask(arr, kind, sparsity, n, m, n_threads=nt)
    except PruningError as exc:
        raise Failure(f"{shard}: tensor {t.name!r}: {exc}") from None
    return mask.keep.reshape(-1).view(np.uint8)


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------

def _umask():
    old = os.umask(0o022)
    os.umask(old)
    return old


def _temp_name(target, kind):
    """A fresh temporary file or folder next to target, with the usual (umask) permissions."""
    d = os.path.dirname(os.path.abspath(target))
    base = os.path.basename(os.path.abspath(target))
    if kind == "dir":
        path = tempfile.mkdtemp(prefix=f".{base}.", suffix=".aprender-tmp", dir=d)
        os.chmod(path, 0o777 & ~_umask())
        return path
    fd, path = tempfile.mkstemp(prefix=f".{base}.", suffix=".aprender-tmp", dir=d)
    os.close(fd)
    os.chmod(path, 0o666 & ~_umask())
    return path


def _remove(path):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
    except OSError:
        pass


_BUFFERS = {}


def _masked_words(sf, t, keep, nt, write):
    """Stream the tensor's words * keep in chunks through ``write``: chunks are read (not
    mapped) into one reused buffer; the input is untouched."""
    from ._kernels import apply as _apply

    dt = np.dtype(f"u{t.itemsize}")
    n = t.size
    buf = _BUFFERS.get(dt)
    if buf is None:
        buf = _BUFFERS[dt] = np.empty(CHUNK, dt)
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        chunk = buf[:b - a]
        sf.read_into(t.name, a, chunk)
        _apply.apply_mask(chunk, keep[a:b], nt)
        write(chunk)


def _typed(words, code, shape):
    if code == "BF16":
        return Bits16(words.reshape(shape), "bfloat16")
    dt = {"F16": np.float16, "F32": np.float32, "F64": np.float64}[code]
    return words.view(dt).reshape(shape)


def _bitmask_tensors(words, keep, t, nt):
    """compressed-tensors sparse-24-bitmask tensors {P.shape, P.compressed, P.bitmask} of the
    pruned tensor (P: the name without ".weight"), straight from the mapped weights and the mask."""
    try:
        from . import sparse24
    except ImportError as exc:  # pragma: no cover
        raise Failure(f"--format sparse-24-bitmask needs aprender.sparse24 ({exc})") from None
    try:
        st = sparse24.compress(_typed(words, t.dtype, t.shape), layout="bitmask",
                               mask=keep.view(np.bool_).reshape(t.shape), n_threads=nt)
        out = st.to_tensors(t.name)
    except PruningError as exc:
        raise Failure(f"tensor {t.name!r}: cannot write the sparse-24-bitmask format ({exc})") \
            from None
    res = {}
    for name, a in out.items():
        if t.dtype == "BF16" and name.endswith(".compressed") and a.dtype == np.uint16:
            a = Bits16(a, "bfloat16")
        res[name] = a
    return res


class Pruner:
    def __init__(self, args):
        self.args = args
        self.kind, self.n, self.m = parse_pattern(args.pattern)
        if self.kind == "nm":
            implied = 1.0 - self.n / self.m
            if args.sparsity is not None and abs(args.sparsity - implied) > 1e-9:
                raise UsageError(f"--sparsity {args.sparsity} contradicts --pattern "
                                 f"{args.pattern} (which prunes {implied:g})")
            self.sparsity = implied
        else:
            if args.sparsity is None:
                raise UsageError(f"--pattern {self.kind} needs --sparsity FRACTION")
            self.sparsity = args.sparsity
        if args.scope == "global" and self.kind != "unstructured":
            raise UsageError("--scope global needs --pattern unstructured")
        if args.format == "sparse-24-bitmask" and (self.kind, self.n, self.m) != ("nm", 2, 4):
            raise UsageError("--format sparse-24-bitmask needs --pattern 2:4")
        if args.max_tensor_sparsity is not None and args.scope != "global":
            raise UsageError("--max-tensor-sparsity needs --scope global")
        self.include = _compile(args.include, "--include")
        self.exclude = _compile(args.exclude, "--exclude")
        self.nt = resolve_threads(args.threads)
        self.quiet = args.quiet
        self.tty = sys.stdout.isatty() and not args.quiet

    def _check_paths(self):
        a = self.args
        src = os.path.realpath(a.input)
        dst = os.path.realpath(a.output)
        if src == dst or (os.path.exists(a.output) and os.path.samefile(a.input, a.output)):
            raise UsageError("OUTPUT is the same as INPUT; pruning in place is refused")
        if os.path.isdir(src) and (dst + os.sep).startswith(src + os.sep):
            raise UsageError("OUTPUT must not be inside the INPUT folder")
        if a.dry_run:
            return
        if os.path.lexists(a.output) and not a.force:
            raise Failure(f"{a.output}: already exists (use --force to replace it)")
        parent = os.path.dirname(os.path.abspath(a.output))
        if not os.path.isdir(parent):
            raise Failure(f"{parent}: output folder does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise Failure(f"{parent}: output folder is not writable")

    def run(self):
        a = self.args
        t0 = time.perf_counter()
        if not os.path.exists(a.input):
            raise Failure(f"{a.input}: no such file or directory")
        self._check_paths()
        ckpt = Checkpoint(a.input)
        selected, skipped = select(ckpt, self.include, self.exclude)
        if not selected:
            raise Failure(f"{a.input}: no tensor matches the selection"
                          + (f" (--include {a.include})" if a.include else "")
                          + (f" (--exclude {a.exclude})" if a.exclude else ""))
        if self.kind == "nm":
            for shard, t in selected:
                if t.shape[-1] % self.m:
                    raise Failure(f"{ckpt.shard_path(shard)}: tensor {t.name!r} of shape "
                                  f"{list(t.shape)}: last dimension is not divisible by "
                                  f"{self.m} (pattern {self.n}:{self.m})")
        self.ckpt = ckpt
        self.sel_index = {(s, t.name): i for i, (s, t) in enumerate(selected)}
        self.selected = selected
        bar = None
        if self.args.scope == "global":
            self.plan = GlobalPlan(ckpt, selected, self.sparsity, a.max_tensor_sparsity, self.nt,
                                   None)
        self.rows = []
        total_bytes = sum(t.nbytes for _, t in ckpt.items())
        if self.tty:
            try:
                from tqdm import tqdm

                bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                           desc="pruning", leave=False)
            except ImportError:
                bar = None
        self.bar = bar
        try:
            if a.dry_run:
                for shard, t in ckpt.items():
                    if (shard, t.name) in self.sel_index:
                        self._row(shard, t, self._keep(shard, t))
                    if bar is not None:
                        bar.update(t.nbytes)
            else:
                self._write_all()
        finally:
            if bar is not None:
                bar.close()
        wall = time.perf_counter() - t0
        report = self._report(skipped, total_bytes, wall)
        if a.report:
            _atomic_write_text(a.report, json.dumps(report, indent=2) + "\n")
        if not self.quiet:
            print_table(report)
        for w in report["warnings"]:
            print(f"aprender: warning: {w}", file=sys.stderr)
        return 0

    # -- per tensor --------------------------------------------------------------------------
    def _keep(self, shard, t):
        i = self.sel_index[(shard, t.name)]
        if self.args.scope == "global":
            return self.plan.keep(i)
        arr = self.ckpt.files[shard].array(t.name)
        return layer_keep(arr, self.ckpt.shard_path(shard), t, self.kind, self.sparsity, self.n,
                          self.m, self.nt)

    def _row(self, shard, t, keep):
        kept = int(np.count_nonzero(keep))
        self.rows.append({"name": t.name, "file": shard, "shape": list(t.shape),
                          "dtype": t.dtype, "total": t.size, "kept": kept,
                          "sparsity": (t.size - kept) / t.size if t.size else 0.0})

    # -- output ------------------------------------------------------------------------------
    def _write_all(self):
        a = self.args
        ckpt = self.ckpt
        target = a.output
        tmp = _temp_name(target, "dir" if ckpt.is_dir else "file")
        try:
            if ckpt.is_dir:
                new_names = {}
                sizes = {}
                for s in ckpt.shards:
                    out = os.path.join(tmp, s)
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    names, size = self._write_file(s, out)
                    sizes[s] = size
                    for nm in names:
                        new_names[nm] = s
                for name in ckpt.others:
                    src = os.path.join(ckpt.path, name)
                    dst = os.path.join(tmp, name)
                    if os.path.isdir(src):
                        shutil.copytree(src, dst, symlinks=True)
                    else:
                        shutil.copy2(src, dst)
                if ckpt.index is not None:
                    self._write_index(tmp, new_names, sizes)
                if a.format != "dense" and os.path.isfile(os.path.join(tmp, "config.json")):
                    self._update_config(os.path.join(tmp, "config.json"))
            else:
                self._write_file(ckpt.shards[0], tmp)
            _replace(tmp, target)
        except BaseException:
            _remove(tmp)
            raise

    def _write_index(self, tmp, new_names, sizes):
        src = os.path.join(self.ckpt.path, INDEX_NAME)
        dst = os.path.join(tmp, INDEX_NAME)
        if self.args.format == "dense":
            shutil.copy2(src, dst)
            return
        index = dict(self.ckpt.index)
        meta = dict(index.get("metadata") or {})
        meta["total_size"] = sum(sizes.values())
        index["metadata"] = meta
        index["weight_map"] = dict(sorted(new_names.items()))
        with open(dst, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")

    def _update_config(self, path):
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as exc:
            raise Failure(f"{path}: unreadable config.json ({exc})") from None
        if not isinstance(cfg, dict):
            return
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
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")

    def _metadata(self, metadata):
        meta = dict(metadata)
        meta["aprender"] = json.dumps({
            "version": __version__,
            "pattern": (f"{self.n}:{self.m}" if self.kind == "nm" else self.kind),
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

    def _write_file(self, shard, out_path):
        """Write one shard; returns (tensor names written, data bytes)."""
        sf = self.ckpt.files[shard]
        meta = self._metadata(sf.metadata)
        bitmask = self.args.format != "dense"
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        spool = None
        try:
            if bitmask:
                # sizes are known only once compressed: data goes to a spool file first
                spool_path = out_path + ".data"
                spool = os.open(spool_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                data_fd = spool
            else:
                entries, pos = {}, 0
                for t in sf:
                    entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                                       "data_offsets": [pos, pos + t.nbytes]}
                    pos += t.nbytes
                header = encode_header(entries, meta)
                _preallocate(fd, len(header) + pos, out_path)
                write_all(fd, header)
                data_fd = fd
            entries, pos = {}, 0
            for t in sf:
                if (shard, t.name) in self.sel_index:
                    keep = self._keep(shard, t)
                    self._row(shard, t, keep)
                    if bitmask:
                        words = sf.words(t.name)
                        for name, arr in _bitmask_tensors(words, keep, t, self.nt).items():
                            raw = arr.bits if isinstance(arr, Bits16) else np.ascontiguousarray(arr)
                            nb = raw.nbytes
                            entries[name] = {"dtype": dtype_code(arr), "shape": list(raw.shape),
                                             "data_offsets": [pos, pos + nb]}
                            if nb:
                                write_all(data_fd, raw.reshape(-1).view(np.uint8))
                            pos += nb
                        del words, keep
                        self._tick(t.nbytes)
                        continue
                    _masked_words(sf, t, keep, self.nt, lambda b: write_all(data_fd, b))
                    del keep
                else:
                    sf.copy_to(t.name, data_fd)
                entries[t.name] = t.entry()
                entries[t.name]["data_offsets"] = [pos, pos + t.nbytes]
                pos += t.nbytes
                self._tick(t.nbytes)
            if bitmask:
                write_all(fd, encode_header(entries, meta))
                os.lseek(spool, 0, os.SEEK_SET)
                _copy_fd(spool, fd, pos)
        finally:
            os.close(fd)
            if spool is not None:
                os.close(spool)
                _remove(out_path + ".data")
        return list(entries), pos

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
            "pattern": f"{self.n}:{self.m}" if self.kind == "nm" else self.kind,
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


def _preallocate(fd, size, path):
    """Reserve the output's blocks up front: ext4 and xfs write a preallocated file several
    times faster, and a full disk fails here, before any data is written."""
    if not hasattr(os, "posix_fallocate") or size <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise Failure(f"{path}: not enough space for {size} bytes") from None
        # filesystems without fallocate support: write normally


def _copy_fd(src, dst, count):
    done = 0
    while done < count:
        try:
            n = os.sendfile(dst, src, None, count - done)
        except (OSError, AttributeError):
            data = os.read(src, min(1 << 23, count - done))
            if not data:
                raise
            write_all(dst, data)
            n = len(data)
        if n == 0:
            raise Failure("spool file ended early")
        done += n


def _replace(tmp, target):
    """Move tmp into place; an existing target (only reached with --force) is replaced."""
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return
    if os.path.isfile(tmp) and os.path.isfile(target) and not os.path.islink(target):
        os.replace(tmp, target)
        return
    old = _temp_name(target, "file")
    os.unlink(old)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    _remove(old)


def _atomic_write_text(path, text):
    d = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".aprender-tmp",
                                   dir=d)
    except OSError as exc:
        raise Failure(f"{path}: cannot write the report ({exc.strerror})") from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------

def _fmt_table(headers, rows, right=()):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    lines = []
    for row in [headers] + rows:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w)
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
          + ("  (dry run: nothing written)" if report["dry_run"] else f" -> {report['output']}"))
    print(f"selection: {report['selection']['rule']}")
    for w in report["warnings"]:
        print(f"! warning: {w}")


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
            print(f"{s}: pruned by aprender: {ckpt.files[s].metadata['aprender']}")
    return 0


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------

def _on_sigterm(signum, frame):
    raise Interrupted()


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    old = None
    try:
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        pass
    try:
        if args.command == "inspect":
            return run_inspect(args)
        return Pruner(args).run()
    except UsageError as exc:
        print(f"aprender: error: {exc}", file=sys.stderr)
        return 2
    except (Failure, CheckpointError, PruningError) as exc:
        print(f"aprender: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = exc.filename or ""
        print(f"aprender: error: {where + ': ' if where else ''}{exc.strerror or exc}",
              file=sys.stderr)
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
