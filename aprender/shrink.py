"""Shrink a Hugging Face model folder: remove layers, MLP channels, KV head groups and MoE
experts and write a smaller standard checkpoint: the work behind ``aprender shrink``.

:func:`shrink_checkpoint` chooses a plan with the criteria of
:mod:`aprender.structured.criteria` (one weight in memory at a time, read from the memory-mapped
checkpoint; calibration statistics from ``aprender calibrate``), refits the kept columns of the
down and output projections by least squares when the calibration file holds their Hessians
(:mod:`aprender.structured.compensate`, one Hessian at a time, computed when the tensor is
written), and writes the result with :func:`aprender.structured.export.export_structured`.
See docs/shrink.md.
"""
import json
import math
import os
import re

import numpy as np

from ._validation import BF16, check_int, decode16, resolve_threads, short_repr
from .errors import CalibrationError, InvalidArgumentError
from .io.checkpoint import Checkpoint
from .io.files import OutputTarget, atomic_write_text, display
from .structured import criteria
from .structured.compensate import compensate_columns
from .structured.export import ModelLayout, cut_tensors, export_structured

__all__ = ["shrink_checkpoint", "DEFAULT_ROUND_TO", "check_options"]

# Kept MLP widths are rounded UP to a multiple of this (never removing more than asked): 64
# keeps every GEMM dimension a multiple of the 8/16-element alignment of fp16/bf16 tensor-core
# kernels (vLLM, TensorRT-LLM, cuBLAS) with room for their 64-wide tiles, and of llama.cpp's
# 32-element quantisation blocks; widths of real models (multiples of 128 or 256) lose at most a
# few percent of the requested cut.  Use 256 for llama.cpp's k-quants, 1 for exact fractions.
DEFAULT_ROUND_TO = 64


def check_options(drop_layers=0, mlp=0.0, heads=0.0, experts=0.0, round_to=DEFAULT_ROUND_TO):
    """The options' values checked (InvalidArgumentError naming the option)."""
    drop_layers = check_int(drop_layers, "drop_layers", minimum=0)
    fracs = {}
    for name, v in (("mlp", mlp), ("heads", heads), ("experts", experts)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                or math.isnan(v) or not 0.0 <= v < 1.0:
            raise InvalidArgumentError(f"{name} must be a fraction in [0, 1), got "
                                       f"{short_repr(v)}")
        fracs[name] = float(v)
    round_to = check_int(round_to, "round_to", minimum=1)
    if not drop_layers and not any(fracs.values()):
        raise InvalidArgumentError("nothing to remove: give drop_layers, mlp, heads or experts")
    return drop_layers, fracs, round_to


def _floats(sf, t):
    """A float tensor of the checkpoint as a float32/float64 numpy array."""
    w = sf.words(t.name).reshape(t.shape)
    if t.dtype == "BF16":
        return decode16(w, BF16)
    if t.dtype == "F16":
        return w.view(np.float16).astype(np.float32)
    if t.dtype in ("F32", "F64"):
        return w.view(np.float32 if t.dtype == "F32" else np.float64)
    raise InvalidArgumentError(f"tensor {short_repr(t.name)} is {t.dtype}, not a float")


def _layer_name(tensor_name):
    return tensor_name[:-len(".weight")] if tensor_name.endswith(".weight") else tensor_name


class _Planner:
    """Chooses the plan from the layout, the options and the calibration statistics."""

    def __init__(self, layout, ctx, round_to, calibration=None):
        self.lay, self.ctx, self.round_to = layout, ctx, round_to
        self.warnings = []
        self.shown = display(calibration) if calibration else None
        self.used = {}  # axis -> what criterion was used

    def _foreign(self, kind, name, why):
        return CalibrationError(f"{self.shown}: {kind} statistics for "
                                f"{display(short_repr(name))}, {why}: the calibration file is "
                                "for another model")

    def check_names(self, blocks=False, experts=False, layers=False):
        """The calibration file describes this model: every block (or expert) it has
        statistics for is one of the model's, and some of its layer statistics name a weight
        of the model.  A file for another model is refused, not half used."""
        lay, ctx = self.lay, self.ctx
        if ctx is None:
            return
        if blocks:
            have = {self._block_prefix(L) for L in lay.blocks}
            for name in ctx.block_stats:
                if name not in have:
                    raise self._foreign("block", name, f"a block this model does not have "
                                        f"(num_hidden_layers = {lay.n_layers})")
        if experts and lay.family.expert is not None:
            pat, have = re.compile(lay.family.expert), set()
            for L, items in lay.blocks.items():
                for _, t, rest, prefix in items:
                    m = pat.match(rest)
                    if m is not None:
                        have.add(f"{prefix}{L}.{rest[:m.end(1)]}")
            for name in ctx.expert_stats:
                if name not in have:
                    raise self._foreign("expert", name, "an expert this model does not have")
        if layers and ctx.layer_names:
            have = {_layer_name(t.name) for _, t in lay.ckpt.items()}
            if not any(n in have for n in ctx.layer_names):
                raise self._foreign("layer", ctx.layer_names[0], "and none of its "
                                    f"{len(ctx.layer_names)} layers names a weight of this model")

    def _tensors(self, layer, axis, segs):
        """(shard, TensorInfo, rest) of block ``layer`` cut along ``axis`` by ``segs``."""
        out = []
        for shard, t, rest, _ in self.lay.blocks[layer]:
            r = self.lay.family.rule_for(rest)
            if r is not None and r.axis == axis and set(r.segments) & segs:
                out.append((shard, t, rest))
        return out

    def _ss(self, t):
        st = self.ctx.get_stats(_layer_name(t.name)) if self.ctx is not None else None
        if st is None or not st.count:
            return None
        if len(t.shape) == 2 and st.in_features != t.shape[1]:
            raise CalibrationError(f"{self.shown}: the statistics of layer "
                                   f"{display(short_repr(_layer_name(t.name)))} have "
                                   f"{st.in_features} input features, but its weight has "
                                   f"{t.shape[1]} columns: the calibration file is for another "
                                   "model")
        return st.sum_squares

    def _block_prefix(self, layer):
        items = self.lay.blocks[layer]
        if not items:
            raise CalibrationError(f"block {layer} has no tensors")
        return f"{items[0][3]}{layer}"

    def layers(self, drop):
        n = self.lay.n_layers
        if not drop:
            return list(range(n))
        if drop >= n:
            raise InvalidArgumentError(f"drop_layers {drop}: the model has {n} layers (at least "
                                       "one must stay)")
        if self.ctx is None:
            raise CalibrationError("dropping layers needs a calibration file (--calibration, "
                                   "calibration=): block influence comes "
                                   "from the block statistics 'aprender calibrate' records")
        prefixes = [self._block_prefix(i) for i in range(n)]
        order = criteria.layer_order(self.ctx.block_stats, prefixes)
        self.used["layers"] = "block influence (ShortGPT: 1 - mean cos(h_in, h_out))"
        return sorted(set(range(n)) - set(order[:drop]))

    def experts(self, layers, fraction):
        fam = self.lay.family
        if fam.expert is None:
            raise InvalidArgumentError(f"{fam.name}: the family has no routed experts")
        if self.ctx is None:
            raise CalibrationError("removing experts needs a calibration file (--calibration, "
                                   "calibration=): REAP scores come from "
                                   "the expert statistics 'aprender calibrate' records")
        pat = re.compile(fam.expert)
        scores = {}
        for L in layers:
            if "router" not in self.lay.segments(L):
                continue
            found = {}
            for _, t, rest, prefix in self.lay.blocks[L]:
                m = pat.match(rest)
                if m is not None:
                    found[int(m.group(1))] = f"{prefix}{L}.{rest[:m.end(1)]}"
            prefixes = [found.get(e, f"{self._block_prefix(L)}.expert {e}")
                        for e in range(self.lay.n_experts)]
            scores[L] = criteria.expert_scores(self.ctx.expert_stats, prefixes)
        if not scores:
            raise InvalidArgumentError(f"{fam.name}: no layer of this model has a router")
        self.used["experts"] = "REAP (mean router-weighted expert output norm)"
        return {L: [int(i) for i in v]
                for L, v in criteria.keep_uniform(scores, fraction, 1).items()}

    def mlp(self, layers, fraction, experts):
        by_kind = {"mlp": {}, "emlp": {}}
        calibrated = set()
        for L in layers:
            kinds = self.lay.segments(L) & {"mlp", "emlp"}
            if len(kinds) != 1:
                continue
            kind = kinds.pop()
            total = None
            for shard, t, rest in self._tensors(L, 1, {kind}):
                if kind == "emlp" and L in experts:
                    m = re.match(self.lay.family.expert, rest)
                    if m is not None and int(m.group(1)) not in experts[L]:
                        continue  # a removed expert's channels do not count
                s, used = criteria.mlp_channel_scores(self._read(shard, t), self._ss(t))
                calibrated.add(used)
                total = s if total is None else total + s
            if total is not None:
                by_kind[kind][L] = total
        self._said("mlp", calibrated, "MLP channels")
        out = {}
        for kind, scores in by_kind.items():
            if scores:
                for L, v in criteria.keep_uniform(scores, fraction, self.round_to).items():
                    out[L] = [int(i) for i in v]
                width = len(next(iter(scores.values())))
                kept = len(next(iter(out.values())))
                if kept == width:  # the round-up took back every channel asked for
                    self.warnings.append(
                        f"--mlp {fraction:g}: rounding the kept width up to a multiple of "
                        f"--round-to {self.round_to} keeps all {width} channels, so none is "
                        "removed (use a smaller --round-to)")
        return out

    def heads(self, layers, fraction):
        fam, lay = self.lay.family, self.lay
        if fam.heads is not None:
            raise InvalidArgumentError(f"{fam.name}: attention heads cannot be removed: "
                                       f"{fam.heads}")
        scores, calibrated = {}, set()
        for L in layers:
            for shard, t, _ in self._tensors(L, 1, {"q"}):
                s, used = criteria.kv_group_scores(self._read(shard, t), lay.n_heads, lay.n_kv,
                                                   lay.head_dim, self._ss(t))
                calibrated.add(used)
                scores[L] = s
        self._said("heads", calibrated, "KV groups")
        return {L: [int(i) for i in v]
                for L, v in criteria.keep_uniform(scores, fraction, 1).items()}

    def _read(self, shard, t):
        """The weight as the criteria take it: memory-mapped, no copy (Bits16 for bfloat16)."""
        return self.lay.ckpt.files[shard].array(t.name)

    def _said(self, axis, calibrated, what):
        if calibrated == {True}:
            self.used[axis] = f"activation-aware ({what}: ||X_j|| * ||W[:, j]|| at the " \
                              "output projection's input)"
        elif calibrated == {False}:
            self.used[axis] = f"magnitude only ({what}: ||W[:, j]||; no calibration " \
                              "statistics for these layers)"
        elif calibrated:
            self.used[axis] = f"activation-aware where the calibration has statistics, " \
                              f"magnitude only elsewhere ({what})"


def shrink_checkpoint(input, output, *, calibration=None, drop_layers=0, mlp=0.0, heads=0.0,
                      experts=0.0, round_to=DEFAULT_ROUND_TO, compensate=True, report=None,
                      force=False, n_threads=None, progress=False):
    """Shrink the model folder ``input`` into ``output``; returns the report (a dict; also
    written to ``report`` as JSON when given).  ``mlp``/``heads``/``experts``: the fraction of
    MLP channels, KV groups and routed experts removed in every layer; ``drop_layers``: how many
    blocks go.  ``progress``: False or ``progress(bytes_done_now, total_bytes)``."""
    from .pruning.calibration import CalibrationContext, HessianFile

    drop_layers, fracs, round_to = check_options(drop_layers, mlp, heads, experts, round_to)
    nt = resolve_threads(n_threads)
    input, output = os.fspath(input), os.fspath(output)
    calibration = None if calibration is None else os.fspath(calibration)
    report = None if report is None else os.fspath(report)
    ckpt = Checkpoint(input)
    inputs = ckpt.inputs + ([calibration] if calibration else [])
    OutputTarget(output, inputs, force=force, kind="dir")
    if report:
        OutputTarget(report, inputs, force=force, what="--report", avoid=[("OUTPUT", output)])
    layout = ModelLayout(ckpt)
    ctx = CalibrationContext.load(calibration, hessians=False) if calibration else None
    planner = _Planner(layout, ctx, round_to, calibration)
    planner.check_names(blocks=bool(drop_layers), experts=bool(fracs["experts"]),
                        layers=bool(fracs["mlp"] or fracs["heads"]))
    plan = {}
    kept_layers = planner.layers(drop_layers)
    if drop_layers:
        plan["layers_kept"] = kept_layers
    if fracs["experts"]:
        plan["experts"] = planner.experts(kept_layers, fracs["experts"])
    if fracs["mlp"]:
        plan["mlp_channels"] = planner.mlp(kept_layers, fracs["mlp"], plan.get("experts", {}))
    if fracs["heads"]:
        plan["kv_heads"] = planner.heads(kept_layers, fracs["heads"])
    replacements, compensated, why = {}, [], None
    if compensate and calibration and (fracs["mlp"] or fracs["heads"]):
        hf = HessianFile(calibration)
        for shard, t, axis, index in cut_tensors(layout, plan):
            if axis != 1:
                continue
            layer = _layer_name(t.name)
            if hf.source(layer) is None:
                continue
            sf = ckpt.files[shard]

            def refit(sf=sf, t=t, index=index, layer=layer):
                return compensate_columns(_floats(sf, t), hf.get(layer), index)
            replacements[t.name] = refit
            compensated.append(t.name)
        if not compensated:
            why = "the calibration file holds no Hessian of a sliced projection's input " \
                  "('aprender calibrate --hessian' collects them)"
    elif compensate and (fracs["mlp"] or fracs["heads"]):
        why = "no --calibration"
    elif not compensate:
        why = "--no-compensate"
    rep = export_structured(input, output, plan, replacements=replacements, force=force,
                            n_threads=nt, progress=progress)
    rep.update({
        "options": {"drop_layers": drop_layers, **fracs, "round_to": round_to,
                    "compensate": compensate,
                    "calibration": os.path.basename(calibration) if calibration else None},
        "criteria": planner.used,
        "compensated": bool(compensated),
        "compensated_tensors": compensated,
        "warnings": planner.warnings,
    })
    if why and (fracs["mlp"] or fracs["heads"]):
        rep["not_compensated_because"] = why
    if report:
        atomic_write_text(report, json.dumps(rep, indent=2) + "\n", force=force, what="--report")
    return rep
