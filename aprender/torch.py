"""PyTorch interop: zero-copy numpy views of CPU tensors, calibration statistics collected with
forward hooks, and in-place pruning of modules (by magnitude or by Wanda).

torch is optional and imported only when these functions run (never at ``import aprender``).

CUDA (or any non-CPU) tensors are refused with :class:`DeviceError` rather than copied silently:
pruning in place through a host copy would not change the device tensor.  Move the module or
tensor to the CPU (``.cpu()``), prune, and move it back.
"""
import re

import numpy as np

from ._adapters import _dtype_name, to_numpy_view
from ._threads import limit_pools
from ._validation import check_bool, check_sparsity, prune_count, resolve_threads, short_repr
from .errors import (CalibrationError, CalibrationRequiredError,  # noqa: F401
                     DeviceError, InvalidArgumentError, InvalidCalibrationError,
                     InvalidDTypeError, InvalidPatternError, InvalidSparsityError, PruningError)

__all__ = ["DeviceError", "to_numpy_view", "prune_", "prune_sequential_", "collect_calibration",
           "layer_blocks", "load_state_dict"]


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - only without torch
        raise ImportError("aprender.torch needs PyTorch (pip install torch)") from exc
    return torch


_PRUNABLE = ("float16", "bfloat16", "float32", "float64")


def _pattern(pattern):
    """The pattern of prune_: text for SparsityPattern.parse (where 'row' is the deprecated
    spelling of 'per-row') or a SparsityPattern; unstructured, per-row or N:M."""
    from .pruning.mask import SparsityPattern

    p = SparsityPattern.parse(pattern, legacy_row=True)
    if not (p.is_unstructured or p.is_per_row or p.is_nm):
        raise InvalidPatternError(f"prune_ supports the patterns 'unstructured', 'per-row' and "
                                  f"N:M such as '2:4', got {p}")
    return p


def _choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(map(repr, choices))}, got "
                                   f"{short_repr(value)}")
    return value


def _include_regexes(include):
    if include is None:
        return None
    pats = [include] if isinstance(include, str) else include
    if not isinstance(pats, (list, tuple)) or not all(isinstance(p, str) for p in pats):
        raise InvalidArgumentError(f"include must be a regular expression or a list of them, got "
                                   f"{type(include).__name__} {short_repr(include)}")
    regs = []
    for p in pats:
        try:
            regs.append(re.compile(p))
        except re.error as exc:
            raise InvalidArgumentError(f"include: invalid regular expression {short_repr(p)} "
                                       f"({exc})") from None
    return regs


def _torch_prune_hook(mod, torch):
    """The torch.nn.utils.prune forward pre-hook that recomputes mod.weight, or None."""
    from torch.nn.utils import prune as tprune

    for hook in mod._forward_pre_hooks.values():
        if isinstance(hook, tprune.BasePruningMethod) and \
                getattr(hook, "_tensor_name", None) == "weight":
            return hook
    return None


class _Target:
    """One weight to prune: the tensor whose magnitudes are ranked (``weight``, or for a module
    pruned before by torch.nn.utils.prune the effective ``weight_orig * weight_mask``), and the
    modules that share it (tied parameters are pruned and counted once)."""

    __slots__ = ("name", "mods", "weight", "orig", "mask", "hook", "aliases")

    def __init__(self, name, mod, weight, orig=None, mask=None, hook=None):
        self.name, self.mods, self.weight = name, [mod], weight
        self.orig, self.mask, self.hook = orig, mask, hook
        self.aliases = []

    @property
    def reparametrised(self):
        return self.hook is not None

    def ranked(self):
        """The tensor whose magnitudes decide: the weight the forward pass uses."""
        if self.reparametrised:
            with _torch().no_grad():
                return (self.orig.detach() * self.mask.detach().to(self.orig.dtype))
        return self.weight


def _storage_key(t):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype)


def _span(t):
    """[first byte, one past the last byte) that tensor t reaches in memory."""
    if t.numel() == 0:
        return None
    start = t.data_ptr()
    extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return start, start + (extent + 1) * t.element_size()


def _targets(module, include):
    torch = _torch()
    from torch.nn.utils import parametrize

    regs = _include_regexes(include)
    out, by_key = [], {}
    for mod_name, mod in module.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        linear = isinstance(mod, torch.nn.Linear)
        if regs is None:
            hit = linear
        else:
            hit = any(r.search(name) for r in regs) and (linear or w.dim() == 2)
        if not hit or not w.is_floating_point():
            continue
        if torch.nn.parameter.is_lazy(w):
            raise InvalidArgumentError(f"{name} is not initialised yet (a lazy module): run a "
                                       "forward pass before pruning")
        if _dtype_name(w.dtype) not in _PRUNABLE:
            raise InvalidDTypeError(f"{name} has dtype {_dtype_name(w.dtype)}; prune_ supports "
                                    f"{', '.join(_PRUNABLE)} weights")
        hook = _torch_prune_hook(mod, torch)
        if hook is not None:
            orig, mask = getattr(mod, "weight_orig", None), getattr(mod, "weight_mask", None)
            if not (isinstance(orig, torch.Tensor) and isinstance(mask, torch.Tensor)) or \
                    orig.shape != mask.shape:
                raise InvalidArgumentError(f"{name} has a torch.nn.utils.prune hook but no "
                                           "matching weight_orig and weight_mask")
            t = _Target(name, mod, w, orig, mask, hook)
            key = ("pruned", _storage_key(orig), _storage_key(mask))
        elif parametrize.is_parametrized(mod, "weight"):
            raise InvalidArgumentError(
                f"{name} is computed by a torch.nn.utils.parametrize parametrisation: zeroing it "
                "would not change the forward pass; remove the parametrisation first")
        elif "weight" not in mod._parameters and "weight" not in mod._buffers:
            raise InvalidArgumentError(
                f"{name} is not a parameter or buffer of its module (computed by a hook such as "
                "weight_norm?): zeroing it would not change the forward pass")
        else:
            t = _Target(name, mod, w)
            key = _storage_key(w)
        if key in by_key:  # tied: the same memory, seen through another module
            first = by_key[key]
            first.mods.append(mod)
            first.aliases.append(name)
            continue
        by_key[key] = t
        out.append(t)
    _refuse_partial_overlaps(out)
    return out


def _refuse_partial_overlaps(targets):
    """Weights that share memory without being the same view (a transposed or sliced alias)
    would be pruned twice with different masks: refuse them."""
    spans = []
    for t in targets:
        for tensor in ((t.orig, t.mask) if t.reparametrised else (t.weight,)):
            sp = _span(tensor)
            if sp is not None:
                spans.append((sp, t.name))
    spans.sort()
    for (a, name_a), (b, name_b) in zip(spans, spans[1:]):
        if b[0] < a[1] and name_a != name_b:
            raise InvalidArgumentError(f"{name_a} and {name_b} share memory with different "
                                       "shapes or strides (a transposed or sliced alias); prune_ "
                                       "can prune tied weights only when they are the same tensor")


def _global_keeps(views, sparsity, nt):
    """Exact global magnitude selection over views (Bits16 or float arrays), no concatenation."""
    from ._validation import as_floats
    from .pruning.selection import ArraySource, common_dtype, select_global

    # mixed dtypes are compared exactly in float32 (float64 if any tensor is float64)
    floats = common_dtype([as_floats(v, "weight") for v in views])
    keeps = [np.empty(f.size, np.uint8) for f in floats]
    return select_global([ArraySource(f, "weight") for f in floats], keeps, sparsity, nt,
                         magnitude=1)


def prune_(module, sparsity=None, pattern="auto", scope="layer", include=None,
           importance="l1", keep_mask=False, n_threads=None, calibration=None):
    """Prune a module's weights in place by magnitude or by Wanda; returns a per-weight report.

    Targets: every ``nn.Linear`` weight, or with ``include`` (a regex or list of regexes searched
    in the parameter name, e.g. ``"layers\\.0\\."``) the Linear weights and other 2-D weights
    whose name matches.  Weights must be float16, bfloat16, float32 or float64.
    ``pattern``: any text :meth:`aprender.SparsityPattern.parse` reads as "unstructured",
    "per-row" (per-row unstructured: the same fraction in every row, Wanda's grouping) or "N:M"
    such as "2:4" (``sparsity`` then implied), or such a SparsityPattern; "row" is accepted as a
    deprecated spelling of "per-row" here (elsewhere "row" prunes whole rows).  "auto" (the
    default) is "unstructured" for magnitude importance and "per-row" for Wanda.  ``scope``:
    "layer" (each weight pruned to ``sparsity``) or "global" (one exact count over all targets,
    unstructured only).  ``sparsity``: a fraction, or for layer scope a mapping from module (or
    weight) name to fraction, such as ``owl_sparsities(...).as_dict()``; every target must be
    in it.  With magnitude or Wanda importance a mapped fraction ``f`` prunes exactly
    ``round(f * size)`` of its weight (halves down; OWL's counts to the element): with
    "per-row" spread over the rows as evenly as integers allow
    (:func:`aprender.pruning.mask.per_row_count_mask`: rows differ by at most one, the first
    rows take the remainder), where a single fraction prunes ``round(f * columns)`` in every
    row (as SparseGPT's per-row pattern does with a mapped fraction too).  N:M fixes every
    layer's sparsity, so a mapping is refused with it.

    ``importance``: "l1" or "l2" (the same ranking for magnitude pruning), or "wanda": scores
    ``|W| * ‖X_j‖₂`` (:class:`aprender.pruning.WandaImportance`) from ``calibration``, a
    :class:`aprender.pruning.CalibrationContext` (see :func:`collect_calibration`) whose layer
    names are the modules' names in ``module.named_modules()``.  N:M groups run along the input
    dimension (the last axis of a Linear weight), per-row prunes each output row.
    "sparsegpt": :func:`aprender.pruning.sparsegpt` per weight (layer scope), from a calibration
    collected with ``hessian=True``: the mask is chosen and the remaining weights are updated
    to compensate (written into the weight, or ``weight_orig`` under torch pruning).  For
    SparseGPT as the paper runs it, where each block's calibration inputs pass through the
    already-pruned earlier blocks, see :func:`prune_sequential_`.

    ``keep_mask=False`` zeros the weights through a zero-copy view.  ``keep_mask=True`` leaves
    the data alone and registers the mask with ``torch.nn.utils.prune.custom_from_mask`` (the
    module gets ``weight_orig`` and ``weight_mask``, as torch's own pruning does).

    Modules already pruned by ``torch.nn.utils.prune`` (``weight_orig``, ``weight_mask`` and a
    forward pre-hook) are pruned on the weight their forward pass uses, ``weight_orig *
    weight_mask``: the new mask is combined (logical and) with ``weight_mask``, which is updated
    in place so the forward pass uses it (with ``keep_mask=False`` the pruned entries of
    ``weight_orig`` are zeroed as well).  The report counts the combined mask: if the old mask
    already pruned more than ``sparsity``, it says so.  Weights computed some other way
    (``torch.nn.utils.parametrize``, ``weight_norm``) are refused: zeroing them would not change
    the forward pass.

    Tied weights (one tensor shared by several modules) are selected and counted once; the
    report names the first module's weight and lists the others in ``shared_with``.  With
    Wanda, the statistics of every module sharing the weight are added together.

    Ties are broken by index (lowest flat index pruned first), so on tie-free data the masks equal
    ``torch.nn.utils.prune.l1_unstructured`` (layer) and ``global_unstructured`` (global).
    Each report entry: name, shape, dtype, total, kept, sparsity, shared_with."""
    with limit_pools(n_threads, torch=True):
        return _prune_impl(module, sparsity, pattern, scope, include, importance, keep_mask,
                           n_threads, calibration)


def _prune_impl(module, sparsity, pattern, scope, include, importance, keep_mask, n_threads,
                calibration):
    torch = _torch()
    from .pruning.mask import layer_magnitude_mask, per_row_count_mask

    if not isinstance(module, torch.nn.Module):
        raise InvalidArgumentError(f"prune_ needs a torch.nn.Module, got {type(module).__name__}")
    _choice(importance, "importance", ("l1", "l2", "wanda", "sparsegpt"))
    wanda = importance == "wanda"
    sgpt = importance == "sparsegpt"
    if isinstance(pattern, str) and pattern == "auto":
        pattern = "per-row" if wanda else "unstructured"
    pat = _pattern(pattern)
    _choice(scope, "scope", ("layer", "global"))
    keep_mask = check_bool(keep_mask, "keep_mask")
    per_layer = hasattr(sparsity, "keys") and callable(sparsity.keys)
    if per_layer:
        if pat.is_nm:
            raise InvalidSparsityError(f"per-layer sparsities (such as OWL's) cannot be applied "
                                       f"with the N:M pattern {pat}, which prunes every layer to "
                                       f"{pat.n}/{pat.m}: use pattern 'per-row' or "
                                       "'unstructured'")
        if scope != "layer":
            raise InvalidSparsityError("a mapping of per-layer sparsities needs scope='layer' and "
                                       f"an unstructured or per-row pattern (got scope={scope!r}, "
                                       f"pattern {pat})")
    else:
        sparsity = pat.resolve_sparsity(sparsity)
    if scope == "global" and not pat.is_unstructured:
        raise InvalidArgumentError(f"scope='global' needs pattern='unstructured', got {pat}")
    if sgpt and scope != "layer":
        raise InvalidArgumentError("importance='sparsegpt' prunes layer by layer: scope='layer'")
    if wanda or sgpt:
        ctx = _calibration_context(calibration, importance)
    elif calibration is not None:
        from .pruning.importance import check_calibration

        check_calibration(calibration)  # accepted and ignored by magnitude importance
    nt = resolve_threads(n_threads)
    targets = _targets(module, include)
    if not targets:
        raise InvalidArgumentError("prune_: no weight matches (nn.Linear weights, or include="
                                   f"{short_repr(include)})")
    fractions = [_layer_sparsity(sparsity, t) if per_layer else sparsity for t in targets]
    ranked = [t.ranked() for t in targets]
    views = [to_numpy_view(r) for r in ranked]
    if sgpt:
        keeps = _sparsegpt_update(targets, views, ctx, pat, fractions, nt)
    elif wanda:
        keeps = _wanda_keeps(targets, views, ctx, pat, scope, fractions, nt, per_layer)
    elif scope == "global":
        keeps = [kp.reshape(v.shape).view(np.bool_)
                 for kp, v in zip(_global_keeps(views, sparsity, nt), views)]
    else:
        keeps = []
        for t, v, frac in zip(targets, views, fractions):
            try:
                if per_layer and pat.is_per_row:
                    mk = per_row_count_mask(v, prune_count(frac, v.size), magnitude=True,
                                            n_threads=nt)
                else:
                    mk = layer_magnitude_mask(v, pat, frac, n_threads=nt)
            except PruningError as exc:
                raise type(exc)(f"{t.name}: {exc}") from None
            keeps.append(mk.keep)
    from ._kernels import apply as _apply

    report = []
    for t, keep in zip(targets, keeps):
        keep = _apply_keep(t, keep, keep_mask, nt, torch)
        total = keep.size
        kept = int(_apply.count_nonzero_u8(np.ascontiguousarray(keep).reshape(-1).view(np.uint8),
                                           nt)) if total else 0
        report.append({"name": t.name, "shape": list(t.weight.shape),
                       "dtype": _dtype_name(t.weight.dtype), "total": total, "kept": kept,
                       "sparsity": (total - kept) / total if total else 0.0,
                       "shared_with": list(t.aliases)})
    return report


def _module_names(t):
    """The names of the modules that hold target t's weight (``a.b.weight`` -> ``a.b``)."""
    return [n[:-len(".weight")] if n.endswith(".weight") else "" for n in [t.name] + t.aliases]


def _layer_sparsity(mapping, t):
    """Target t's fraction from a mapping keyed by module or weight name."""
    for key in _module_names(t)[:1] + [t.name]:
        if key in mapping:
            return check_sparsity(mapping[key], f"sparsity[{key!r}]")
    raise InvalidSparsityError(f"the sparsity mapping has no entry for {t.name} (keys are module "
                               f"names such as {_module_names(t)[0]!r}, or weight names)")


def _calibration_context(calibration, importance="wanda"):
    from .pruning.importance import check_calibration

    if calibration is None:
        hint = ", hessian=True" if importance == "sparsegpt" else ""
        raise CalibrationRequiredError(
            f"importance={importance!r} needs calibration=: a CalibrationContext from "
            f"aprender.torch.collect_calibration(model, batches{hint}) or "
            "CalibrationContext.load(path)")
    ctx = check_calibration(calibration)
    if not hasattr(ctx, "layer_names"):
        raise InvalidCalibrationError("prune_ needs a CalibrationContext (statistics of every "
                                      f"layer), got {type(ctx).__name__}")
    return ctx


def _tied_stats(t, ctx):
    """The statistics of every module that uses target t's weight, added together."""
    from .pruning.importance import layer_stats

    stats = [layer_stats(n, ctx, "calibration-aware", "prune_") for n in _module_names(t)]
    st = stats[0]
    for other in stats[1:]:
        st = st.merge(other)
    return st


def _sparsegpt_update(targets, views, ctx, pat, fractions, nt):
    """SparseGPT per target: the updated weights are written into the tensor the forward pass
    reads (``weight``, or ``weight_orig`` under torch pruning); returns the keep-masks."""
    from .pruning.reconstruct import sparsegpt

    out = []
    for t, v, frac in zip(targets, views, fractions):
        # under torch pruning, the weights its mask removed stay removed (and are compensated)
        old = (t.mask.detach() == 0).numpy() if t.reparametrised else None
        try:
            new, mask = sparsegpt(v, _tied_stats(t, ctx), None if pat.is_nm else frac,
                                  pattern=pat, n_threads=nt, layer=_module_names(t)[0],
                                  must_prune=old)
        except PruningError as exc:
            raise type(exc)(f"{t.name}: {exc}") from None
        dest = to_numpy_view(t.orig if t.reparametrised else t.weight)
        if hasattr(dest, "bits"):
            dest.bits[...] = new.bits
        else:
            np.copyto(dest, new)
        out.append(mask.keep)
    return out


def _wanda_keeps(targets, views, ctx, pat, scope, fractions, nt, per_layer=False):
    """Keep-masks (bool arrays) from Wanda scores, one per target (per-layer fractions prune
    their exact count, per-row too)."""
    from .pruning.importance import WandaImportance
    from .pruning.mask import (generate_global_mask, generate_nm_mask,
                               generate_unstructured_mask, per_row_count_mask)

    out = []
    for t, v, frac in zip(targets, views, fractions):
        names = _module_names(t)
        st = _tied_stats(t, ctx)  # tied weights: every user's statistics, added together
        try:
            s = WandaImportance(names[0]).compute(v, st, n_threads=nt)
            if scope == "global":
                out.append(s.values)
            elif pat.is_nm:
                out.append(generate_nm_mask(s, pat.n, pat.m, axis=pat.axis, n_threads=nt).keep)
            elif per_layer and pat.is_per_row:
                out.append(per_row_count_mask(s, prune_count(frac, s.values.size),
                                              n_threads=nt).keep)
            else:
                out.append(generate_unstructured_mask(s, frac, per_row=pat.is_per_row,
                                                      n_threads=nt).keep)
        except PruningError as exc:
            raise type(exc)(f"{t.name}: {exc}") from None
    if scope == "global":
        return [m.keep for m in generate_global_mask(out, fractions[0], n_threads=nt)]
    return out


def _calibration_layers(model, layers):
    """(name, module) of the nn.Linear modules selected by ``layers``."""
    torch = _torch()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if layers is None:
        return linears
    if callable(layers) and not isinstance(layers, (str, re.Pattern)):
        return [(n, m) for n, m in linears if layers(n, m)]
    pats = [layers] if isinstance(layers, (str, re.Pattern)) else layers
    if not isinstance(pats, (list, tuple)) or \
            not all(isinstance(p, (str, re.Pattern)) for p in pats):
        raise InvalidArgumentError(f"layers must be a module name or regular expression, a list "
                                   f"of them, or a callable (name, module) -> bool; got "
                                   f"{type(layers).__name__} {short_repr(layers)}")
    modules = dict(model.named_modules())
    exact, regs = set(), []
    for p in pats:
        if isinstance(p, str) and p in modules:
            if not isinstance(modules[p], torch.nn.Linear):
                raise InvalidArgumentError(f"layers: module {p!r} is a "
                                           f"{type(modules[p]).__name__}, not an nn.Linear")
            exact.add(p)
            continue
        try:
            regs.append(re.compile(p) if isinstance(p, str) else p)
        except re.error as exc:
            raise InvalidArgumentError(f"layers: {short_repr(p)} is neither a module name nor a "
                                       f"valid regular expression ({exc})") from None
    return [(n, m) for n, m in linears if n in exact or any(r.search(n) for r in regs)]


def _batch_call(batch, torch):
    """(args, kwargs, samples, attention mask or None) for one calibration batch."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, (int(batch.shape[0]) if batch.dim() else 1), None
    if isinstance(batch, dict) or (hasattr(batch, "keys") and hasattr(batch, "__getitem__")):
        kwargs = dict(batch)
        first = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        key = "input_ids" if isinstance(kwargs.get("input_ids"), torch.Tensor) else None
        lead = kwargs[key] if key else first
        samples = int(lead.shape[0]) if lead is not None and lead.dim() else 1
        return (), kwargs, samples, kwargs.get("attention_mask")
    if isinstance(batch, (list, tuple)):
        first = next((v for v in batch if isinstance(v, torch.Tensor)), None)
        samples = int(first.shape[0]) if first is not None and first.dim() else 1
        return tuple(batch), {}, samples, None
    raise InvalidArgumentError(f"a calibration batch must be a tensor, a dict of keyword "
                               f"arguments or a tuple of positional arguments, got "
                               f"{type(batch).__name__}")


def _token_mask(mask, torch):
    """The attention mask as a numpy bool array (True = a real token), checked to hold 0/1."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise InvalidArgumentError(f"attention_mask must be a tensor, got {type(mask).__name__}")
    m = mask.detach()
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise CalibrationError("attention_mask must hold only 0 (padding) and 1 (tokens); "
                                   "an additive mask (0 / -inf) is not a padding mask")
        m = m != 0
    return m.to("cpu").numpy()


def collect_calibration(model, batches, *, layers=None, hessian=False, progress=True,
                        n_threads=None, share_hessians=True):
    """Run ``batches`` through ``model`` and collect the input statistics of its nn.Linear
    layers: returns a :class:`aprender.pruning.CalibrationContext` (layer name -> ActivationStats,
    names from ``model.named_modules()``), ready for ``prune_(..., importance="wanda")``,
    ``WandaImportance`` or ``save``.

    ``batches``: an iterable of tensors (``model(batch)``), dicts (``model(**batch)``, e.g. a
    tokenizer's output) or tuples (``model(*batch)``), already on the model's device.  Each
    Linear's input is added to its statistics as it streams through a forward pre-hook (no
    activation is kept); activations on another device are copied to the CPU one at a time.
    When a dict batch has an ``attention_mask`` (0/1, shape (batch, seq)), padding tokens are
    not counted in the inputs whose leading dimensions are (batch, seq); inputs of any other
    leading shape (a model that flattens or routes tokens) are counted whole.
    ``num_samples`` of the result counts the sequences (the batches' first dimension).

    ``layers``: which Linear modules (default: all): a module name or regular expression
    (searched in the name), a list of them, or a callable (name, module) -> bool.  Only the
    layers that received an input appear in the result.  ``hessian=True`` also accumulates
    XᵀX (for SparseGPT; memory in_features² float64 per distinct input).  With
    ``share_hessians`` (the default), Linear layers that receive the very same input tensor in
    their first batch (query/key/value, gate/up) accumulate one Hessian between them; if a later
    batch gives them different inputs, CalibrationError says so (collect with
    ``share_hessians=False`` then).  ``progress``: a tqdm bar when tqdm is installed.

    During collection the model is in eval mode under ``torch.no_grad()``; the hooks are
    removed and every module's training flag restored afterwards, also on error."""
    with limit_pools(n_threads, serial_blas=True, torch=True):
        return _collect_calibration_impl(model, batches, layers, hessian, progress, n_threads,
                                         share_hessians)


def _collect_calibration_impl(model, batches, layers, hessian, progress, n_threads,
                              share_hessians):
    torch = _torch()
    from .pruning.calibration import CalibrationContext

    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"collect_calibration needs a torch.nn.Module, got "
                                   f"{type(model).__name__}")
    hessian = check_bool(hessian, "hessian")
    progress = check_bool(progress, "progress")
    nt = resolve_threads(n_threads)
    selected = _calibration_layers(model, layers)
    if not selected:
        raise InvalidArgumentError(f"collect_calibration: no nn.Linear module matches layers="
                                   f"{short_repr(layers)}")
    if isinstance(batches, (torch.Tensor, dict)):
        raise InvalidArgumentError("batches must be an iterable of batches (a list, a "
                                   "DataLoader, a generator); wrap a single batch in a list")
    hooks = StatHooks(hessian=hessian, share_hessians=share_hessians, n_threads=nt)
    modes = [(m, m.training) for m in model.modules()]
    samples = 0
    try:
        for name, mod in selected:
            hooks.attach(name, mod)
        model.eval()
        it = batches
        if progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                total = len(batches) if hasattr(batches, "__len__") else None
                it = tqdm(batches, total=total, desc="calibration", unit="batch")
        with torch.no_grad():
            for batch in it:
                args, kwargs, n, mask = _batch_call(batch, torch)
                if kwargs and isinstance(model, torch.nn.Sequential):
                    # an nn.Sequential (a sentence-transformers model is one) takes its input
                    # positionally: the tokenizer's dict goes to the first module as it is
                    args, kwargs = (kwargs,), {}
                hooks.start_batch(_token_mask(mask, torch))
                model(*args, **kwargs)
                hooks.end_batch()
                samples += n
    finally:
        hooks.remove()
        for m, flag in modes:
            m.training = flag
    ctx = CalibrationContext(num_samples=samples)
    stats = hooks.finish()
    for name, _ in selected:
        if name in stats:
            ctx.add_layer_stats(name, stats[name])
    return ctx


def _shown(name, limit=120):
    """A layer name for a message: control characters escaped, cut to ``limit`` characters."""
    from .io.files import display

    text = display(name)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class StatHooks:
    """The statistic hooks of :func:`collect_calibration`, shared with the block executor
    (aprender.models.executor): one :class:`ActivationStats` per layer name, fed by forward
    pre-hooks on Linear-like modules (:meth:`attach`) or directly (:meth:`add`, for inputs the
    executor computes itself, such as an expert's routed tokens).  Padding is excluded through
    the token mask of the current batch (:meth:`start_batch`) for inputs whose leading
    dimensions are the mask's; Hessians are shared between layers that read the very same
    input (:class:`_HessianSharing`) or that :meth:`add` names as followers."""

    def __init__(self, *, hessian=False, share_hessians=True, n_threads=None):
        self.hessian = check_bool(hessian, "hessian")
        self.nt = resolve_threads(n_threads)
        self.stats = {}
        self.mask = None
        self.share = _HessianSharing(self.hessian and check_bool(share_hessians,
                                                                 "share_hessians"))
        self.follows = {}  # layer -> leader named by add(); its Hessian is the leader's
        self.handles = []

    def _stats(self, name, in_features, own_hessian):
        from .pruning.calibration import ActivationStats

        st = self.stats.get(name)
        if st is None:
            st = self.stats[name] = ActivationStats(in_features,
                                                    hessian=self.hessian and own_hessian)
        return st

    def _update(self, name, st, t, where):
        try:
            st.update(t, where=where, n_threads=self.nt)
        except PruningError as exc:
            exc.args = (f"layer {_shown(name)}: {exc.args[0] if exc.args else exc}",) \
                + exc.args[1:]
            raise

    def attach(self, name, mod, in_features=None, flat=False):
        """Collect the input statistics of module ``mod`` (an nn.Linear, or any module whose
        first argument is its input, such as a router) under ``name``.  ``flat``: the module
        reads the batch's tokens flattened to (batch * seq, features), in order (a router),
        so the token mask applies to its rows too."""
        torch = _torch()
        width = mod.in_features if in_features is None else in_features

        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
            if not isinstance(x, torch.Tensor):
                raise InvalidArgumentError(f"{_shown(name)}: the layer's input is not a "
                                           f"tensor ({type(x).__name__})")
            lead = self.share.see(name, x)
            st = self._stats(name, width, lead == name)
            t = x.detach()
            if t.device.type != "cpu":
                t = t.to("cpu")
            mask = self.mask
            where = None
            if mask is not None and tuple(t.shape[:-1]) == mask.shape:
                where = mask
            elif mask is not None and flat and t.dim() == 2 and t.shape[0] == mask.size:
                where = mask.reshape(-1)
            self._update(name, st, t, where)
            return None

        self.handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))

    def add(self, name, x, *, follows=None):
        """Add the rows of ``x`` (tokens, in_features), every one counted, to layer ``name``;
        ``follows``: a layer that reads the very same rows (its Hessian serves both)."""
        if follows is not None:
            self.follows[name] = follows
        st = self._stats(name, int(x.shape[-1]), follows is None)
        self._update(name, st, x.detach(), None)

    def start_batch(self, mask):
        """``mask``: numpy bool (batch, seq), True for a real token, or None."""
        self.mask = mask
        self.share.start_batch()

    def end_batch(self):
        self.share.end_batch()
        self.mask = None

    def remove(self):
        self.mask = None
        for h in self.handles:
            h.remove()
        self.handles = []

    def finish(self):
        """{layer name: ActivationStats}, shared Hessians linked."""
        self.share.check(self.stats)
        for name, lead in self.share.leader.items():
            if lead != name:
                self.stats[name]._share_hessian_of(self.stats[lead])
        for name, lead in self.follows.items():
            if self.hessian:
                self.stats[name]._share_hessian_of(self.stats[lead])
        return self.stats


class _HessianSharing:
    """Which Linear layers read the very same inputs, so that one XᵀX serves them all.

    A layer joins the group of the first layer that received the same tensor object at the
    same version (a weak reference, so a freed tensor's reused address never matches; the
    version counter, so an input changed in place never matches) when both see their first
    input in the same batch.  In every batch, each input of a follower must be one of its
    leader's inputs of that batch (whichever runs first) and both must be called as many times;
    at the end, their token counts and sums of squares must be identical.  Anything else is a
    CalibrationError (collect with share_hessians=False then)."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.leader, self.born = {}, {}
        self.batch = -1

    def start_batch(self):
        self.batch += 1
        self.seen, self.inputs, self.pending = {}, {}, {}

    @staticmethod
    def _version(x):
        try:
            return x._version
        except (AttributeError, RuntimeError):  # inference tensors have no version counter
            return None

    def _among(self, name, x, version):
        return any(r() is x and v == version for r, v in self.inputs.get(name, ()))

    def see(self, name, x):
        """The leader of layer ``name`` (itself when it computes its own Hessian)."""
        if not self.enabled:
            return name
        import weakref

        version = self._version(x)
        lead = self.leader.get(name)
        if lead is None:
            lead = name
            e = self.seen.get(id(x))
            if e is not None and e[0]() is x and e[1] == version \
                    and self.born[e[2]] == self.batch:
                lead = self.leader[e[2]]
            self.leader[name], self.born[name] = lead, self.batch
        e = self.seen.get(id(x))
        if e is None or e[0]() is not x or e[1] != version:
            self.seen[id(x)] = (weakref.ref(x), version, name)
        self.inputs.setdefault(name, []).append((weakref.ref(x), version))
        if lead != name and not self._among(lead, x, version):
            self.pending.setdefault(lead, []).append((name, weakref.ref(x), version))
        waiting = self.pending.get(name)
        if waiting:
            self.pending[name] = [w for w in waiting if not (w[1]() is x and w[2] == version)]
        return lead

    def end_batch(self):
        if not self.enabled:
            return
        for lead, waiting in self.pending.items():
            if waiting:
                self._differ(waiting[0][0], lead)
        for name, lead in self.leader.items():
            if lead != name and len(self.inputs.get(name, ())) != len(self.inputs.get(lead, ())):
                self._differ(name, lead)

    def check(self, stats):
        """After collection: a follower's tokens and sums of squares are its leader's."""
        for name, lead in self.leader.items():
            if lead == name or name not in stats:
                continue
            a, b = stats[name], stats[lead]
            if a.count != b.count or not np.array_equal(a.sum_squares, b.sum_squares):
                self._differ(name, lead, "")

    def _differ(self, name, lead, when=None):
        when = f" in batch {self.batch}" if when is None else ""
        raise CalibrationError(
            f"layers {name!r} and {lead!r} read the same input tensor in their first batch but "
            f"not the same inputs{when}: one Hessian cannot serve both; collect with "
            "share_hessians=False")


def _apply_keep(t, keep, keep_mask, nt, torch):
    """Make the forward pass of every module of target t use ``keep``; return the keep-mask
    actually in force (combined with an existing torch.nn.utils.prune mask)."""
    from .pruning import SparsityMask

    if t.reparametrised:
        keep = np.logical_and(keep, (t.mask.detach() != 0).numpy())
        with torch.no_grad():
            t.mask.copy_(torch.from_numpy(keep).to(t.mask.dtype))
        if not keep_mask:
            SparsityMask(keep, _trusted=True).apply(t.orig, n_threads=nt)
        for mod in t.mods:  # what torch's own pruning does after changing a mask
            setattr(mod, "weight", t.hook.apply_mask(mod))
        return keep
    if keep_mask:
        from torch.nn.utils import prune as tprune

        mask = torch.from_numpy(np.array(keep)).to(t.weight.dtype)
        for mod in t.mods:
            tprune.custom_from_mask(mod, "weight", mask)
    else:
        SparsityMask(keep, _trusted=True).apply(t.weight, n_threads=nt)
    return keep


def layer_blocks(model, include=None):
    """The model's nn.Linear modules grouped into blocks, in ``named_modules()`` order: the
    block of a module is its name up to and including the first all-digit component
    (``encoder.layer.3.attention.self.query`` -> ``encoder.layer.3``); a Linear outside any
    numbered block is a block of its own.  ``include``: as for :func:`prune_` (searched in the
    weight name).  Returns [(block name, [module names])]."""
    torch = _torch()
    regs = _include_regexes(include)
    blocks = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if regs is not None and not any(r.search(f"{name}.weight") for r in regs):
            continue
        parts = name.split(".")
        cut = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        key = ".".join(parts[:cut + 1]) if cut is not None else name
        blocks.setdefault(key, []).append(name)
    return list(blocks.items())


def prune_sequential_(model, batches, sparsity=None, pattern="auto", *, importance="sparsegpt",
                      include=None, n_threads=None, progress=False):
    """Prune ``model`` block after block (see :func:`layer_blocks`), each block's calibration
    statistics collected from ``batches`` run through the model whose earlier blocks are already
    pruned, as SparseGPT and Wanda prune large models.  ``importance``: "sparsegpt" (Hessians
    collected) or "wanda".  ``batches`` must be re-iterable (a list, a DataLoader): the model
    runs over them once per block.  Returns the concatenated reports of :func:`prune_`."""
    torch = _torch()
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"prune_sequential_ needs a torch.nn.Module, got "
                                   f"{type(model).__name__}")
    _choice(importance, "importance", ("wanda", "sparsegpt"))
    if iter(batches) is batches:
        raise InvalidArgumentError("batches must be re-iterable (a list or a DataLoader, not a "
                                   "generator): the model runs over them once per block")
    blocks = layer_blocks(model, include)
    if not blocks:
        raise InvalidArgumentError(f"prune_sequential_: no nn.Linear module matches include="
                                   f"{short_repr(include)}")
    report = []
    for _, names in blocks:
        ctx = collect_calibration(model, batches, layers=names,
                                  hessian=importance == "sparsegpt", progress=progress,
                                  n_threads=n_threads)
        if not len(ctx):
            continue  # the block never ran on these batches
        exact = [re.escape(n) + r"\.weight$" for n in ctx.layer_names]
        report += prune_(model, sparsity, pattern, include=[f"^(?:{'|'.join(exact)})"],
                         importance=importance, n_threads=n_threads, calibration=ctx)
    return report


def load_state_dict(path, *, n_threads=None):
    """A checkpoint (``.safetensors`` file or folder, dense or in any compressed format aprender
    reads: ``bitmask``, ``sparse-24-bitmask``) as ``{name: CPU tensor}`` of dense tensors in
    their stored dtype (bfloat16 included), ready for ``module.load_state_dict``."""
    torch = _torch()
    from .io.formats import dense_tensors

    out = {}
    for name, code, a in dense_tensors(path, n_threads=n_threads):
        if hasattr(a, "bits"):  # Bits16: bfloat16 bits
            out[name] = torch.from_numpy(_c_order(a.bits).view(np.int16)).view(torch.bfloat16)
        elif code in _TORCH_BYTES:  # float8: the stored bytes, viewed as their dtype
            dt = getattr(torch, _TORCH_BYTES[code], None)
            if dt is None:
                raise InvalidDTypeError(f"tensor {short_repr(name)} is {code}, which this "
                                        f"PyTorch ({torch.__version__}) has no dtype for; a "
                                        "newer PyTorch reads it")
            out[name] = torch.from_numpy(_c_order(a).view(np.uint8)).view(dt)
        else:
            out[name] = torch.from_numpy(_c_order(a))
    return out


# safetensors codes whose words numpy has no type for, and PyTorch's dtype of that name
_TORCH_BYTES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                "F8_E8M0": "float8_e8m0fnu"}


def _c_order(a):
    """A C-contiguous array of ``a``'s shape (np.ascontiguousarray would make a 0-d array
    1-d, and a scalar buffer would no longer load into a 0-d parameter)."""
    return a if a.flags.c_contiguous else a.copy(order="C")
