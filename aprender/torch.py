"""PyTorch interop: zero-copy numpy views of CPU tensors and in-place pruning of modules.

torch is optional and imported only when these functions run (never at ``import aprender``).

CUDA (or any non-CPU) tensors are refused with :class:`DeviceError` rather than copied silently:
pruning in place through a host copy would not change the device tensor.  Move the module or
tensor to the CPU (``.cpu()``), prune, and move it back.
"""
import re

import numpy as np

from ._adapters import _dtype_name, to_numpy_view
from ._validation import check_bool, prune_count, resolve_threads, short_repr
from .errors import (DeviceError, InvalidArgumentError, InvalidDTypeError,  # noqa: F401
                     InvalidPatternError, PruningError)

__all__ = ["DeviceError", "to_numpy_view", "prune_"]


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
    from .pruning.mask import _common_dtype, _raise_first_nonfinite, _threshold_mask

    # mixed dtypes are compared exactly in float32 (float64 if any tensor is float64)
    floats = _common_dtype([as_floats(v, "weight") for v in views])

    total = sum(f.size for f in floats)
    k = prune_count(sparsity, total)
    keeps = [np.empty(f.size, np.uint8) for f in floats]
    if _threshold_mask(floats, keeps, k, 1, nt):
        _raise_first_nonfinite(floats, ["weight"] * len(floats))
    return keeps


def prune_(module, sparsity=None, pattern="unstructured", scope="layer", include=None,
           importance="l1", keep_mask=False, n_threads=None):
    """Prune a module's weights in place by magnitude; returns a per-weight report.

    Targets: every ``nn.Linear`` weight, or with ``include`` (a regex or list of regexes searched
    in the parameter name, e.g. ``"layers\\.0\\."``) the Linear weights and other 2-D weights
    whose name matches.  Weights must be float16, bfloat16, float32 or float64.
    ``pattern``: any text :meth:`aprender.SparsityPattern.parse` reads as "unstructured",
    "per-row" (per-row unstructured: the same fraction in every row, Wanda's grouping) or "N:M"
    such as "2:4" (``sparsity`` then implied), or such a SparsityPattern; "row" is accepted as a
    deprecated spelling of "per-row" here (elsewhere "row" prunes whole rows).  ``scope``: "layer"
    (each weight pruned to ``sparsity``) or "global" (one exact count over all targets,
    unstructured only).  ``importance``: "l1" or "l2" (the same ranking for magnitude pruning).

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
    report names the first module's weight and lists the others in ``shared_with``.

    Ties are broken by index (lowest flat index pruned first), so on tie-free data the masks equal
    ``torch.nn.utils.prune.l1_unstructured`` (layer) and ``global_unstructured`` (global).
    Each report entry: name, shape, dtype, total, kept, sparsity, shared_with."""
    torch = _torch()
    from .pruning.mask import layer_magnitude_mask

    if not isinstance(module, torch.nn.Module):
        raise InvalidArgumentError(f"prune_ needs a torch.nn.Module, got {type(module).__name__}")
    pat = _pattern(pattern)
    _choice(importance, "importance", ("l1", "l2"))
    _choice(scope, "scope", ("layer", "global"))
    keep_mask = check_bool(keep_mask, "keep_mask")
    sparsity = pat.resolve_sparsity(sparsity)
    if scope == "global" and not pat.is_unstructured:
        raise InvalidArgumentError(f"scope='global' needs pattern='unstructured', got {pat}")
    nt = resolve_threads(n_threads)
    targets = _targets(module, include)
    if not targets:
        raise InvalidArgumentError("prune_: no weight matches (nn.Linear weights, or include="
                                   f"{short_repr(include)})")
    ranked = [t.ranked() for t in targets]
    views = [to_numpy_view(r) for r in ranked]
    if scope == "global":
        keeps = [kp.reshape(v.shape).view(np.bool_)
                 for kp, v in zip(_global_keeps(views, sparsity, nt), views)]
    else:
        keeps = []
        for t, v in zip(targets, views):
            try:
                mk = layer_magnitude_mask(v, pat, sparsity, n_threads=nt)
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
