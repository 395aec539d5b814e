"""Prune a safetensors checkpoint (file or folder) tensor by tensor: the work behind
``aprender prune``, usable from Python as :func:`prune_checkpoint`.

One tensor is memory-mapped at a time, so peak memory follows the largest tensor, not the
model.  Selection of tensors, masks (layer scope through ``layer_magnitude_mask``; global scope
through the streamed plan of the selection engine, :mod:`aprender.pruning.selection`) and
writing (through :mod:`aprender.io.checkpoint`, which owns the safety rules) are each one call
here.
"""
import json
import os
import re
import time
import types
from collections import deque, namedtuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import __version__
from ._validation import format_bytes, prune_count, require_memory, resolve_threads, short_repr
from .errors import (CalibrationError, CheckpointError, InsufficientMemoryError,
                     InvalidArgumentError, InvalidPatternError, InvalidShapeError, PruningError,
                     ShapeMismatchError)
from .io.checkpoint import Checkpoint, CheckpointWriter, pause_hook_for_tests, read_json
from .io.export import bitmask_tensors, masked_chunks, packed_tensors, zeroed_chunks
from .io.formats import BITMASK_CONFIG, FORMATS, checkpoint_layout
from .io.files import (OutputTarget, atomic_write_text, commit_path, display, remove_tree,
                       same_file, temp_name)
from .pruning.mask import (SparsityPattern, generate_nm_mask, generate_unstructured_mask,
                           layer_magnitude_mask, per_row_count_mask)
from .pruning.selection import GlobalPlan, MappedUnit, find_threshold, wanda_units

__all__ = ["prune_checkpoint", "CheckpointPruner", "DEFAULT_EXCLUDE", "DEFAULT_INCLUDE"]

WARN_SPARSITY = 0.95
DEFAULT_INCLUDE = r"(^|\.)weight$  (2-D floating tensors only)"
DEFAULT_EXCLUDE = (r"embed|(^|\.)(wte|wpe|shared)\.|norm|(^|\.)ln_|lm_head|"
                   r"(^|\.)(output|head|classifier)\.weight$")


def prune_checkpoint(input, output=None, *, sparsity=None, pattern=None,
                     scope="layer", importance="l1", include=(), exclude=(), format="dense",
                     max_tensor_sparsity=None, dry_run=False, report=None, n_threads=None,
                     force=False, progress=None, calibration=None, allocation="uniform",
                     owl_m=5.0, owl_lambda=0.08, default_exclude=True):
    """Prune the checkpoint ``input`` (a .safetensors file or a folder) into ``output`` with the
    command line's rules and safety guarantees; returns the report (a dict).  ``progress``:
    called as ``progress(bytes_done_now, total_bytes)`` after each tensor."""
    job = make_job(input, output, sparsity=sparsity, pattern=pattern, scope=scope,
                   importance=importance, include=include, exclude=exclude, format=format,
                   max_tensor_sparsity=max_tensor_sparsity, dry_run=dry_run, report=report,
                   n_threads=n_threads, force=force, calibration=calibration,
                   allocation=allocation, owl_m=owl_m, owl_lambda=owl_lambda,
                   default_exclude=default_exclude)
    return CheckpointPruner(job, progress).run()


def make_job(input, output=None, *, sparsity=None, pattern=None, scope="layer", importance="l1",
             include=(), exclude=(), format="dense", max_tensor_sparsity=None, dry_run=False,
             report=None, n_threads=None, force=False, calibration=None, allocation="uniform",
             owl_m=5.0, owl_lambda=0.08, default_exclude=True):
    """The options of :func:`prune_checkpoint` as the job object a CheckpointPruner takes."""
    job = types.SimpleNamespace(
        input=os.fspath(input), output=None if output is None else os.fspath(output),
        sparsity=sparsity, pattern=pattern, scope=scope, importance=importance,
        include=list(include), exclude=list(exclude), format=format,
        max_tensor_sparsity=max_tensor_sparsity, dry_run=dry_run,
        report=None if report is None else os.fspath(report), threads=n_threads, force=force,
        calibration=None if calibration is None else os.fspath(calibration),
        allocation=allocation, owl_m=owl_m, owl_lambda=owl_lambda,
        default_exclude=bool(default_exclude), api=True)
    if job.output is None and not dry_run:
        raise InvalidArgumentError("output is required unless dry_run=True")
    return job


CT_VERSION = "0.14.0.1"  # the compressed-tensors release whose sparse-24-bitmask we write


def sidecar_config(output, input):
    """(path, base) of the config.json written alongside a single-file sparse-24-bitmask
    OUTPUT (``X.safetensors`` -> ``X.config.json``) and the config.json next to INPUT that it
    extends (None when there is none)."""
    stem = output[:-len(".safetensors")] if output.endswith(".safetensors") else output
    base = os.path.join(os.path.dirname(os.path.abspath(input)), "config.json")
    return stem + ".config.json", base if os.path.isfile(base) else None


_MASK_RING = 2  # mask buffers reused across tensors: one being written, one computed ahead


# a layer-scope magnitude selection as its threshold (native key), the ties to prune (the first
# in flat order) and the elements it keeps
_Threshold = namedtuple("_Threshold", "thresh r kept")


def _kept(keep):
    """Kept elements of a keep-mask (bool, or uint8 holding 0 and 1 as the kernels write it).
    NumPy's one-thread count: on the mask worker thread an OpenMP count starts a second thread
    team that competes with the writing side (measured: 2:4 on the 468 MiB checkpoint 0.26 s
    against 0.17 s in a fresh process)."""
    return int(np.count_nonzero(keep.view(np.bool_)))


def _refuse_compressed(ckpt):
    """Pruning the parts of a compressed tensor would corrupt it: densify first."""
    layout = checkpoint_layout(ckpt)
    for s in ckpt.shards:
        for lt in layout[s]:
            if lt.encoding != "dense":
                raise CheckpointError(f"{display(ckpt.shard_path(s))}: tensor {lt.name!r} is "
                                      f"stored compressed ({lt.encoding}); run 'aprender "
                                      "densify' on it first")


def _check_format_names(ckpt, selected, fmt):
    """Refuse outputs whose names would read back differently: sparse-24-bitmask names its
    parts after the layer (``P`` of ``P.weight``), and in a ``bitmask`` shard three tensors
    ``X.values``, ``X.mask``, ``X.shape`` are one compressed tensor ``X``."""
    from .io.formats import BITMASK_PARTS

    chosen = {(s, t.name) for s, t in selected}
    if fmt == "sparse-24-bitmask":
        for s, t in selected:
            if not t.name.endswith(".weight"):
                raise InvalidArgumentError(
                    f"{display(ckpt.shard_path(s))}: tensor {t.name!r}: --format "
                    "sparse-24-bitmask names a tensor's parts after its layer, so only "
                    "'<layer>.weight' tensors can be stored that way (it would read back as "
                    f"{t.name + '.weight'!r}); use --format bitmask or exclude it")
    if fmt != "bitmask":
        return
    for shard in ckpt.shards:
        names = set()
        for t in ckpt.files[shard]:
            names.update([t.name + x for x in BITMASK_PARTS] if (shard, t.name) in chosen
                         else [t.name])
        for t in ckpt.files[shard]:
            if (shard, t.name) in chosen:
                continue
            for x in BITMASK_PARTS:
                base = t.name[:-len(x)]
                if t.name.endswith(x) and all(base + y in names for y in BITMASK_PARTS):
                    raise CheckpointError(
                        f"{display(ckpt.shard_path(shard))}: tensor {t.name!r} would read back "
                        f"as part of a compressed tensor {base!r} in the bitmask format; use "
                        "--format dense")


def _compile(patterns, flag):
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise InvalidArgumentError(f"invalid {flag} regular expression {p!r}: {exc}") \
                from None
    return out


def select(ckpt, include, exclude, default_exclude=True):
    """(selected [(shard, TensorInfo)], skipped [{name, reason}]).  The default rule: 2-D
    floating tensors named ``*.weight`` minus DEFAULT_EXCLUDE (embeddings, norms, heads).
    ``include`` regexes narrow the name rule (any name they match instead of ``*.weight``) but
    keep the 2-D and DEFAULT_EXCLUDE filters unless ``default_exclude=False``, which selects any
    floating tensor of one or more dimensions that ``include`` matches (every one without it).
    ``exclude`` regexes always remove matches.  Tensors ``include`` matched but a filter left
    out are listed in ``skipped`` with the reason."""
    selected, skipped = [], []
    for shard, t in ckpt.items():
        named = any(r.search(t.name) for r in include) if include else \
            (not default_exclude or re.search(r"(^|\.)weight$", t.name))
        why = None
        if not named:
            continue
        if not t.is_float:
            why = f"dtype {t.dtype} is not floating"
        elif len(t.shape) == 0:
            why = "scalar"
        elif default_exclude and len(t.shape) != 2:
            why = (f"{len(t.shape)}-D (only 2-D weights are pruned unless "
                   "--no-default-exclude / default_exclude=False)")
        elif default_exclude and re.search(DEFAULT_EXCLUDE, t.name):
            why = ("an embedding, norm or output head (left alone unless --no-default-exclude / "
                   "default_exclude=False)")
        if why is not None:
            if include:
                skipped.append({"name": t.name, "reason": f"matched --include but {why}"})
            continue
        if any(r.search(t.name) for r in exclude):
            continue
        selected.append((shard, t))
    return selected, skipped


def outlier_ratio(units, m, nt):
    """OWL's outlier ratio of one tensor, streamed over its Wanda units."""
    from .pruning.owl import streamed_outlier_ratio

    return streamed_outlier_ratio(lambda: (u.scores() for u in units), m, nt)


class CheckpointPruner:
    """Prune a checkpoint file or folder: the work behind ``aprender prune``.

    ``job``: an object with the command's options as attributes (see :func:`prune_checkpoint`).
    The constructor validates the options (typed PruningErrors); :meth:`run` returns the
    report dict."""

    def __init__(self, job, progress=None):
        self.args = args = job
        self.progress = progress
        o = self.opt
        if args.importance not in ("l1", "l2", "wanda", "sparsegpt"):
            raise InvalidArgumentError(f"{o('importance')} must be l1, l2, wanda or sparsegpt, "
                                       f"got {short_repr(args.importance)}")
        self.wanda = args.importance == "wanda"
        self.sgpt = args.importance == "sparsegpt"
        # SparseGPT: layers sharing one Hessian (hessian_of: q/k/v, gate/up) share its factor,
        # computed for the first and kept until the last of them is pruned (counted by
        # _prepare_sparsegpt; a Dask worker, which sees part of the layers, factorises each)
        self.factor_uses, self.factors = {}, {}
        if (self.wanda or self.sgpt) and not args.calibration:
            raise InvalidArgumentError(f"{o('importance', args.importance)} needs "
                                       f"{o('calibration', placeholder='FILE')} (from "
                                       "'aprender calibrate"
                                       + (" --hessian" if self.sgpt else "") + "')")
        if args.calibration and not (self.wanda or self.sgpt):
            raise InvalidArgumentError(f"{o('calibration')} is used by {o('importance', 'wanda')} "
                                       f"and {o('importance', 'sparsegpt')} only")
        if self.sgpt and args.scope != "layer":
            raise InvalidArgumentError(f"{o('importance', 'sparsegpt')} prunes tensor by tensor: "
                                       f"{o('scope', 'layer')}")
        if args.allocation not in ("uniform", "owl"):
            raise InvalidArgumentError(f"{o('allocation')} must be uniform or owl, got "
                                       f"{short_repr(args.allocation)}")
        if args.allocation == "owl" and (not self.wanda or args.scope != "layer"):
            raise InvalidArgumentError(f"{o('allocation', 'owl')} needs "
                                       f"{o('importance', 'wanda')} and {o('scope', 'layer')}")
        if args.pattern is None:  # Wanda compares weights within each output row
            args.pattern = "per-row" if self.wanda else "unstructured"
        accepted = "'unstructured', 'per-row' or N:M such as '2:4'"
        text = args.pattern.strip() if isinstance(args.pattern, str) else args.pattern
        if isinstance(text, str) and text.lower() == "row":
            raise InvalidPatternError(
                f"{o('pattern', 'row')} is not accepted here: use 'per-row' for the same fraction "
                "in every row ('row' means whole rows in SparsityPattern.parse, which a "
                f"checkpoint is not pruned by); expected {accepted}")
        try:
            self.pattern = SparsityPattern.parse(text)
        except PruningError:
            self.pattern = None
        if self.pattern is None or not (self.pattern.is_unstructured or self.pattern.is_per_row
                                        or self.pattern.is_nm):
            raise InvalidPatternError(f"{o('pattern', short_repr(args.pattern)[:40])}: "
                                      f"expected {accepted}")
        try:
            self.sparsity = self.pattern.resolve_sparsity(args.sparsity)
        except PruningError as exc:
            raise type(exc)(f"{o('sparsity')}: {exc}") from None
        p = self.pattern
        if p.is_nm and p.axis not in (-1, 1):
            raise InvalidPatternError(f"{o('pattern', args.pattern)}: N:M runs along the last "
                                      "axis here")
        if args.scope == "global" and not p.is_unstructured:
            raise InvalidArgumentError(f"{o('scope', 'global')} needs "
                                       f"{o('pattern', 'unstructured')}")
        if args.allocation == "owl" and p.is_nm:
            raise InvalidArgumentError(f"{o('allocation', 'owl')} gives each tensor its own "
                                       f"sparsity, but {o('pattern', self.pattern_text)} prunes "
                                       f"every tensor to {p.n}/{p.m}: use "
                                       f"{o('pattern', 'per-row')} or "
                                       f"{o('pattern', 'unstructured')} with OWL")
        if args.format not in FORMATS:
            raise InvalidArgumentError(f"{o('format')} must be one of {', '.join(FORMATS)}, got "
                                       f"{short_repr(args.format)}")
        if args.format == "sparse-24-bitmask" and not (p.is_nm and (p.n, p.m) == (2, 4)):
            raise InvalidArgumentError(f"{o('format', 'sparse-24-bitmask')} needs "
                                       f"{o('pattern', '2:4')}")
        # the dense output of a layer-scope unstructured magnitude selection is written from
        # each tensor's threshold, without a mask (_threshold)
        self.mask_free = (args.format == "dense" and args.importance in ("l1", "l2")
                          and args.scope == "layer" and p.is_unstructured)
        if args.max_tensor_sparsity is not None and args.scope != "global":
            raise InvalidArgumentError(f"{o('max_tensor_sparsity')} needs {o('scope', 'global')}")
        self.include = _compile(args.include, o("include"))
        self.exclude = _compile(args.exclude, o("exclude"))
        self.nt = resolve_threads(args.threads)
        if args.allocation == "owl":
            from .pruning.owl import _check_lam, _check_m

            self.owl_m = _check_m(args.owl_m)
            self.owl_lam = _check_lam(args.owl_lambda)

    def opt(self, name, value=None, placeholder=None):
        """An option as the caller spells it: ``--scope global`` / ``--calibration FILE`` at the
        command line, ``scope='global'`` / ``calibration=FILE`` from Python (:func:`make_job`
        marks its jobs ``api``)."""
        if getattr(self.args, "api", False):
            return f"{name}=" + (repr(value) if value is not None else placeholder or "")
        text = "--" + name.replace("_", "-")
        shown = value if value is not None else placeholder
        return text if shown is None else f"{text} {shown}"

    @property
    def pattern_text(self):
        return str(self.pattern.n) + ":" + str(self.pattern.m) if self.pattern.is_nm else \
            ("per-row" if self.pattern.is_per_row else "unstructured")

    def _check_paths(self, ckpt):
        """Every path that will be written is checked against every input before any work."""
        a = self.args
        inputs = ckpt.inputs + ([a.calibration] if a.calibration else [])
        self.target = None
        if not a.dry_run:
            self.target = OutputTarget(a.output, inputs, force=a.force,
                                       kind="dir" if ckpt.is_dir else "file")
        self.config_path = self.config_base = None
        if a.format == "sparse-24-bitmask" and not ckpt.is_dir and not a.dry_run:
            self.config_path, self.config_base = sidecar_config(a.output, a.input)
            inputs += [self.config_base] if self.config_base else []
            OutputTarget(self.config_path, inputs, force=a.force, what="config file",
                         avoid=[("OUTPUT", a.output)])
        if a.report:
            avoid = [] if a.dry_run else [("OUTPUT", a.output)]
            OutputTarget(a.report, inputs, force=a.force, what="--report", avoid=avoid)

    def run(self):
        t0 = time.perf_counter()
        skipped = self.prepare()
        if self.args.dry_run:
            self._dry_run()
        else:
            self._write_all()
        return self.finish(skipped, t0)

    def prepare(self):
        """Everything before the first mask: read the headers, check the output paths, select
        the tensors, load the calibration, plan global scope.  Returns the skipped tensors."""
        a = self.args
        ckpt = Checkpoint(a.input)
        self._check_paths(ckpt)
        _refuse_compressed(ckpt)
        if a.format == "bitmask" and ckpt.is_dir and BITMASK_CONFIG in ckpt.others:
            raise CheckpointError(f"{display(a.input)}: holds {BITMASK_CONFIG}, the name a "
                                  "bitmask output keeps config.json under; densify it first")
        selected, skipped = select(ckpt, self.include, self.exclude,
                                   getattr(a, "default_exclude", True))
        _check_format_names(ckpt, selected, a.format)
        if not selected:
            raise CheckpointError(f"{display(a.input)}: no tensor matches the selection"
                                  + (f" (--include {a.include})" if a.include else "")
                                  + (f" (--exclude {a.exclude})" if a.exclude else "")
                                  + (f"; {len(skipped)} matched --include but were left out, "
                                     f"e.g. {display(short_repr(skipped[0]['name']))}: "
                                     f"{skipped[0]['reason'].split(' but ', 1)[1]}"
                                     if skipped else ""))
        if self.pattern.is_nm:
            for shard, t in selected:
                if t.shape[-1] % self.pattern.m:
                    raise InvalidShapeError(
                        f"{self._label(ckpt, shard, t)} of shape {list(t.shape)}: last "
                        f"dimension is not divisible by {self.pattern.m} (pattern "
                        f"{self.pattern_text})")
        self.ckpt = ckpt
        self.sel_index = {(s, t.name): i for i, (s, t) in enumerate(selected)}
        self.layer_sparsity = {}
        self._buffers = {}
        if self.wanda:
            self._prepare_wanda(ckpt, selected)
        if self.sgpt:
            self._prepare_sparsegpt(ckpt, selected)
        if a.scope == "global":
            self._plan_global(ckpt, selected)
        self.rows = []
        self.total_bytes = sum(t.nbytes for _, t in ckpt.items())
        return skipped

    def finish(self, skipped, t0):
        """The report (written to --report when asked for)."""
        report = self._report(skipped, self.total_bytes, time.perf_counter() - t0)
        if self.args.report:
            atomic_write_text(self.args.report, json.dumps(report, indent=2) + "\n",
                              force=self.args.force, what="--report")
        return report

    # -- per tensor --------------------------------------------------------------------------
    @staticmethod
    def _label(ckpt, shard, t):
        return f"{display(ckpt.shard_path(shard))}: tensor {display(short_repr(t.name))}"

    def _prepare_wanda(self, ckpt, selected):
        """Load the calibration, check every selected tensor has matching statistics (before
        anything is written) and, with OWL, allocate the layers' sparsities."""
        from .pruning.calibration import CalibrationContext
        from .pruning.importance import wanda_scale

        # Wanda needs the sums of squares only: the Hessians stay on disk, never mapped
        self.ctx = CalibrationContext.load(self.args.calibration, hessians=False)
        self.scales = {}
        for shard, t in selected:
            label = self._label(ckpt, shard, t)
            if len(t.shape) != 2:
                raise InvalidShapeError(f"{label}: Wanda needs a 2-D weight (out, in), got "
                                        f"shape {list(t.shape)}")
            layer = t.name[:-len(".weight")] if t.name.endswith(".weight") else t.name
            stats = self.ctx.require_stats(layer)
            if stats.in_features != t.shape[1]:
                raise ShapeMismatchError(f"{label} of shape {list(t.shape)} has {t.shape[1]} "
                                         f"inputs, but the calibration statistics of "
                                         f"{display(short_repr(layer))} have "
                                         f"{stats.in_features}")
            try:
                self.scales[t.name] = wanda_scale(
                    stats, np.float64 if t.dtype == "F64" else np.float32, layer=layer)
            except PruningError as exc:
                raise type(exc)(f"{label}: {exc}") from None
        if self.args.allocation == "owl":
            self._owl(ckpt, selected)

    @staticmethod
    def _layer(t):
        return t.name[:-len(".weight")] if t.name.endswith(".weight") else t.name

    def _prepare_sparsegpt(self, ckpt, selected):
        """Open the calibration's Hessians (read one tensor at a time, never all at once) and
        check, before anything is written, that every selected tensor has one of its size."""
        from .pruning.calibration import CalibrationContext, HessianFile
        from .pruning.reconstruct import sparsegpt_workspace_bytes

        self.ctx = CalibrationContext.load(self.args.calibration, hessians=False)
        self.hessians = HessianFile(self.args.calibration)
        self.workspace = 0
        for shard, t in selected:
            label = self._label(ckpt, shard, t)
            if len(t.shape) != 2:
                raise InvalidShapeError(f"{label}: SparseGPT needs a 2-D weight (out, in), got "
                                        f"shape {list(t.shape)}")
            layer = self._layer(t)
            stats = self.ctx.require_stats(layer)
            if stats.in_features != t.shape[1]:
                raise ShapeMismatchError(f"{label} of shape {list(t.shape)} has {t.shape[1]} "
                                         f"inputs, but the calibration statistics of "
                                         f"{display(short_repr(layer))} have "
                                         f"{stats.in_features}")
            if self.hessians.source(layer) is None:
                raise CalibrationError(f"{label}: the calibration file has no Hessian for layer "
                                       f"{display(short_repr(layer))} (collect with 'aprender "
                                       "calibrate --hessian')")
            need = sparsegpt_workspace_bytes(t.shape[0], t.shape[1], t.itemsize)
            # the Hessian's size follows the weight's (checked above): what SparseGPT holds
            # for it is checked against the machine before anything is read or written
            require_memory(need, f"{label}: SparseGPT with the Hessian of layer "
                                 f"{display(short_repr(layer))} from "
                                 f"{display(self.args.calibration)}")
            self.workspace = max(self.workspace, need)
            key = (self.hessians.source(layer), t.itemsize == 8)
            self.factor_uses[key] = self.factor_uses.get(key, 0) + 1
            if self.factor_uses[key] == 2:  # a shared factor is held beside the workspace
                kept = t.shape[1] ** 2 * (8 if key[1] else 4)
                require_memory(need + kept, f"{label}: SparseGPT with the shared Hessian of "
                                            f"layer {display(short_repr(layer))}")
                self.workspace = max(self.workspace, need + kept)

    def _sparsegpt(self, shard, t):
        """(keep, words): the SparseGPT mask and the updated weights' bytes of one tensor."""
        from .pruning.reconstruct import hessian_factor, sparsegpt

        layer = self._layer(t)
        arr = self.ckpt.files[shard].array(t.name)
        key = (self.hessians.source(layer), t.itemsize == 8)
        try:
            h = self.hessians.get(layer, t.shape[1])
            factor = self.factors.get(key)
            if factor is None and self.factor_uses.get(key, 0) > 1:
                factor = self.factors[key] = hessian_factor(h, wide=key[1], layer=layer,
                                                            n_threads=self.nt)
            self.factor_uses[key] = self.factor_uses.get(key, 1) - 1
            if self.factor_uses[key] <= 0:
                self.factors.pop(key, None)  # its last user: freed after this tensor
            new, mask = sparsegpt(arr, h, None if self.pattern.is_nm else
                                  self.layer_sparsity.get(t.name, self.sparsity),
                                  pattern=self.pattern, n_threads=self.nt, layer=layer,
                                  factor=factor)
        except PruningError as exc:
            # about the Hessian (its values, or the memory it needs): name where it came from
            where = f" (Hessian from calibration file {display(self.args.calibration)})" \
                if isinstance(exc, (CalibrationError, InsufficientMemoryError)) else ""
            raise type(exc)(f"{self._label(self.ckpt, shard, t)}: {exc}{where}") from None
        except MemoryError:
            raise InsufficientMemoryError(
                f"{self._label(self.ckpt, shard, t)}: SparseGPT with the Hessian of layer "
                f"{display(short_repr(layer))} from {display(self.args.calibration)} cannot "
                f"allocate its workspace ({format_bytes(self.workspace)} at most)") from None
        bits = new.bits if hasattr(new, "bits") else new
        words = bits.reshape(-1).view(f"u{t.itemsize}")
        return mask.keep.reshape(-1).view(np.uint8), words

    def _prune(self, shard, t, nt=None):
        """(keep, words): the tensor's flat uint8 keep-mask and, when the method changes the
        remaining weights (SparseGPT), their new bytes (else None: the input's are kept)."""
        if self.sgpt:
            return self._sparsegpt(shard, t)
        return self._keep(shard, t, nt or self.nt), None

    def _units(self, ckpt, shard, t, common=None, nt=None):
        sf, label = ckpt.files[shard], self._label(ckpt, shard, t)
        if not self.wanda:
            return [MappedUnit(sf, t, label, common)]
        return wanda_units(sf, t, self.scales[t.name], label, nt or self.nt, common)

    def _plan_global(self, ckpt, selected):
        codes = {t.dtype for _, t in selected}
        if self.wanda:  # float32 scores, float64 when a float64 weight is among them
            common = "float64" if "F64" in codes and len(codes) > 1 else None
        else:
            common = None if len(codes) == 1 else ("float64" if "F64" in codes else "float32")
        units, groups = [], []
        for shard, t in selected:
            us = self._units(ckpt, shard, t, common)
            groups.append(list(range(len(units), len(units) + len(us))))
            units += us
        self.plan = self._global_plan(units, groups)

    def _global_plan(self, units, groups):
        """The plan of a global selection (a distributed run merges per-tensor summaries)."""
        return GlobalPlan(units, self.sparsity, self.args.max_tensor_sparsity, self.nt, groups)

    def _owl(self, ckpt, selected):
        """OWL (Yin et al. 2024): each layer's outlier ratio (Wanda scores above m times the
        layer's mean), streamed chunk by chunk, then sparsities spread over [s - lam, s + lam]
        whose element-weighted mean is the target."""
        from .pruning.owl import owl_allocation

        ratios = self._outlier_ratios([self._units(ckpt, shard, t) for shard, t in selected])
        sizes = [t.size for _, t in selected]
        counts = owl_allocation(ratios, sizes, self.sparsity, self.owl_lam)
        for (shard, t), c in zip(selected, counts):
            self.layer_sparsity[t.name] = int(c) / t.size if t.size else 0.0
        self.owl_ratios = {t.name: r for (_, t), r in zip(selected, ratios)}

    def _outlier_ratios(self, tensors):
        """Each tensor's outlier ratio from its units (a distributed run: one task each)."""
        return [outlier_ratio(units, self.owl_m, self.nt) for units in tensors]

    def _keep(self, shard, t, nt):
        i = self.sel_index[(shard, t.name)]
        if self.args.scope == "global":
            return self.plan.group_keep(i)
        sparsity = self.layer_sparsity.get(t.name, self.sparsity)
        if self.wanda:
            return self._wanda_layer_keep(shard, t, sparsity, nt)
        arr = self.ckpt.files[shard].array(t.name)
        try:
            mask = layer_magnitude_mask(arr, self.pattern, sparsity, n_threads=nt,
                                        out=self._mask_buffer(t.size).reshape(arr.shape))
        except PruningError as exc:
            raise type(exc)(f"{self._label(self.ckpt, shard, t)}: {exc}") from None
        return mask.keep.reshape(-1).view(np.uint8)

    def _wanda_layer_keep(self, shard, t, sparsity, nt):
        """Layer-scope Wanda mask from scores computed chunk by chunk: per-row and N:M select
        inside each row chunk; unstructured runs the exact streaming selection over the
        tensor's chunks."""
        units = self._units(self.ckpt, shard, t, nt=nt)
        if self.pattern.is_unstructured:
            return GlobalPlan(units, sparsity, None, nt, [list(range(len(units)))]) \
                .group_keep(0, np.empty(t.size, np.uint8))
        keep = self._mask_buffer(t.size)
        pos = 0
        # an OWL count is honoured exactly: spread over the rows, which differ by at most one
        count = prune_count(sparsity, t.size) if t.name in self.layer_sparsity else None
        for u in units:  # each chunk's scores and mask go straight into reused buffers
            s = u.scores(out=self._scratch(u.size, u.dtype, "scores").reshape(u.shape))
            part = keep[pos:pos + u.size].reshape(u.shape)
            if self.pattern.is_per_row and count is not None:
                per_row_count_mask(s, count, first_row=u.r0, total_rows=t.shape[0],
                                   n_threads=nt, out=part)
            elif self.pattern.is_per_row:
                generate_unstructured_mask(s, sparsity, per_row=True, n_threads=nt,
                                           out=part)
            else:
                generate_nm_mask(s, self.pattern.n, self.pattern.m, n_threads=nt, out=part)
            pos += u.size
        return keep.view(np.uint8)

    def _mask_buffer(self, n):
        """A bool mask buffer of n elements from a ring of two reused across tensors (the pages
        stay mapped instead of being faulted in for every tensor).  Two masks are alive at most
        (the one written and the one computed ahead, see _write_shard), so a slot is reused
        only once its mask has been written."""
        self._ring = (getattr(self, "_ring", 0) + 1) % _MASK_RING
        return self._scratch(n, np.bool_, f"mask{self._ring}")

    def _scratch(self, n, dtype, what):
        """A buffer of at least n elements reused across tensors (its pages stay mapped)."""
        buf = self._buffers.get(what)
        if buf is None or buf.size < n or buf.dtype != dtype:
            buf = self._buffers[what] = np.empty(n, dtype)
        return buf[:n]

    def _row(self, shard, t, keep, kept=None):
        if kept is None:
            kept = _kept(keep)
        self.rows.append({"name": t.name, "file": shard, "shape": list(t.shape),
                          "dtype": t.dtype, "total": t.size, "kept": kept,
                          "sparsity": (t.size - kept) / t.size if t.size else 0.0})

    # -- output ------------------------------------------------------------------------------
    def _write_all(self):
        ckpt = self.ckpt
        writer = CheckpointWriter(ckpt, self.target.path, force=self.args.force,
                                  pause_hook=pause_hook_for_tests())
        sidecar = None
        try:
            self._write_shards(writer)
            if ckpt.is_dir:
                # a bitmask folder has no config.json, so loaders refuse it (BITMASK_CONFIG)
                writer.copy_others({"config.json": BITMASK_CONFIG}
                                   if self.args.format == "bitmask" else None)
                writer.write_index(rebuild=self.args.format != "dense")
                if self.args.format == "sparse-24-bitmask":
                    cfg = writer.read_output_json("config.json")
                    if cfg is None or isinstance(cfg, dict):  # absent: one with the config
                        writer.write_json("config.json", self._update_config(cfg or {}))

            if self.config_path is not None:  # single file: the config goes alongside
                cfg = read_json(self.config_base) if self.config_base else {}
                cfg = cfg if isinstance(cfg, dict) else {}
                sidecar = temp_name(self.config_path, "file")
                with open(sidecar, "w", encoding="utf-8") as f:
                    f.write(json.dumps(self._update_config(cfg), indent=2) + "\n")
            ours = os.lstat(writer.tmp)
            writer.commit()
            if sidecar is not None:
                try:
                    commit_path(sidecar, self.config_path, force=self.args.force,
                                what="config file")
                except BaseException:
                    # no output without its config: remove the one just put in place (if it
                    # is still ours)
                    if same_file(self.target.path, ours):
                        remove_tree(self.target.path)
                    raise
                sidecar = None
        except BaseException as exc:
            writer.abort()
            if sidecar is not None:
                remove_tree(sidecar)
            if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
                # never name the temporary output: say what the user asked for
                why = exc.strerror or str(exc)
                raise CheckpointError(f"{display(self.target.path)}: cannot write ({why})") \
                    from None
            raise

    def _write_shards(self, writer):
        """Every shard, in order (a distributed run writes them on its workers)."""
        for s in self.ckpt.shards:
            self._write_shard(writer, s)

    def _dry_run(self):
        for s in self.ckpt.shards:
            self._dry_shard(s)

    def _dry_shard(self, shard):
        """A dry run's rows for one shard: the masks are made and counted, nothing written."""
        for t in self.ckpt.files[shard]:
            if (shard, t.name) in self.sel_index:
                self._row(shard, t, self._prune(shard, t)[0])
            self._tick(t.nbytes)

    def _write_shard(self, writer, shard):
        sf = self.ckpt.files[shard]
        fmt = self.args.format
        planned = None if fmt != "dense" else {t.name: (t.dtype, t.shape, t.nbytes) for t in sf}
        out = writer.shard(shard, self._metadata(sf.metadata, shard), planned)
        # The next selected tensor's mask is computed on a worker thread while this thread
        # reads, masks and writes the current one (the kernels and the file I/O release the
        # GIL).  One mask ahead at most: two masks alive, whatever the shard holds.  SparseGPT
        # runs one tensor at a time (its workspace, not a mask, is what memory is bound by).
        ahead = [t for t in sf if (shard, t.name) in self.sel_index]
        # at most one mask ahead: _mask_buffer's ring holds two (the one written, the one ahead)
        depth = 0 if self.sgpt else _MASK_RING - 1
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="aprender-mask") as pool:
            pending = deque(pool.submit(self._prune_ahead, shard, t) for t in ahead[:depth])
            nxt = depth
            try:
                for t in sf:
                    if (shard, t.name) not in self.sel_index:
                        out.copy(sf, t)
                        self._tick(t.nbytes)
                        continue
                    keep, words, kept = (pending.popleft().result() if depth else
                                         self._prune(shard, t) + (None,))
                    if depth and nxt < len(ahead):
                        pending.append(pool.submit(self._prune_ahead, shard, ahead[nxt]))
                        nxt += 1
                    if isinstance(keep, _Threshold):
                        self._write_thresholded(out, sf, shard, t, keep, 1 if pending else self.nt)
                        self._tick(t.nbytes)
                        continue
                    # while a mask is being computed its kernels hold the threads: this side
                    # writes on one (two OpenMP teams on the same cores wait on each other's
                    # spinning threads)
                    wnt = 1 if pending else self.nt
                    self._row(shard, t, keep, kept)
                    if fmt != "dense":
                        src = sf.words(t.name) if words is None else words  # SparseGPT: new
                        enc = (bitmask_tensors(src, keep, t, wnt) if fmt == "sparse-24-bitmask"
                               else packed_tensors(src, keep, t))
                        for name, code, shape, arr in enc:
                            out.add(name, code, shape, [arr], arr.nbytes)
                        del enc
                    elif words is not None:  # the updated weights, pruned ones +0.0
                        out.add(t.name, t.dtype, t.shape, [words], t.nbytes)
                    else:
                        out.add(t.name, t.dtype, t.shape, masked_chunks(sf, t, keep, wnt),
                                t.nbytes)
                    del keep, words
                    self._tick(t.nbytes)
            finally:
                for f in pending:  # an error: the mask being computed is waited for, not used
                    f.cancel()
        out.close()

    def _prune_ahead(self, shard, t):
        """_prune on the worker thread, and the mask's kept count (counted there, off the
        writing thread); for a dense layer-scope magnitude selection, only its threshold (see
        _threshold).  A global plan's mask is a view of one buffer that the next tensor's mask
        overwrites, so it is copied out; the other scopes' masks come from a ring of two."""
        # the writing side keeps one core: the worker's kernels take the others (on two cores,
        # one: two OpenMP teams on two cores slowed layer-50 on the 468 MiB checkpoint from
        # 0.20 s to 0.25-0.29 s in fresh processes)
        nt = max(1, self.nt - 1)
        th = self._threshold(shard, t, nt)
        if th is not None:
            return th, None, None
        keep, words = self._prune(shard, t, nt)
        keep = keep.copy() if self.args.scope == "global" else keep
        return keep, words, _kept(keep)

    def _threshold(self, shard, t, nt):
        """A dense layer-scope unstructured magnitude selection needs no mask: the exact
        threshold and the number of ties to prune (one streaming pass, nothing written), applied
        while the tensor is written (zeroed_chunks).  None where the mask path applies: other
        patterns, scopes, importances and formats, nothing or everything pruned, or non-finite
        weights (the mask path then raises its usual error)."""
        if not self.mask_free or t.size == 0 or t.dtype not in ("F16", "BF16", "F32", "F64"):
            return None
        k = prune_count(self.layer_sparsity.get(t.name, self.sparsity), t.size)
        if k <= 0 or k >= t.size:
            return None
        unit = MappedUnit(self.ckpt.files[shard], t, self._label(self.ckpt, shard, t))
        thresh, below, bad, _ = find_threshold([unit.load(True)], [t.size], k, 1, unit.inf16, nt)
        return None if bad else _Threshold(thresh, k - below, t.size - k)

    def _write_thresholded(self, out, sf, shard, t, th, nt):
        tally = types.SimpleNamespace()
        out.add(t.name, t.dtype, t.shape, zeroed_chunks(sf, t, th.thresh, th.r, nt, tally),
                t.nbytes)
        if tally.r or tally.kept != th.kept:  # the words written are not those selected on
            raise CheckpointError(f"{self._label(self.ckpt, shard, t)}: the tensor changed "
                                  "while it was read")
        self._row(shard, t, None, tally.kept)

    def _update_config(self, cfg):
        """``cfg`` with the compressed-tensors sparsity config of a sparse-24-bitmask output,
        as compressed-tensors 0.14 writes it (``quant_method``, ``sparsity_config``,
        ``transform_config``, ``version``; no quantization keys for a model that is only
        sparse).  ``global_sparsity``: the fraction of all the checkpoint's elements pruned."""
        pruned = sum(r["total"] - r["kept"] for r in self.rows)
        everything = sum(t.size for _, t in self.ckpt.items())
        sparsity_config = {
            "format": "sparse-24-bitmask",
            "global_sparsity": pruned / everything if everything else 0.0,
            "sparsity_structure": "2:4",
            "targets": sorted({r["name"][:-len(".weight")] if r["name"].endswith(".weight")
                               else r["name"] for r in self.rows}),
            "ignore": [],
        }
        qc = cfg.get("quantization_config")
        qc = dict(qc) if isinstance(qc, dict) else {}
        if qc.get("format") == "dense" and "config_groups" not in qc:
            del qc["format"]  # left by aprender before 0.1.1: compressed-tensors rejects it
        qc.update({"quant_method": "compressed-tensors", "sparsity_config": sparsity_config,
                   "transform_config": qc.get("transform_config") or {},
                   "version": CT_VERSION})
        cfg["quantization_config"] = qc
        return cfg

    def _settings(self):
        """What made the masks: recorded in the output's metadata and in the report."""
        a = self.args
        return {"pattern": self.pattern_text, "sparsity": self.sparsity, "scope": a.scope,
                "importance": a.importance, "format": a.format,
                "max_tensor_sparsity": a.max_tensor_sparsity,
                "calibration": os.path.basename(a.calibration) if a.calibration else None}

    def _rule_text(self):
        a = self.args
        default = getattr(a, "default_exclude", True)
        names = "names matching --include" if a.include else \
            ("'*.weight'" if default else "every name")
        if default:
            text = (f"2-D floating tensors with {names}; embeddings, norms and output heads "
                    "(lm_head) left alone")
        else:
            text = f"floating tensors with {names} (--no-default-exclude)"
        return text + ("; minus --exclude" if a.exclude else "")

    def _selection(self):
        a = self.args
        default = getattr(a, "default_exclude", True)
        return {"include": a.include or [DEFAULT_INCLUDE if default else ".*"],
                "exclude": ([DEFAULT_EXCLUDE] if default else []) + a.exclude}

    def _metadata(self, metadata, shard):
        """The shard's metadata plus aprender's record; ``pruned`` names the shard's pruned
        tensors, so ``inspect`` never has to run the recorded (untrusted) regexes."""
        meta = dict(metadata)
        allocation = {k: v for k, v in self._allocation_report().items()
                      if k in ("method", "m", "lambda")}
        pruned = [t.name for t in self.ckpt.files[shard] if (shard, t.name) in self.sel_index]
        meta["aprender"] = json.dumps({"version": __version__, **self._settings(),
                                       "allocation": allocation,
                                       "selection": self._selection(), "pruned": pruned},
                                      separators=(",", ":"))
        return meta

    def _allocation_report(self):
        if self.args.allocation != "owl":
            return {"method": "uniform"}
        return {"method": "owl", "m": self.owl_m, "lambda": self.owl_lam,
                "outlier_ratio": self.owl_ratios, "sparsity": self.layer_sparsity}

    def _tick(self, nbytes):
        if self.progress is not None:
            self.progress(nbytes, self.total_bytes)

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
            **self._settings(),
            "allocation": self._allocation_report(),
            "threads": self.nt,
            **({"sparsegpt_workspace_bytes": self.workspace} if self.sgpt else {}),
            "selection": {
                "rule": self._rule_text(),
                **self._selection(),
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
