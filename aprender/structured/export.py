"""The structured exporter: "keep these indices on this axis" as a standard checkpoint.

:func:`export_structured` reads a model folder tensor by tensor (memory-mapped, one tensor in
memory at a time), slices the rows or columns the plan removes as the family table
(:mod:`aprender.structured.families`) says, drops and renumbers layers and experts, and writes
the result with aprender's checkpoint writer (same shards minus emptied ones, index rebuilt,
other files copied, output built under a temporary name and renamed into place; the safety
rules of ``aprender prune``).  ``config.json`` is edited field by field in its own text.

The plan, in the ORIGINAL numbering (axes left out are untouched)::

    {"layers_kept": [0, 1, 3],                 # blocks kept, sorted
     "mlp_channels": {0: [...], 1: [...]},     # MLP intermediate channels kept per layer
                                               # (in an MoE layer: every expert's MLP)
     "kv_heads": {0: [0, 2]},                  # key/value groups kept (with their query heads)
     "experts": {0: [1, 2, 3]}}                # routed experts kept

Widths must be the same in every layer (the configs of these families hold one number per
width); ``num_experts_per_tok`` must stay at most the experts kept.
"""
import json
import os
import re
import time

import numpy as np

from .. import __version__
from .._validation import Bits16, resolve_threads, short_repr
from ..errors import CheckpointError, InvalidArgumentError, ShapeMismatchError
from ..io.checkpoint import (Checkpoint, CheckpointWriter, pause_hook_for_tests, read_json_text,
                             check_module_counts, refuse_own_code)
from ..io.files import OutputTarget, display
from ..io.jsonedit import edit_members
from .families import FAMILIES, family_for

__all__ = ["export_structured", "cut_tensors", "ModelLayout", "PLAN_AXES", "METADATA_KEY"]

PLAN_AXES = ("layers_kept", "mlp_channels", "kv_heads", "experts")
METADATA_KEY = "aprender_shrink"


def _int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


class ModelLayout:
    """A model folder's family, its config (text and values) and where each tensor sits:
    ``blocks[i]``: [(shard, TensorInfo, rest of the name after the block prefix)]; ``others``:
    tensors outside any block.  Built from untrusted files: every number is checked."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        if not ckpt.is_dir:
            raise CheckpointError(f"{display(ckpt.path)}: a structured export needs a model "
                                  "folder (config.json beside the safetensors shards), not a "
                                  "single file")
        if "config.json" not in ckpt.real:
            raise CheckpointError(f"{display(ckpt.path)}: no config.json in the model folder")
        where = display(os.path.join(ckpt.path, "config.json"))
        self.config_text, cfg = read_json_text(ckpt.real["config.json"], where)
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{where}: not a JSON object")
        self.where = where
        refuse_own_code(cfg, where)
        self.path = ()
        sec = cfg
        tc = cfg.get("text_config")
        if family_for(cfg.get("model_type")) is None and isinstance(tc, dict) \
                and family_for(tc.get("model_type")) is not None:
            self.path, sec = ("text_config",), tc
        self.family = family_for(sec.get("model_type"))
        if self.family is None:
            known = ", ".join(sorted({t for f in FAMILIES for t in f.model_types}))
            mt = display(short_repr(sec.get("model_type")))
            raise CheckpointError(f"{where}: model_type {mt} is not a family aprender can "
                                  f"shrink (known: {known})")
        refuse_own_code(sec, where)
        self.cfg = sec
        self.n_layers = self.field("num_hidden_layers")
        self._check_lists()
        self._scan()  # names the first missing block of a layer count beyond the weights
        check_module_counts(cfg, sum(1 for _ in ckpt.items()), where)
        self._check_blocks()

    # -- config values ---------------------------------------------------------------------
    def field(self, name, default=None, required=True):
        v = self.cfg.get(name)
        v = default if v is None else v  # absent or null: the family's default
        if v is None and not required:
            return None
        if not _int(v) or v < 1 or v > 1 << 40:
            raise CheckpointError(f"{self.where}: {name} must be a positive integer, got "
                                  f"{display(short_repr(v))}")
        return int(v)

    @property
    def n_heads(self):
        return self.field("num_attention_heads")

    @property
    def n_kv(self):
        return self.field("num_key_value_heads", self.n_heads)

    @property
    def head_dim(self):
        hd = self.field("head_dim", required=False)
        if hd is None:
            hidden = self.field("hidden_size")
            if hidden % self.n_heads:
                raise CheckpointError(f"{self.where}: hidden_size {hidden} is not a multiple of "
                                      f"num_attention_heads {self.n_heads} and there is no "
                                      "head_dim")
            hd = hidden // self.n_heads
        return hd

    @property
    def experts_field(self):
        for k in self.family.expert_counts:
            if k in self.cfg:
                return k
        raise CheckpointError(f"{self.where}: no expert count "
                              f"({' or '.join(self.family.expert_counts)})")

    @property
    def n_experts(self):
        return self.field(self.experts_field)

    def width(self, seg):
        """The size of one segment kind along a sliced axis."""
        if seg == "mlp":
            return self.field(self.family.mlp_width)
        if seg == "emlp":
            return self.field(self.family.expert_width)
        if seg == "q":
            return self.n_heads * self.head_dim
        if seg == "kv":
            return self.n_kv * self.head_dim
        return self.n_experts  # router

    def _check_lists(self):
        """Per-layer lists hold one entry per layer and index lists hold layer indices: the
        export shrinks them by position, so a list of another length would come out as wrong
        as it went in (and stock loaders refuse it)."""
        n, fam = self.n_layers, self.family
        for k in fam.layer_lists:
            v = self.cfg.get(k)
            if v is not None and (not isinstance(v, list) or len(v) != n):
                got = f"{len(v)} entries" if isinstance(v, list) else display(short_repr(v))
                raise CheckpointError(f"{self.where}: {k} must list one entry per layer "
                                      f"(num_hidden_layers = {n}), got {got}")
        for k in fam.index_lists:
            v = self.cfg.get(k)
            if v is not None and (not isinstance(v, list) or
                                  not all(_int(i) and 0 <= i < n for i in v)):
                raise CheckpointError(f"{self.where}: {k} must be a list of layer indices in "
                                      f"[0, {n}), got {display(short_repr(v))}")

    # -- tensors -----------------------------------------------------------------------------
    def _scan(self):
        fam = self.family
        pat = re.compile(rf"({fam.layer_prefix})([0-9]+)\.(.+)", re.S)
        self.blocks = {}
        self.others = []
        for shard, t in self.ckpt.items():
            m = pat.fullmatch(t.name)
            if m is None:
                self.others.append((shard, t))
                continue
            digits = m.group(2)
            if digits != str(int(digits)) or int(digits) >= self.n_layers:
                raise CheckpointError(f"{display(self.ckpt.shard_path(shard))}: tensor "
                                      f"{display(short_repr(t.name))} names block {digits}, but "
                                      f"the config has num_hidden_layers = {self.n_layers}")
            self.blocks.setdefault(int(digits), []).append((shard, t, m.group(3), m.group(1)))
        if len(self.blocks) != self.n_layers:  # also bounds a hostile num_hidden_layers
            missing = next(i for i in range(self.n_layers) if i not in self.blocks)
            raise CheckpointError(f"{self.where}: num_hidden_layers is {self.n_layers} but the "
                                  f"checkpoint has no tensor of block {missing}")
        self.blocks = dict(sorted(self.blocks.items()))

    def _check_blocks(self):
        """Blocks of one kind (the same segments: dense, MoE) hold the same tensors the family
        table knows, of the same shapes and dtypes, and an MoE block every expert's tensors: a tensor missing, reshaped
        or retyped in one block would be copied into an export that loads wrongly (a stock
        loader initialises a missing weight at random)."""
        fam = self.family
        expert_re = re.compile(fam.expert) if fam.expert else None
        first = {}  # segments -> (layer, signature)
        for L, items in self.blocks.items():
            sig, per_expert = {}, {}
            for shard, t, rest, _ in items:
                if fam.rule_for(rest) is None and not fam.kept_as_is(rest):
                    continue  # unknown to the table: refused when an axis is cut, else copied
                key = rest
                m = expert_re.match(rest) if expert_re is not None else None
                if m is not None:
                    key = rest[:m.start(1)] + "*" + rest[m.end(1):]
                    per_expert.setdefault(key, set()).add(m.group(1))
                have = (t.dtype, tuple(t.shape))
                if key in sig and sig[key] != have:
                    raise CheckpointError(f"{display(self.ckpt.shard_path(shard))}: tensor "
                                          f"{display(short_repr(t.name))} has dtype {t.dtype} "
                                          f"and shape {list(t.shape)}, unlike the other "
                                          "experts' tensors of its kind")
                sig[key] = have
            if per_expert:
                n = self.n_experts
                for key, seen in sorted(per_expert.items()):
                    if len(seen) != n:
                        miss = next(e for e in range(n) if str(e) not in seen)
                        raise CheckpointError(f"{self.where}: block {L} has no tensor "
                                              f"{display(short_repr(key.replace('*', str(miss))))} "
                                              f"(expert {miss} of {n})")
            kind = frozenset(self.segments(L))
            if kind not in first:
                first[kind] = (L, sig)
                continue
            L0, sig0 = first[kind]
            for a, b, la, lb in ((sig0, sig, L0, L), (sig, sig0, L, L0)):
                for key in sorted(a):
                    if key not in b:
                        raise CheckpointError(
                            f"{self.where}: block {lb} has no tensor "
                            f"{display(short_repr(key))}, which block {la} has (the weights "
                            "are incomplete)")
            for key in sorted(sig):
                if sig[key] != sig0[key]:
                    raise CheckpointError(
                        f"{self.where}: tensor {display(short_repr(key))} of block {L} has "
                        f"dtype {sig[key][0]} and shape {list(sig[key][1])}, but in block {L0} "
                        f"{sig0[key][0]} and {list(sig0[key][1])}")

    def segments(self, layer):
        """The segment kinds the tensors of block ``layer`` cut."""
        out = set()
        for _, _, rest, _ in self.blocks[layer]:
            r = self.family.rule_for(rest)
            if r is not None:
                out.update(r.segments)
        return out


# -- the plan --------------------------------------------------------------------------------

def _indices(values, n, what):
    """Sorted, unique indices in [0, n), at least one."""
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or not all(_int(v) for v in values):
        raise InvalidArgumentError(f"{what}: expected a list of integer indices, got "
                                   f"{short_repr(values)}")
    vals = [int(v) for v in values]
    if not vals:
        raise InvalidArgumentError(f"{what}: keeps nothing (at least one index must stay)")
    bad = [v for v in vals if not 0 <= v < n]
    if bad:
        raise InvalidArgumentError(f"{what}: index {bad[0]} is out of range [0, {n})")
    if any(b <= a for a, b in zip(vals, vals[1:])):
        raise InvalidArgumentError(f"{what}: indices must be sorted and unique, got "
                                   f"{short_repr(vals)}")
    return vals


class ResolvedPlan:
    """A validated plan, in the original numbering: ``layers`` kept; ``channels[layer] =
    (segment kind, kept channels)``; ``heads[layer]`` (kept KV groups); ``experts[layer]``;
    ``widths`` (the one kept width per segment kind); and the ``config.json`` changes
    (``config_changes``: field -> new value; ``config_inserts``: (after, field, value))."""

    def __init__(self, layout, plan):
        fam = layout.family
        if not isinstance(plan, dict):
            raise InvalidArgumentError(f"plan must be a dict with keys {', '.join(PLAN_AXES)}, "
                                       f"got {type(plan).__name__}")
        unknown = [k for k in plan if k not in PLAN_AXES]
        if unknown:
            raise InvalidArgumentError(f"plan: unknown axis {short_repr(unknown[0])} (axes: "
                                       f"{', '.join(PLAN_AXES)})")
        n = layout.n_layers
        self.layers = list(range(n)) if plan.get("layers_kept") is None else \
            _indices(plan["layers_kept"], n, "layers_kept")
        kept = set(self.layers)
        self.channels, self.heads, self.experts = ({} for _ in range(3))
        for axis, held in (("mlp_channels", self.channels), ("kv_heads", self.heads),
                           ("experts", self.experts)):
            per = plan.get(axis) or {}
            if not isinstance(per, dict):
                raise InvalidArgumentError(f"plan {axis}: expected {{layer: [kept indices]}}, "
                                           f"got {type(per).__name__}")
            if per and axis == "kv_heads" and fam.heads is not None:
                raise InvalidArgumentError(f"{fam.name}: attention heads cannot be removed: "
                                           f"{fam.heads}")
            if per and axis == "experts" and fam.expert is None:
                raise InvalidArgumentError(f"{fam.name}: the family has no routed experts to "
                                           "remove")
            for layer, values in per.items():
                if not _int(layer) or not 0 <= layer < n:
                    raise InvalidArgumentError(f"plan {axis}: layer {short_repr(layer)} is not "
                                               f"an index in [0, {n})")
                if layer not in kept:
                    raise InvalidArgumentError(f"plan {axis}: layer {layer} is not in "
                                               "layers_kept")
                segs = layout.segments(layer)
                what = f"plan {axis}[{layer}]"
                if axis == "mlp_channels":
                    kinds = segs & {"mlp", "emlp"}
                    if len(kinds) != 1:
                        raise InvalidArgumentError(f"{what}: layer {layer} has "
                                                   f"{'no' if not kinds else 'two kinds of'} "
                                                   "MLP this family's table knows")
                    kind = kinds.pop()
                    held[layer] = (kind, _indices(values, layout.width(kind), what))
                elif axis == "kv_heads":
                    if not segs & {"q", "kv"}:
                        raise InvalidArgumentError(f"{what}: layer {layer} has no attention "
                                                   "projections this family's table knows")
                    held[layer] = _indices(values, layout.n_kv, what)
                else:
                    if "router" not in segs:
                        raise InvalidArgumentError(f"{what}: layer {layer} has no router (not "
                                                   "an MoE layer)")
                    held[layer] = _indices(values, layout.n_experts, what)
        self.layout = layout
        self._uniform()
        self.config_changes, self.config_inserts = self._config()

    def _uniform(self):
        """One width per config field across the kept layers; experts_per_tok <= kept."""
        lay, fam = self.layout, self.layout.family

        def one(field, widths):
            got = sorted(set(widths.values()))
            if len(got) > 1:
                a = min(widths, key=lambda k: (widths[k], k))
                b = max(widths, key=lambda k: (widths[k], -k))
                raise InvalidArgumentError(
                    f"{fam.name}: {field} is one number for every layer, but the plan keeps "
                    f"{widths[a]} in layer {a} and {widths[b]} in layer {b}")
            return got[0] if got else None

        self.widths = {}
        for kind in ("mlp", "emlp"):
            w = {L: (len(self.channels[L][1]) if L in self.channels else lay.width(kind))
                 for L in self.layers if kind in lay.segments(L)}
            field = fam.mlp_width if kind == "mlp" else fam.expert_width
            self.widths[kind] = one(field, w)
        if self.heads:
            w = {L: len(self.heads.get(L, range(lay.n_kv))) for L in self.layers
                 if lay.segments(L) & {"q", "kv"}}
            self.widths["kv"] = one("num_key_value_heads", w)
            if lay.n_heads % lay.n_kv:
                raise CheckpointError(f"{lay.where}: num_attention_heads {lay.n_heads} is not a "
                                      f"multiple of num_key_value_heads {lay.n_kv}")
        if self.experts:
            w = {L: len(self.experts.get(L, range(lay.n_experts))) for L in self.layers
                 if "router" in lay.segments(L)}
            self.widths["router"] = k = one(lay.experts_field, w)
            topk = lay.field("num_experts_per_tok", required=False)
            if topk is not None and k is not None and topk > k:
                raise InvalidArgumentError(f"{fam.name}: num_experts_per_tok is {topk} but the "
                                           f"plan keeps {k} experts per layer (at least "
                                           f"{topk} must stay)")

    def _config(self):
        lay, fam, cfg = self.layout, self.layout.family, self.layout.cfg
        ch, ins = {}, []
        n, kept = lay.n_layers, self.layers
        if len(kept) != n:
            new = {old: i for i, old in enumerate(kept)}
            ch["num_hidden_layers"] = len(kept)
            for k in fam.layer_lists:
                v = cfg.get(k)
                if isinstance(v, list) and len(v) == n:
                    ch[k] = [v[i] for i in kept]
            for k in fam.count_fields:  # any value >= the layer count means "all of them"
                v = cfg.get(k)
                if _int(v) and v < n:
                    ch[k] = sum(1 for i in kept if i < v)
            step = cfg.get("decoder_sparse_step")
            if _int(step) and step > 1:
                # "every step-th layer is MoE" does not survive renumbering: list the dense ones
                only = cfg.get("mlp_only_layers")
                only = only if isinstance(only, list) and all(_int(i) for i in only) else []
                dense = set(only) | {i for i in range(n) if (i + 1) % step}
                ch["decoder_sparse_step"] = 1
                if "mlp_only_layers" in cfg:
                    ch["mlp_only_layers"] = [new[i] for i in kept if i in dense]
                else:
                    ins.append(("decoder_sparse_step", "mlp_only_layers",
                                [new[i] for i in kept if i in dense]))
            else:
                for k in fam.index_lists:
                    v = cfg.get(k)
                    if isinstance(v, list) and all(_int(i) for i in v):
                        ch[k] = [new[i] for i in v if i in new]
        if self.channels:
            for kind, field in (("mlp", fam.mlp_width), ("emlp", fam.expert_width)):
                if self.widths.get(kind) is not None and any(
                        k == kind for k, _ in self.channels.values()):
                    ch[field] = self.widths[kind]
        if self.heads:
            rep = lay.n_heads // lay.n_kv
            k = self.widths["kv"]
            if "head_dim" not in cfg or cfg["head_dim"] is None:
                hd = lay.head_dim
                if "head_dim" in cfg:
                    ch["head_dim"] = hd
                else:
                    ins.append(("num_attention_heads", "head_dim", hd))
            ch["num_attention_heads"] = k * rep
            if "num_key_value_heads" in cfg:
                ch["num_key_value_heads"] = k
            else:
                ins.append(("num_attention_heads", "num_key_value_heads", k))
        if self.experts:
            for f in fam.expert_counts:
                if f in cfg:
                    ch[f] = self.widths["router"]
        return {k: v for k, v in ch.items() if cfg.get(k) != v or k not in cfg}, ins

    # -- per tensor ------------------------------------------------------------------------
    def positions(self, layer, seg):
        """Kept positions along one segment of block ``layer``, or None (untouched)."""
        lay = self.layout
        if seg in ("mlp", "emlp"):
            c = self.channels.get(layer)
            return None if c is None or c[0] != seg else np.asarray(c[1], np.intp)
        if seg in ("q", "kv"):
            g = self.heads.get(layer)
            if g is None:
                return None
            hd = lay.head_dim
            unit = hd * (lay.n_heads // lay.n_kv if seg == "q" else 1)
            return (np.asarray(g, np.intp)[:, None] * unit + np.arange(unit)).reshape(-1)
        e = self.experts.get(layer)
        return None if e is None else np.asarray(e, np.intp)

    def record(self):
        """What was removed, for ``__metadata__`` (channels as counts: lists of thousands of
        indices per layer in every shard header would be a burden; the report has them)."""
        lay, kept = self.layout, set(self.layers)
        out = {"version": __version__, "family": lay.family.name,
               "layers_removed": [i for i in range(lay.n_layers) if i not in kept]}
        if self.channels:
            out["mlp_channels_removed"] = {str(L): lay.width(k) - len(v)
                                           for L, (k, v) in self.channels.items()}
        if self.heads:
            out["kv_heads_removed"] = {str(L): [g for g in range(lay.n_kv) if g not in v]
                                       for L, v in self.heads.items()}
        if self.experts:
            out["experts_removed"] = {str(L): [e for e in range(lay.n_experts) if e not in v]
                                      for L, v in self.experts.items()}
        return out


class _Out:
    """One output tensor: its name, shape, the input tensor and how it is sliced."""

    __slots__ = ("shard", "info", "name", "shape", "axis", "index", "replace")

    def __init__(self, shard, info, name, shape, axis=None, index=None):
        self.shard, self.info, self.name, self.shape = shard, info, name, tuple(shape)
        self.axis, self.index, self.replace = axis, index, None

    @property
    def nbytes(self):
        n = self.info.itemsize
        for d in self.shape:
            n *= d
        return n


def _outputs(rp):
    """Every output tensor in input order (shard, then data order)."""
    lay, fam = rp.layout, rp.layout.family
    new_layer = {old: i for i, old in enumerate(rp.layers)}
    where = {}
    for L, items in lay.blocks.items():
        for shard, t, rest, prefix in items:
            where[(shard, t.name)] = (L, rest, prefix)
    expert_re = re.compile(fam.expert) if fam.expert else None
    outs = []
    for shard, t in lay.ckpt.items():
        hit = where.get((shard, t.name))
        if hit is None:
            outs.append(_Out(shard, t, t.name, t.shape))
            continue
        L, rest, prefix = hit
        if L not in new_layer:
            continue
        shown = f"{display(lay.ckpt.shard_path(shard))}: tensor {display(short_repr(t.name))}"
        new_rest = rest
        if expert_re is not None:
            m = expert_re.match(rest)
            if m is not None:
                e = m.group(1)
                if e != str(int(e)) or int(e) >= lay.n_experts:
                    raise CheckpointError(f"{shown} names expert {e}, but the config has "
                                          f"{lay.experts_field} = {lay.n_experts}")
                kept = rp.experts.get(L)
                if kept is not None:
                    if int(e) not in kept:
                        continue
                    new_rest = rest[:m.start(1)] + str(kept.index(int(e))) + rest[m.end(1):]
        name = f"{prefix}{new_layer[L]}.{new_rest}"
        rule = fam.rule_for(rest)
        cut = L in rp.channels or L in rp.heads or L in rp.experts
        if rule is None:
            if cut and not fam.kept_as_is(rest):
                raise CheckpointError(f"{shown}: not in aprender's {fam.name} table, so its "
                                      "layout under a cut axis is unknown; refused")
            outs.append(_Out(shard, t, name, t.shape))
            continue
        if rule.axis >= len(t.shape):
            raise CheckpointError(f"{shown}: shape {list(t.shape)} has no axis {rule.axis}")
        sizes = [lay.width(s) for s in rule.segments]
        if sum(sizes) != t.shape[rule.axis]:
            raise CheckpointError(f"{shown}: axis {rule.axis} has {t.shape[rule.axis]} entries "
                                  f"but the config says {' + '.join(map(str, sizes))} "
                                  f"({' + '.join(rule.segments)})")
        parts, off, changed = [], 0, False
        for seg, size in zip(rule.segments, sizes):
            p = rp.positions(L, seg)
            changed |= p is not None
            parts.append(off + (np.arange(size, dtype=np.intp) if p is None else p))
            off += size
        if not changed:
            outs.append(_Out(shard, t, name, t.shape))
            continue
        index = np.concatenate(parts)
        shape = list(t.shape)
        shape[rule.axis] = index.size
        outs.append(_Out(shard, t, name, shape, rule.axis, index))
    return outs


def cut_tensors(layout, plan):
    """[(shard, TensorInfo, axis, kept positions)] of the tensors ``plan`` slices, in input
    order (for callers that rework a sliced tensor, e.g. compensation of the columns kept)."""
    return [(o.shard, o.info, o.axis, o.index) for o in _outputs(ResolvedPlan(layout, plan))
            if o.index is not None]


# -- replacements ----------------------------------------------------------------------------

def _bf16_bits(a):
    """float32/float64 values rounded to the nearest bfloat16 (ties to even), as uint16."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _replacement_words(o, value):
    """A replacement array (or a callable returning one) as the output tensor's words (its
    dtype, its shape)."""
    what = f"replacement for tensor {short_repr(o.info.name)}"
    code = o.info.dtype
    if callable(value):  # computed now, when the tensor is written
        value = value()
    if isinstance(value, Bits16):
        if code not in ("BF16", "F16") or value.format != {"BF16": "bfloat16",
                                                            "F16": "float16"}[code]:
            raise InvalidArgumentError(f"{what}: {value.format} for a {code} tensor")
        words = np.asarray(value.bits, np.uint16)
    else:
        try:
            arr = np.asarray(value)
        except Exception as exc:  # noqa: BLE001 - a hostile object's __array__
            raise InvalidArgumentError(f"{what}: not an array ({type(value).__name__})") \
                from exc
        if arr.dtype.kind != "f":
            raise InvalidArgumentError(f"{what}: expected floating values, got {arr.dtype}")
        if not np.isfinite(arr).all():
            raise InvalidArgumentError(f"{what}: holds NaN or infinity")
        if code == "BF16":
            words = _bf16_bits(arr)
        elif code in ("F16", "F32", "F64"):
            dt = {"F16": np.float16, "F32": np.float32, "F64": np.float64}[code]
            with np.errstate(over="ignore"):
                words = arr.astype(dt)
            if not np.isfinite(words).all():
                raise InvalidArgumentError(f"{what}: values exceed the range of {code}")
        else:
            raise InvalidArgumentError(f"{what}: the tensor is {code}, not a float")
    if tuple(words.shape) != o.shape:
        raise ShapeMismatchError(f"{what}: shape {list(words.shape)}, but the exported tensor "
                                 f"has shape {list(o.shape)}")
    return np.ascontiguousarray(words)


# -- the export ------------------------------------------------------------------------------

def export_structured(model_dir, output, plan, *, replacements=None, force=False, n_threads=None,
                      progress=False):
    """Write the model folder ``model_dir`` with what ``plan`` removes removed to the folder
    ``output``; returns a report (dict).  ``replacements``: {original tensor name: array} written
    instead of the sliced tensor (already of the exported shape, e.g. compensated projections).
    ``progress``: a callable ``progress(bytes_done_now, total_bytes)``, or False."""
    t0 = time.perf_counter()
    resolve_threads(n_threads)  # validated like every command's; slicing needs no kernel
    model_dir, output = os.fspath(model_dir), os.fspath(output)
    ckpt = Checkpoint(model_dir)
    layout = ModelLayout(ckpt)
    rp = ResolvedPlan(layout, plan)
    outs = _outputs(rp)
    by_name = {o.info.name: o for o in outs}
    if replacements:
        if not isinstance(replacements, dict):
            raise InvalidArgumentError("replacements must map tensor names to arrays")
        for name, value in replacements.items():
            o = by_name.get(name)
            if o is None:
                raise InvalidArgumentError(f"replacements: {short_repr(name)} is not a tensor "
                                           "the export writes (original names; a dropped "
                                           "layer's or expert's tensors are not written)")
            o.replace = value if callable(value) else _replacement_words(o, value)
    target = OutputTarget(output, ckpt.inputs, force=force, kind="dir")
    config_text = edit_members(layout.config_text, layout.path, rp.config_changes,
                               rp.config_inserts)
    record = json.dumps(rp.record(), separators=(",", ":"))
    total = sum(t.nbytes for _, t in ckpt.items())
    writer = CheckpointWriter(ckpt, target.path, force=force, pause_hook=pause_hook_for_tests())
    try:
        for shard in ckpt.shards:
            mine = [o for o in outs if o.shard == shard]
            sf = ckpt.files[shard]
            if mine:
                planned = {o.name: (o.info.dtype, o.shape, o.nbytes) for o in mine}
                out = writer.shard(shard, {**sf.metadata, METADATA_KEY: record}, planned)
                for o in mine:
                    if o.replace is not None:
                        words = (_replacement_words(o, o.replace) if callable(o.replace)
                                 else o.replace)
                        out.add(o.name, o.info.dtype, o.shape, [words], o.nbytes)
                        del words
                    elif o.index is None:
                        out.copy(sf, o.info, o.name)
                    else:
                        words = sf.words(o.info.name).reshape(o.info.shape)
                        part = np.ascontiguousarray(np.take(words, o.index, axis=o.axis))
                        del words
                        out.add(o.name, o.info.dtype, o.shape, [part], o.nbytes)
                        del part
                out.close()
            if progress:
                progress(sum(t.nbytes for t in sf), total)
        writer.copy_others()
        writer.write_index(rebuild=True)
        writer.write_text("config.json", config_text)
        writer.commit()
    except BaseException as exc:
        writer.abort()
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
            raise CheckpointError(f"{display(target.path)}: cannot write "
                                  f"({exc.strerror or exc})") from None
        raise
    lay = layout
    params_before = sum(t.size for _, t in ckpt.items())
    params_after = sum(int(np.prod(o.shape, dtype=np.int64)) for o in outs)
    return {
        "aprender": __version__,
        "input": os.path.abspath(model_dir),
        "output": os.path.abspath(output),
        "family": lay.family.name,
        "parameters_before": params_before,
        "parameters_after": params_after,
        "bytes_before": total,
        "bytes_after": sum(o.nbytes for o in outs),
        "layers_kept": list(rp.layers),
        "mlp_channels": {str(L): v for L, (_, v) in sorted(rp.channels.items())},
        "kv_heads": {str(L): v for L, v in sorted(rp.heads.items())},
        "experts": {str(L): v for L, v in sorted(rp.experts.items())},
        "config_changes": {k: [lay.cfg.get(k), v] for k, v in rp.config_changes.items()}
        | {k: [None, v] for _, k, v in rp.config_inserts},
        "config_section": ".".join(lay.path) or None,
        "tensors_written": len(outs),
        "wall_s": time.perf_counter() - t0,
    }
